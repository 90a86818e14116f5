"""Prompt entries made ready for training: their objective, texts per role, image sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from leco.conditioning import NO_EMBEDDINGS_IN_TRAINING, Conditioning, PromptEncoder, warn_if_misread
from leco.config import PromptSettings, TrainConfig
from leco.errors import LecoError, warn
from leco.models import LoadedModels
from leco.objectives import OBJECTIVES, Objective, rescaled_like_neutral

# Aspect ratios tried by dynamic_resolution, as (width, height) shares of the square's area.
ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))


@dataclass
class PreparedPrompt:
    settings: PromptSettings
    objective: Objective
    size: tuple[int, int]  # (height, width) in pixels
    batch_size: int
    size_step: int  # height and width must be multiples of this (pixels)

    @property
    def targets(self) -> list[str]:
        return self.settings.targets

    def texts(self, target: int) -> dict[str, str]:
        """The prompt text of every role (see leco.objectives) for one of the entry's targets."""
        s = self.settings
        return {
            "target": self.targets[target],
            "positive": s.role_text("positive", target),
            "unconditional": s.role_text("unconditional", target),
            "neutral": s.role_text("neutral", target),
            "empty": "",
        }

    def pick_target(self, generator: torch.Generator) -> int:
        if len(self.targets) == 1:  # draws nothing: one-prompt entries keep their random stream
            return 0
        return int(torch.randint(len(self.targets), (1,), generator=generator))

    def image_size(self, generator: torch.Generator) -> tuple[int, int]:
        """(height, width) in pixels; varies around the same area with dynamic_resolution."""
        if not self.settings.dynamic_resolution:
            return self.size
        wide, tall = ASPECTS[int(torch.randint(len(ASPECTS), (1,), generator=generator))]
        scale = math.sqrt(self.size[0] * self.size[1] / (wide * tall))
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
    models: LoadedModels,
    texts: list[str],
    clip_skip: int | None,
    device: torch.device | str,
    key: str = "pretrained_model.clip_skip",  # where clip_skip was set, for its error
    reader: str = "prompt",  # whose tokenizer reads them, in its warnings
) -> dict[str, Conditioning]:
    """Encode every distinct text once (one row each) on `device`; the encoders go back to the CPU."""
    texts = sorted(set(texts))
    warn_if_misread(models, texts, reader, embedding_hint=NO_EMBEDDINGS_IN_TRAINING)
    encoder = PromptEncoder(models, clip_skip, key)
    result = {}
    for text_encoder in models.text_encoders:
        text_encoder.to(device)
    try:
        with torch.no_grad():
            for start in range(0, len(texts), 256):  # a 10,000-line target_file stays within memory
                chunk = texts[start : start + 256]
                encoded = encoder.encode(chunk)
                result.update({text: encoded.row(i) for i, text in enumerate(chunk)})
    finally:
        for text_encoder in models.text_encoders:  # embeddings are cached: the GPU is the UNet's
            text_encoder.to("cpu")
    return result


def prompt_texts(prompts: list[PreparedPrompt], roles: tuple[str, ...] | None = None) -> list[str]:
    """Every text the entries use in the given roles (all roles by default)."""
    return [
        text
        for p in prompts
        for i in range(len(p.targets))
        for role, text in p.texts(i).items()
        if roles is None or role in roles
    ]


def objective_of(settings: PromptSettings) -> Objective:
    """The entry's objective; `rescale_target` applies where the target has a neutral to match
    (erase, enhance), other actions are told it is ignored (config.UNREAD_BY_ACTION)."""
    objective = OBJECTIVES[settings.action]
    if settings.rescale_target and settings.action in ("erase", "enhance"):
        return rescaled_like_neutral(objective)
    return objective


def prepare_prompts(
    prompts: list[PromptSettings], models: LoadedModels, train: TrainConfig
) -> list[PreparedPrompt]:
    size_step = models.vae_scale_factor * 2 ** (len(models.unet.config.block_out_channels) - 1)
    prepared = []
    for number, settings in enumerate(prompts, start=1):
        default = train.resolution or models.resolution
        size = settings.size or (default, default)
        if size[0] % size_step or size[1] % size_step:
            bad = size[0] if size[0] % size_step else size[1]
            key = f"{settings.named(number)}: resolution" if settings.size else "train.resolution:"
            raise LecoError(
                f"{key} {bad} is not a multiple of {size_step} (this model's latent grid); "
                f"use e.g. {max(size_step, bad // size_step * size_step)}"
            )
        prepared.append(
            PreparedPrompt(
                settings=settings,
                objective=objective_of(settings),
                size=size,
                batch_size=settings.batch_size or train.batch_size or 1,
                size_step=size_step,
            )
        )
    _warn_if_far_from_native(prepared, models.resolution)
    crops = [(n, p) for n, p in enumerate(prompts, start=1) if p.dynamic_crops]
    if crops and not models.family.is_sdxl:  # only SDXL is conditioned on a crop corner
        warn(
            f"{entries_named(crops)}: dynamic_crops is SDXL's crop conditioning, which "
            f"{models.family.name} lacks; ignored"
        )
    return prepared


def _warn_if_far_from_native(prepared: list[PreparedPrompt], native: int) -> None:
    # A kohya prompt file without `resolution` means 512 px whatever the model: on a small model
    # that makes every step hundreds of times slower, and the concept is drawn far off its size.
    far = [
        (n, p)
        for n, p in enumerate(prepared, start=1)
        if max(p.size) >= 4 * native or min(p.size) * 4 <= native
    ]
    if far:
        (height, width), named = far[0][1].size, entries_named([(n, p.settings) for n, p in far])
        warn(
            f"{named} train at {height}x{width} px; this model draws at "
            f"{native} px: set `resolution: {native}` in the prompt entries (a kohya prompt file without "
            f"`resolution` means 512: write `resolution = {native}` at its top, or in its [slider] table; "
            f"an ai-toolkit job: `slider.resolutions: [[{native}, {native}]]`)"
        )


def entries_named(entries: list[tuple[int, PromptSettings]]) -> str:
    """Several entries as messages name them: "prompts entries 1, 2", or where they were written."""
    names = list(dict.fromkeys(entry.named(number) for number, entry in entries))
    if len(names) == 1:
        return names[0]
    # "prompts entry 1" or "prompts.yaml: entry 1": one opening, then the numbers
    openings = {name.rpartition("entry ")[0] for name in names}
    if len(openings) == 1 and all("entry " in name for name in names):
        opening = openings.pop()
        return f"{opening}entries " + ", ".join(name.rpartition("entry ")[2] for name in names)
    return "; ".join(names)
