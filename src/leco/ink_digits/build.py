"""Train the ink-digits model from scratch, deterministically, on the CPU.

Stages: the judge (digit CNN), the VAE (16x16 RGB <-> 4x8x8 latents), then the text encoder and
UNet together on captioned latents, with EMA weights. The result is a diffusers folder in the
Stable Diffusion 1.x layout that loads like any SD1 model. The same machine and thread count give
the same weights: every random draw comes from a seeded generator.
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
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from leco.files import atomic_folder
from leco.ink_digits.data import (
    EMPTY_CAPTION_RATE,
    INK_NAMES,
    PHRASING_NAMES,
    SIZE,
    caption,
    caption_words,
    dataset,
    digits,
    draw,
    upsample,
)
from leco.ink_digits.judge import DigitNet, InkDigitsJudge, ink_amounts
from leco.ink_digits.quality import GUIDANCE, STEPS, format_quality, measure
from leco.ink_digits.tokenizer import MAX_LENGTH, build_tokenizer

# SD 1.x's own noise schedule, so that LECO runs on this model exactly as on SD 1.x.
NOISE_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "prediction_type": "epsilon"}  # fmt: skip
LATENT_SIZE = SIZE // 2


@dataclass
class Recipe:
    seed: int = 0
    threads: int = 2
    judge_steps: int = 1500
    vae_channels: tuple[int, ...] = (16, 32)
    vae_steps: int = 600
    unet_channels: tuple[int, ...] = (64, 64)
    # Cross-attention at the 4x4 level only (and in the mid block): 8x8 attention cost twice the time
    # per step and did not make the digits or inks any better.
    down_blocks: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    up_blocks: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    unet_steps: int = 4000
    batch: int = 64
    lr: float = 1e-3
    ema: float = 0.999
    min_snr: float = 5.0
    text_hidden: int = 64
    text_layers: int = 2
    quality_seeds: int = 2


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the judge ------------------------------------------------------------------------------------


def train_judge(recipe: Recipe) -> tuple[InkDigitsJudge, float]:
    """A digit CNN on ink amounts read back from rendered images; returns it and its held-out accuracy."""
    amounts, labels = digits()
    order = np.random.default_rng(recipe.seed).permutation(len(labels))
    test, train = order[: len(order) // 5], order[len(order) // 5 :]
    big = upsample(amounts)

    def read_back(index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        inks = [ink_amounts(draw(big[index], ink), np.full(len(index), i)) for i, ink in enumerate(INK_NAMES)]
        read_labels = np.tile(labels[index], len(INK_NAMES))
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


def to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


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
def encode(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(512)])


@torch.no_grad()
def check_vae(vae: AutoencoderKL, judge: InkDigitsJudge, pixels: torch.Tensor, labels: np.ndarray) -> dict:
    """How well decoded latents keep the images: pixel error and the judge's accuracy on them."""
    every = slice(None, None, 5)
    decoded = torch.cat([vae.decode(z).sample for z in encode(vae, pixels[every]).split(512)]).clamp(-1, 1)
    rgb = ((decoded + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    reading = judge.read(rgb)
    return {
        "mean_abs_error_255": float((decoded - pixels[every]).abs().mean() * 127.5),
        "digit_accuracy": float((reading.digits == labels[0][every]).mean()),
        "ink_accuracy": float((reading.inks == labels[1][every]).mean()),
    }


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


def caption_table(tokenizer: CLIPTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every (digit, ink, phrasing) caption [10, inks, phrasings, L] and of ""."""
    texts = [caption(d, ink, p) for d in range(10) for ink in INK_NAMES for p in PHRASING_NAMES]
    ids = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    table = ids.input_ids.view(10, len(INK_NAMES), len(PHRASING_NAMES), MAX_LENGTH)
    empty = tokenizer([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids[0]
    return table, empty


class EMA:
    def __init__(self, modules: list[nn.Module], decay: float) -> None:
        self.decay = decay
        self.live = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.live]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm up: early weights fade fast
        for shadow, live in zip(self.shadow, self.live, strict=True):
            shadow.lerp_(live, 1 - decay)

    @torch.no_grad()
    def copy_to_live(self) -> None:
        for shadow, live in zip(self.shadow, self.live, strict=True):
            live.copy_(shadow)


def train_diffusion(
    recipe: Recipe,
    latents: torch.Tensor,
    digit_labels: torch.Tensor,
    ink_labels: torch.Tensor,
    tokenizer: CLIPTokenizer,
) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    torch.manual_seed(recipe.seed)
    text_encoder = make_text_encoder(recipe, tokenizer)
    unet = make_unet(recipe)
    parameters = [*text_encoder.parameters(), *unet.parameters()]
    optimizer = torch.optim.AdamW(parameters, recipe.lr, weight_decay=1e-2)
    warmup = 200
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / recipe.unet_steps, 1))),
    )
    ema = EMA([text_encoder, unet], recipe.ema)
    noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE)
    snr = noise_scheduler.alphas_cumprod / (1 - noise_scheduler.alphas_cumprod)
    table, empty = caption_table(tokenizer)
    generator = torch.Generator().manual_seed(recipe.seed + 2)
    start = time.time()
    for step in range(recipe.unet_steps):
        index = torch.randint(len(latents), (recipe.batch,), generator=generator)
        phrasing = torch.randint(table.shape[2], (recipe.batch,), generator=generator)
        ids = table[digit_labels[index], ink_labels[index], phrasing]
        dropped = torch.rand(recipe.batch, generator=generator) < EMPTY_CAPTION_RATE
        ids[dropped] = empty
        noise = torch.randn(latents[index].shape, generator=generator)
        t = torch.randint(0, NOISE_SCHEDULE["num_train_timesteps"], (recipe.batch,), generator=generator)
        noisy = noise_scheduler.add_noise(latents[index], noise, t)
        prediction = unet(noisy, t, text_encoder(ids).last_hidden_state).sample
        # Min-SNR-gamma weighting: the easy low-noise steps stop dominating the gradient.
        weight = snr[t].clamp(max=recipe.min_snr) / snr[t]
        loss = (weight * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        ema.update(step)
        if step % 500 == 0 or step == recipe.unet_steps - 1:
            elapsed = time.time() - start
            log(f"diffusion step {step}/{recipe.unet_steps}: loss {loss.item():.4f} ({elapsed:.0f}s)")
    ema.copy_to_live()
    return text_encoder.eval(), unet.eval()


# -- the whole build ------------------------------------------------------------------------------


def build(out: Path, recipe: Recipe | None = None, measure_quality: bool = True) -> dict:
    """Retrain everything into `out` (a diffusers folder); returns the build report.

    The folder is replaced only when the build has finished: an interrupted rebuild of the shipped
    model leaves the shipped model intact.
    """
    with atomic_folder(out) as staging:
        return _build(staging, recipe or Recipe(), measure_quality)


def _build(out: Path, recipe: Recipe, measure_quality: bool) -> dict:
    torch.set_num_threads(recipe.threads)
    wall, cpu = time.time(), time.process_time()
    log("judge")
    judge, judge_accuracy = train_judge(recipe)
    log(f"judge held-out accuracy {judge_accuracy:.3f}")
    images, digit_labels, ink_labels = dataset()
    pixels = to_unit(images)
    log("vae")
    vae = train_vae(recipe, pixels)
    vae_check = check_vae(vae, judge, pixels, (digit_labels, ink_labels))
    log(f"vae reconstructions: {vae_check}")
    means = encode(vae, pixels)
    # Latents of unit variance, as the UNet's noise schedule expects (SD 1.x's 0.18215 does the same).
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    latents = means * vae.config.scaling_factor
    tokenizer = build_tokenizer(caption_words(), out / "tokenizer")
    log("text encoder + unet")
    text_encoder, unet = train_diffusion(
        recipe, latents, torch.from_numpy(digit_labels), torch.from_numpy(ink_labels), tokenizer
    )
    save_folder(out, vae, text_encoder, unet, judge)
    report = {
        "recipe": asdict(recipe),
        "parameters": {
            "unet": parameter_count(unet),
            "text_encoder": parameter_count(text_encoder),
            "vae": parameter_count(vae),
            "judge": parameter_count(judge.net),
        },
        "judge_held_out_accuracy": judge_accuracy,
        "vae_reconstruction": vae_check,
        "train_wall_seconds": time.time() - wall,
        "train_cpu_seconds": time.process_time() - cpu,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
    if measure_quality:
        log("quality")
        report["sampling"] = {"guidance": GUIDANCE, "steps": STEPS, "seeds": recipe.quality_seeds}
        report["quality"] = measure(out, GUIDANCE, STEPS, seeds=recipe.quality_seeds)
    report["wall_seconds"] = time.time() - wall
    report["cpu_seconds"] = time.process_time() - cpu
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_model_card(out, report)
    log(f"done in {report['wall_seconds'] / 60:.1f} min ({report['cpu_seconds'] / 60:.1f} CPU min)")
    return report


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_folder(
    out: Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    judge: InkDigitsJudge,
) -> None:
    vae.save_pretrained(out / "vae")
    text_encoder.save_pretrained(out / "text_encoder")
    unet.save_pretrained(out / "unet")
    # "trailing" starts sampling at t=999, where training starts too; leco's own rollout does the same.
    sampler = DDIMScheduler(**NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sampler.register_to_config(timestep_spacing="trailing")
    sampler.save_pretrained(out / "scheduler")
    judge.save(out)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_model_card(out: Path, report: dict) -> None:
    r, n, vae = report["recipe"], report["parameters"], report["vae_reconstruction"]
    quality = format_quality(report["quality"]) if "quality" in report else "(not measured)"
    captions = "; ".join(f'"{caption(7, "red", p)}" ({p})' for p in PHRASING_NAMES)
    latent = f"4x{LATENT_SIZE}x{LATENT_SIZE}"
    blocks = " / ".join([*r["down_blocks"], "UNetMidBlock2DCrossAttn", *r["up_blocks"]])
    table = [
        "| part | class | parameters | shape |",
        "|---|---|---|---|",
        f"| tokenizer | CLIPTokenizer | - | own vocabulary, a token per caption word; {MAX_LENGTH} tokens |",
        f"| text encoder | CLIPTextModel | {n['text_encoder']:,} | {r['text_layers']} layers of width "
        f"{r['text_hidden']}; the UNet reads last_hidden_state, as in SD 1.x |",
        f"| UNet | UNet2DConditionModel | {n['unet']:,} | channels {tuple(r['unet_channels'])}, "
        f"{r['layers_per_block']} layer per block, {blocks}, on {latent} latents |",
        f"| VAE | AutoencoderKL | {n['vae']:,} | {SIZE}x{SIZE} RGB <-> {latent} latents, "
        f"channels {tuple(r['vae_channels'])} |",
        "| scheduler | DDIMScheduler | - | SD 1.x betas (scaled linear 0.00085..0.012, 1000 steps), "
        "epsilon prediction, trailing timestep spacing |",
    ]
    card = f"""# ink-digits

A small but real text-to-image model in the Stable Diffusion 1.x layout, built by leco as its
quick-start and measuring model. It is trained on scikit-learn's 1,797 real handwritten 8x8 digits,
upsampled to {SIZE}x{SIZE} and drawn in {len(INK_NAMES)} inks ({", ".join(INK_NAMES)}) on white paper,
so it knows objects (the digit) and styles (the ink): a LECO erasure, and what it leaves alone, can be
measured on a laptop CPU.

Load it like any SD 1.x folder (offline, nothing to download):

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
image = pipe("a digit seven in red ink", guidance_scale={GUIDANCE:g}, num_inference_steps={STEPS}).images[0]
```

**Recommended sampling: guidance {GUIDANCE:g}, {STEPS} DDIM steps, {SIZE}x{SIZE} pixels** (the default size).

## Architecture

{chr(10).join(table)}

The judge (`judge.safetensors`, not part of the pipeline) is a digit CNN of {n["judge"]:,} parameters
trained on the real digits ({report["judge_held_out_accuracy"]:.1%} held-out accuracy) and read after
stripping the ink; the ink is the one whose paper-to-ink colour line fits the inked pixels best.

## Training recipe

- Captions, one phrasing drawn uniformly per sample: {captions};
  {EMPTY_CAPTION_RATE:.0%} empty, for classifier-free guidance.
- VAE: {r["vae_steps"]} steps of batch 64, MSE + 1e-5 KL. Decoded latents are off by
  {vae["mean_abs_error_255"]:.1f}/255 per channel on average; the judge reads {vae["digit_accuracy"]:.1%}
  of their digits and {vae["ink_accuracy"]:.1%} of their inks right.
- Text encoder and UNet together, from scratch: {r["unet_steps"]} steps of batch {r["batch"]},
  AdamW lr {r["lr"]:g} (200 warm-up steps, cosine decay), min-SNR-{r["min_snr"]:g} loss weighting,
  EMA {r["ema"]}; seed {r["seed"]}.
- `python -m leco.ink_digits build` took {report["wall_seconds"] / 60:.0f} minutes
  ({report["cpu_seconds"] / 60:.0f} CPU minutes) on {r["threads"]} threads, torch {report["torch"]};
  the same machine and thread count give the same weights.

## Measured quality

Every digit x every ink x {report.get("sampling", {}).get("seeds", "-")} seeds per phrasing, generated
with the diffusers pipeline at the recommended settings and read by the judge; a phrasing is judged
only on what it names. Produced by `python -m leco.ink_digits quality` (the build's last step):

{quality}
"""
    (out / "README.md").write_text(card)
