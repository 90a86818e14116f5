"""Train the ink-digits model from scratch, deterministically, on the CPU.

Stages: the judge (digit CNN), the VAE (16x16 RGB <-> 4x8x8 latents), then the text encoder and
UNet together on captioned latents, with EMA weights. The result is a diffusers folder in the
Stable Diffusion 1.x layout that loads like any SD1 model. The same machine and thread count give
the same weights: every random draw comes from a seeded generator.

The judge and the VAE learn every ink of ALL_INKS, so that ink-digits-2 (build2.py), which reuses
both, shares this model's latent space; the text encoder and UNet see only ink-digits' five inks.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from leco.files import atomic_folder
from leco.ink_digits import GUIDANCE, INK_DIGITS, STEPS
from leco.ink_digits.card import write_ink_digits_card
from leco.ink_digits.data import (
    ALL_INKS,
    MODEL_INKS,
    SIZE,
    caption_words,
    dataset,
    digits,
    draw,
    upsample,
)
from leco.ink_digits.judge import DigitNet, InkDigitsJudge, ink_amounts
from leco.ink_digits.quality import measure
from leco.ink_digits.tokenizer import MAX_LENGTH, build_tokenizer
from leco.ink_digits.training import (
    EPSILON,
    LATENT_SIZE,
    DiffusionRecipe,
    encode,
    log,
    parameter_count,
    save_pipeline,
    to_unit,
    torch_threads,
    train_diffusion,
    write_known_prompts,
)

INKS = MODEL_INKS[INK_DIGITS]


@dataclass
class Recipe(DiffusionRecipe):
    judge_steps: int = 1500
    vae_channels: tuple[int, ...] = (16, 32)
    vae_steps: int = 600
    unet_channels: tuple[int, ...] = (64, 64)
    # Cross-attention at the 4x4 level only (and in the mid block): 8x8 attention cost twice the time
    # per step and did not make the digits or inks any better.
    down_blocks: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    up_blocks: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    text_hidden: int = 64
    text_layers: int = 2


# -- the judge ------------------------------------------------------------------------------------


def train_judge(recipe: Recipe) -> tuple[InkDigitsJudge, float]:
    """A digit CNN on ink amounts read back from images in every ink; returns it and its held-out accuracy."""
    amounts, labels = digits()
    order = np.random.default_rng(recipe.seed).permutation(len(labels))
    test, train = order[: len(order) // 5], order[len(order) // 5 :]
    big = upsample(amounts)

    def read_back(index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        inks = [ink_amounts(draw(big[index], ink), np.full(len(index), i)) for i, ink in enumerate(ALL_INKS)]
        read_labels = np.tile(labels[index], len(ALL_INKS))
        return torch.from_numpy(np.concatenate(inks)), torch.from_numpy(read_labels)

    x_train, y_train = read_back(train)
    x_test, y_test = read_back(test)
    torch.manual_seed(recipe.seed)
    net = DigitNet()
    optimizer = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(recipe.seed)
    for _ in range(recipe.judge_steps):
        index = torch.randint(len(x_train), (128,), generator=generator)
        x = x_train[index]
        # Generated digits are a little blurrier, fainter or noisier than the real ones.
        gain = 0.6 + 0.6 * torch.rand(len(x), 1, 1, generator=generator)
        x = (x * gain + 0.08 * torch.randn(x.shape, generator=generator)).clamp(0, 1.5)
        loss = nn.functional.cross_entropy(net(x), y_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (net(x_test).argmax(-1) == y_test).float().mean().item()
    return InkDigitsJudge(net), accuracy


# -- the VAE --------------------------------------------------------------------------------------


def make_vae(recipe: Recipe) -> AutoencoderKL:
    # One downsampling (16x16 -> 8x8 latents); no attention in the middle block, which at this size
    # would triple the VAE's cost and buy nothing.
    levels = len(recipe.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=recipe.vae_channels, norm_num_groups=min(16, recipe.vae_channels[0]),
        mid_block_add_attention=False,
    )  # fmt: skip


def train_vae(recipe: Recipe, images: torch.Tensor) -> AutoencoderKL:
    torch.manual_seed(recipe.seed)
    vae = make_vae(recipe)
    optimizer = torch.optim.AdamW(vae.parameters(), 2e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / recipe.vae_steps, 1)))
    )
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    for step in range(recipe.vae_steps):
        x = images[torch.randint(len(images), (64,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        # A tiny KL weight: the latents only need to be smooth enough to diffuse, not N(0, 1).
        loss = (vae.decode(z).sample - x).pow(2).mean() + 1e-5 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0:
            log(f"vae step {step}/{recipe.vae_steps}: loss {loss.item():.4f}")
    return vae.eval()


@torch.no_grad()
def check_vae(vae: AutoencoderKL, judge: InkDigitsJudge) -> dict:
    """How well decoded latents keep every fifth image of every ink: pixel error and the judge's
    accuracy on them, overall and per ink."""
    images, digit_labels, ink_labels = dataset(ALL_INKS)
    every = slice(None, None, 5)
    pixels, digit_labels, ink_labels = to_unit(images[every]), digit_labels[every], ink_labels[every]
    decoded = torch.cat([vae.decode(z).sample for z in encode(vae, pixels).split(512)]).clamp(-1, 1)
    rgb = ((decoded + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    reading = judge.read(rgb)
    error = (decoded - pixels).abs().mean(dim=(1, 2, 3)).numpy() * 127.5

    def summary(rows: np.ndarray) -> dict[str, float]:
        return {
            "mean_abs_error_255": float(error[rows].mean()),
            "digit_accuracy": float((reading.digits[rows] == digit_labels[rows]).mean()),
            "ink_accuracy": float((reading.inks[rows] == ink_labels[rows]).mean()),
        }

    per_ink = {ink: summary(ink_labels == i) for i, ink in enumerate(ALL_INKS)}
    return {**summary(np.ones(len(error), dtype=bool)), "per_ink": per_ink}


# -- text encoder + UNet --------------------------------------------------------------------------


def make_text_encoder(recipe: Recipe, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.text_hidden, intermediate_size=4 * recipe.text_hidden,
        num_hidden_layers=recipe.text_layers, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
        projection_dim=recipe.text_hidden, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return CLIPTextModel(config)


def make_unet(recipe: Recipe) -> UNet2DConditionModel:
    # attention_head_dim is diffusers' historical name for the number of heads (SD 1.x: 8).
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, block_out_channels=recipe.unet_channels,
        layers_per_block=recipe.layers_per_block, down_block_types=recipe.down_blocks,
        up_block_types=recipe.up_blocks, mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=recipe.text_hidden, attention_head_dim=4, norm_num_groups=32,
    )  # fmt: skip


# -- the whole build ------------------------------------------------------------------------------


def build(out: Path, recipe: Recipe | None = None, measure_quality: bool = True) -> dict:
    """Retrain everything into `out` (a diffusers folder); returns the build report.

    The folder is replaced only when the build has finished: an interrupted rebuild of the shipped
    model leaves the shipped model intact.
    """
    recipe = recipe or Recipe()
    with atomic_folder(out) as staging, torch_threads(recipe.threads):
        return _build(staging, recipe, measure_quality)


def _build(out: Path, recipe: Recipe, measure_quality: bool) -> dict:
    started = (time.time(), time.process_time())
    log("judge")
    judge, judge_accuracy = train_judge(recipe)
    log(f"judge held-out accuracy {judge_accuracy:.3f}")
    log(f"vae, on all {len(ALL_INKS)} inks")
    every_ink = to_unit(dataset(ALL_INKS)[0])
    vae = train_vae(recipe, every_ink)
    vae_check = check_vae(vae, judge)
    log(f"vae reconstructions: {json.dumps(vae_check)}")
    # Latents of unit variance, as the UNet's noise schedule expects (SD 1.x's 0.18215 does the same).
    vae.register_to_config(scaling_factor=float(1.0 / encode(vae, every_ink).std()))
    images, digit_labels, ink_labels = dataset(INKS)
    latents = encode(vae, to_unit(images)) * vae.config.scaling_factor
    tokenizer = build_tokenizer(caption_words(), out / "tokenizer")
    log(f"text encoder + unet, on {len(INKS)} inks")
    torch.manual_seed(recipe.seed)
    text_encoder = make_text_encoder(recipe, tokenizer)
    unet = make_unet(recipe)
    text_encoder, unet = train_diffusion(
        recipe,
        latents,
        torch.from_numpy(digit_labels),
        torch.from_numpy(ink_labels),
        tokenizer,
        text_encoder,
        unet,
    )
    save_pipeline(out, vae, text_encoder, unet, EPSILON)
    write_known_prompts(out, INKS)
    judge.save(out)
    report = {
        "model": INK_DIGITS,
        "inks": list(INKS),
        "recipe": asdict(recipe),
        "parameters": {
            "unet": parameter_count(unet),
            "text_encoder": parameter_count(text_encoder),
            "vae": parameter_count(vae),
            "judge": parameter_count(judge.net),
        },
        "judge_held_out_accuracy": judge_accuracy,
        "vae_reconstruction": vae_check,
    }
    finish(out, report, recipe, started, measure_quality)
    write_ink_digits_card(out, report)
    return report


def finish(
    out: Path, report: dict, recipe: DiffusionRecipe, started: tuple[float, float], measure_quality: bool
) -> None:
    """Add timings, versions and (optionally) the measured quality to `report`; write build_report.json."""
    wall, cpu = started
    report["train_wall_seconds"] = time.time() - wall
    report["train_cpu_seconds"] = time.process_time() - cpu
    report["torch"], report["diffusers"] = torch.__version__, diffusers.__version__
    if measure_quality:
        log("quality")
        report["sampling"] = {"guidance": GUIDANCE, "steps": STEPS, "seeds": recipe.quality_seeds}
        report["quality"] = measure(out, GUIDANCE, STEPS, seeds=recipe.quality_seeds, inks=report["inks"])
    report["wall_seconds"] = time.time() - wall
    report["cpu_seconds"] = time.process_time() - cpu
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"done in {report['wall_seconds'] / 60:.1f} min ({report['cpu_seconds'] / 60:.1f} CPU min)")
