"""Prompt entries made ready for training: cached embeddings, image sizes, SDXL size ids."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from leco.conditioning import Conditioning, PromptEncoder, sdxl_time_ids
from leco.config import PromptSettings, TrainConfig
from leco.errors import LecoError
from leco.models import LoadedModels

ROLES = ("positive", "neutral", "unconditional")
# Aspect ratios tried by dynamic_resolution, as (width, height) shares of the square's area.
ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))


@dataclass
class PreparedPrompt:
    settings: PromptSettings
    target: Conditioning  # one row each
    unconditional: Conditioning
    teacher: Conditioning  # one row per distinct text among positive, neutral, unconditional
    teacher_rows: dict[str, int]  # role -> its row in `teacher`
    resolution: int
    batch_size: int
    size_step: int  # height and width must be multiples of this (pixels)

    def image_size(self, generator: torch.Generator) -> tuple[int, int]:
        """(height, width) in pixels; varies around the area of resolution**2 with dynamic_resolution."""
        if not self.settings.dynamic_resolution:
            return self.resolution, self.resolution
        wide, tall = ASPECTS[int(torch.randint(len(ASPECTS), (1,), generator=generator))]
        scale = self.resolution / math.sqrt(wide * tall)
        return self._round(tall * scale), self._round(wide * scale)

    def crop(self, height: int, width: int, generator: torch.Generator) -> tuple[int, int]:
        """SDXL's crop-corner condition; random with dynamic_crops (the images were cropped there)."""
        if not self.settings.dynamic_crops:
            return 0, 0
        top = int(torch.randint(0, max(height // 4, 1), (1,), generator=generator))
        left = int(torch.randint(0, max(width // 4, 1), (1,), generator=generator))
        return top, left

    def _round(self, pixels: float) -> int:
        return max(self.size_step, int(round(pixels / self.size_step)) * self.size_step)


def encode_texts(
    models: LoadedModels, texts: list[str], clip_skip: int | None, device: str
) -> dict[str, Conditioning]:
    """Encode every distinct text once (one row each); the text encoders are not needed afterwards."""
    texts = sorted(set(texts))
    _warn_if_truncated(models, texts)
    encoded = PromptEncoder(models, clip_skip).encode(texts)
    return {text: _row(encoded, i).to(device) for i, text in enumerate(texts)}


def prompt_texts(prompts: list[PromptSettings]) -> list[str]:
    return [getattr(p, role) for p in prompts for role in ("target", *ROLES)]


def prepare_prompts(
    prompts: list[PromptSettings], by_text: dict[str, Conditioning], models: LoadedModels, train: TrainConfig
) -> list[PreparedPrompt]:
    size_step = models.vae_scale_factor * 2 ** (len(models.unet.config.block_out_channels) - 1)
    prepared = []
    for number, settings in enumerate(prompts, start=1):
        resolution = settings.resolution or train.resolution or models.resolution
        if resolution % size_step:
            raise LecoError(
                f"prompts entry {number}: resolution {resolution} is not a multiple of {size_step} "
                f"(this model's latent grid); use e.g. {max(size_step, resolution // size_step * size_step)}"
            )
        # One teacher row per distinct text: with neutral == unconditional (the default) only two.
        distinct = list(dict.fromkeys(getattr(settings, role) for role in ROLES))
        prepared.append(
            PreparedPrompt(
                settings=settings,
                target=by_text[settings.target],
                unconditional=by_text[settings.unconditional],
                teacher=Conditioning.cat([by_text[text] for text in distinct]),
                teacher_rows={role: distinct.index(getattr(settings, role)) for role in ROLES},
                resolution=resolution,
                batch_size=settings.batch_size or train.batch_size or 1,
                size_step=size_step,
            )
        )
    return prepared


def conditioning_for(
    embeds: Conditioning, batch: int, height: int, width: int, crop: tuple[int, int], sdxl: bool
) -> Conditioning:
    """Repeat a condition over the batch; SDXL also gets its size ids."""
    cond = embeds.repeat(batch)
    if sdxl:
        cond = cond.with_time_ids(sdxl_time_ids(height, width, *crop))
    return cond


def _row(cond: Conditioning, index: int) -> Conditioning:
    return Conditioning(*(None if t is None else t[index : index + 1] for t in cond._tensors()))


def _warn_if_truncated(models: LoadedModels, texts: list[str]) -> None:
    tokenizer = models.tokenizers[0]
    for text in texts:
        if len(tokenizer(text).input_ids) > tokenizer.model_max_length:
            print(
                f"leco: warning: prompt {text[:40]!r}... is longer than {tokenizer.model_max_length} tokens "
                "and is cut there"
            )
