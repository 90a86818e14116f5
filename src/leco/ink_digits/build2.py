"""Train ink-digits-2 from scratch on top of an ink-digits build, deterministically, on the CPU.

ink-digits-2 is the Stable Diffusion 2.x counterpart of ink-digits: an SD2-kind text encoder (gelu,
"!" padding) read at its penultimate layer, a UNet with linear projections, per-block head counts
and upcast attention, and v-prediction, on the same noise schedule. It reuses ink-digits' VAE,
judge and vocabulary byte for byte, so the two models share one latent space (the premise of a
concept transplant between them), and it is trained on all seven inks.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from leco.errors import LecoError
from leco.files import atomic_folder
from leco.ink_digits import INK_DIGITS_2, default_model_path
from leco.ink_digits.build import check_vae, finish
from leco.ink_digits.card import write_ink_digits_2_card
from leco.ink_digits.data import MODEL_INKS, caption_words, dataset
from leco.ink_digits.judge import JUDGE_FILE, InkDigitsJudge
from leco.ink_digits.tokenizer import MAX_LENGTH, SD2_PAD, copy_tokenizer
from leco.ink_digits.training import (
    LATENT_SIZE,
    V_PREDICTION,
    DiffusionRecipe,
    caption_table,
    encode,
    log,
    parameter_count,
    save_pipeline,
    text_states,
    to_unit,
    torch_threads,
    train_diffusion,
    write_known_prompts,
)

INKS = MODEL_INKS[INK_DIGITS_2]
# What ink-digits-2 takes from the ink-digits folder it is built on, unchanged.
SHARED_FILES = ("vae/config.json", "vae/diffusion_pytorch_model.safetensors", JUDGE_FILE)


@dataclass
class Recipe2(DiffusionRecipe):
    # Seven inks instead of five: more captions to learn than ink-digits' 4000 steps cover.
    unet_steps: int = 5000
    unet_channels: tuple[int, ...] = (64, 64)
    # Heads per block, as SD 2.x lists them ([5, 10, 20, 20]: 64 channels per head at every level);
    # here 32 channels per head.
    attention_heads: tuple[int, ...] = (2, 2)
    down_blocks: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    up_blocks: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    # Wider than ink-digits' 64, so a transplant between the two must map text widths.
    text_hidden: int = 96
    text_heads: int = 3
    # Layers in the saved folder; training runs one more, whose output is never read (SD 2.x reads
    # OpenCLIP's penultimate layer, and its diffusers conversion drops the last one).
    text_layers: int = 2


def make_text_encoder(recipe: Recipe2, tokenizer: CLIPTokenizer, layers: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.text_hidden, intermediate_size=4 * recipe.text_hidden,
        num_hidden_layers=layers, num_attention_heads=recipe.text_heads, max_position_embeddings=MAX_LENGTH,
        hidden_act="gelu", projection_dim=recipe.text_hidden, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return CLIPTextModel(config)


def make_unet(recipe: Recipe2) -> UNet2DConditionModel:
    # attention_head_dim is diffusers' historical name for the number of heads, per block as in SD 2.x.
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=recipe.unet_channels,
        layers_per_block=recipe.layers_per_block, down_block_types=recipe.down_blocks,
        up_block_types=recipe.up_blocks, mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=recipe.text_hidden, attention_head_dim=recipe.attention_heads,
        use_linear_projection=True, upcast_attention=True, norm_num_groups=32,
    )  # fmt: skip


@torch.no_grad()
def drop_last_layer(trained: CLIPTextModel, recipe: Recipe2, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """The encoder without its unread last layer, so that its last_hidden_state (what a diffusers
    pipeline reads) is exactly the penultimate-layer reading training used."""
    kept = make_text_encoder(recipe, tokenizer, recipe.text_layers)
    last = f"encoder.layers.{recipe.text_layers}."
    weights = {
        k: v for k, v in trained.state_dict().items() if not k.removeprefix("text_model.").startswith(last)
    }
    kept.load_state_dict(weights, strict=True)
    kept.eval()
    captions, empty = caption_table(tokenizer)
    ids = torch.cat([captions.flatten(0, 2), empty[None]])
    if not torch.equal(kept(ids).last_hidden_state, text_states(trained, ids, penultimate=True)):
        raise RuntimeError("the saved text encoder does not reproduce the penultimate-layer reading")
    return kept


def _base_report(base: Path) -> dict:
    try:
        return json.loads((base / "build_report.json").read_text())
    except (OSError, ValueError):
        return {}


def build2(
    out: Path, recipe: Recipe2 | None = None, base: Path | None = None, measure_quality: bool = True
) -> dict:
    """Train ink-digits-2 into `out` with the VAE, judge and vocabulary of the ink-digits folder `base`
    (default: the shipped one); returns the build report. `out` is replaced only when finished."""
    base = Path(base) if base is not None else default_model_path()
    missing = [name for name in (*SHARED_FILES, "tokenizer/vocab.json") if not (base / name).is_file()]
    if missing:
        raise LecoError(
            f"{base}: not an ink-digits build (no {', '.join(missing)}); ink-digits-2 reuses its VAE, "
            "build it first: python -m leco.ink_digits build --model ink-digits"
        )
    recipe = recipe or Recipe2()
    with atomic_folder(out) as staging, torch_threads(recipe.threads):
        return _build2(staging, recipe, base, measure_quality)


def _build2(out: Path, recipe: Recipe2, base: Path, measure_quality: bool) -> dict:
    started = (time.time(), time.process_time())
    for name in SHARED_FILES:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(base / name, out / name)
    tokenizer = copy_tokenizer(base / "tokenizer", out / "tokenizer", caption_words(), SD2_PAD)
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    judge = InkDigitsJudge.load(out)
    vae_check = check_vae(vae, judge)
    images, digit_labels, ink_labels = dataset(INKS)
    latents = encode(vae, to_unit(images)) * vae.config.scaling_factor
    log(f"text encoder + unet (v-prediction), on {len(INKS)} inks")
    torch.manual_seed(recipe.seed)
    text_encoder = make_text_encoder(recipe, tokenizer, recipe.text_layers + 1)
    unet = make_unet(recipe)
    labels = torch.from_numpy(digit_labels), torch.from_numpy(ink_labels)
    text_encoder, unet = train_diffusion(
        recipe,
        latents,
        *labels,
        tokenizer,
        text_encoder,
        unet,
        prediction_type=V_PREDICTION,
        penultimate=True,
    )
    text_encoder = drop_last_layer(text_encoder, recipe, tokenizer)
    save_pipeline(out, None, text_encoder, unet, V_PREDICTION)
    write_known_prompts(out, INKS)
    report = {
        "model": INK_DIGITS_2,
        "inks": list(INKS),
        "recipe": asdict(recipe),
        "copied_from_ink_digits": [*SHARED_FILES, "tokenizer/vocab.json", "tokenizer/merges.txt"],
        "parameters": {
            "unet": parameter_count(unet),
            "text_encoder": parameter_count(text_encoder),
            "vae": parameter_count(vae),
            "judge": parameter_count(judge.net),
        },
        "judge_held_out_accuracy": _base_report(base).get("judge_held_out_accuracy"),
        "vae_reconstruction": vae_check,
    }
    finish(out, report, recipe, started, measure_quality)
    write_ink_digits_2_card(out, report)
    return report
