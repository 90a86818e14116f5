"""What both ink-digits builds share: the noise schedule, the captioned training loop, the folder layout.

The loop trains a text encoder and a UNet together from scratch on VAE latents with EMA weights,
for either prediction target (epsilon for ink-digits, v for ink-digits-2) and either way of reading
the text (last layer as SD 1.x, penultimate layer + final layer norm as SD 2.x). Every random draw
comes from a seeded generator, so the same machine and thread count give the same weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer

from leco.ink_digits.data import (
    ALL_INKS,
    DIGIT_PHRASINGS,
    EMPTY_CAPTION_RATE,
    INK_PHRASINGS,
    PHRASING_NAMES,
    SIZE,
    caption,
)
from leco.ink_digits.tokenizer import MAX_LENGTH

# SD 1.x / 2.x's own noise schedule (both use it), so that LECO runs on these models as on real SD.
NOISE_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000}  # fmt: skip
EPSILON, V_PREDICTION = "epsilon", "v_prediction"
LATENT_SIZE = SIZE // 2
KNOWN_PROMPTS_FILE = "prompts.txt"  # leco.preservation's `anchors: {prompts: auto}` reads it
WARMUP_STEPS = 200


@dataclass
class DiffusionRecipe:
    """The settings of the text encoder + UNet training that both models use."""

    seed: int = 0
    threads: int = 2
    unet_steps: int = 4000
    batch: int = 64
    lr: float = 1e-3
    ema: float = 0.999
    min_snr: float = 5.0
    quality_seeds: int = 2


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Build with `count` threads (the weights depend on it), then give the caller its own back."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def to_unit(images: np.ndarray) -> Tensor:
    """uint8 RGB [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def encode(vae: AutoencoderKL, pixels: Tensor) -> Tensor:
    """Latent means (unscaled), in chunks."""
    return torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(512)])


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def caption_table(tokenizer: CLIPTokenizer) -> tuple[Tensor, Tensor]:
    """Token ids of every (digit, ink of ALL_INKS, phrasing) caption [10, inks, phrasings, L] and of ""."""
    texts = [caption(d, ink, p) for d in range(10) for ink in ALL_INKS for p in PHRASING_NAMES]
    ids = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    table = ids.input_ids.view(10, len(ALL_INKS), len(PHRASING_NAMES), MAX_LENGTH)
    empty = tokenizer([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids[0]
    return table, empty


def text_states(text_encoder: CLIPTextModel, ids: Tensor, penultimate: bool) -> Tensor:
    """What the UNet cross-attends to: the last layer's output (SD 1.x), or the penultimate layer's
    through the final layer norm (SD 2.x, which reads OpenCLIP that way)."""
    if not penultimate:
        return text_encoder(ids).last_hidden_state
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    # transformers >= 5.6 flattened CLIPTextModel; older versions keep it under `text_model`.
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)


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


def loss_weights(snr: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-gamma weighting, so the easy low-noise steps stop dominating the gradient.

    For an epsilon target the weight is min(snr, gamma) / snr; a v target's error is (snr + 1)
    times the epsilon error's scale, hence min(snr, gamma) / (snr + 1).
    """
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if prediction_type == V_PREDICTION else clipped / snr


def train_diffusion(
    recipe: DiffusionRecipe,
    latents: Tensor,
    digit_labels: Tensor,
    ink_labels: Tensor,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    *,
    prediction_type: str = EPSILON,
    penultimate: bool = False,
) -> tuple[CLIPTextModel, UNet2DConditionModel]:
    """Train `text_encoder` and `unet` together on captioned latents; returns them with EMA weights.

    `ink_labels` index ALL_INKS; only the captions of the inks present in the data are ever drawn.
    """
    parameters = [*text_encoder.parameters(), *unet.parameters()]
    optimizer = torch.optim.AdamW(parameters, recipe.lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / WARMUP_STEPS) * 0.5 * (1 + math.cos(math.pi * min(s / recipe.unet_steps, 1)))
        ),
    )
    ema = EMA([text_encoder, unet], recipe.ema)
    noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE, prediction_type=prediction_type)
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
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(0, NOISE_SCHEDULE["num_train_timesteps"], (recipe.batch,), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, t)
        target = noise if prediction_type == EPSILON else noise_scheduler.get_velocity(clean, noise, t)
        prediction = unet(noisy, t, text_states(text_encoder, ids, penultimate)).sample
        weight = loss_weights(snr[t], recipe.min_snr, prediction_type)
        loss = (weight * (prediction - target).pow(2).mean(dim=(1, 2, 3))).mean()
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


def save_pipeline(
    out: Path,
    vae: AutoencoderKL | None,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    prediction_type: str,
) -> None:
    """Write the diffusers StableDiffusionPipeline folder (the VAE only when given; it may be copied)."""
    if vae is not None:
        vae.save_pretrained(out / "vae")
    text_encoder.save_pretrained(out / "text_encoder")
    unet.save_pretrained(out / "unet")
    # "trailing" starts sampling at t=999, where training starts too; leco's own rollout does the same.
    sampler = DDIMScheduler(
        **NOISE_SCHEDULE,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    sampler.register_to_config(timestep_spacing="trailing")
    sampler.save_pretrained(out / "scheduler")
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


def write_known_prompts(out: Path, inks: Sequence[str]) -> None:
    """prompts.txt: every caption the model was trained on, one a line."""
    lines = ["# Every caption this model was trained on (leco's anchors: auto reads this)."]
    for phrasing in PHRASING_NAMES:
        digits = range(10) if phrasing in DIGIT_PHRASINGS else [None]
        named_inks = inks if phrasing in INK_PHRASINGS else [None]
        lines += [caption(digit, ink, phrasing) for digit in digits for ink in named_inks]
    (out / KNOWN_PROMPTS_FILE).write_text("\n".join(lines) + "\n")
