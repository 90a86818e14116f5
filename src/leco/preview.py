"""Preview grids while training: strengths x prompts x seeds of the LoRA (or embedding) as it is now."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import torch

from leco.config import PreviewConfig
from leco.errors import is_main_process, warn
from leco.files import is_disk_full
from leco.generate import SamplingSettings, build_pipeline, generate, requests_for
from leco.images import make_grid, save_image
from leco.models import LoadedModels
from leco.trainable import Trainable


def preview_size(preview: PreviewConfig, size: tuple[int, int]) -> tuple[int, int]:
    """The training size, rounded up to the multiples of 8 diffusers' pipelines need (with a note)."""
    rounded = (-(-size[0] // 8) * 8, -(-size[1] // 8) * 8)
    if preview.prompts and rounded != size and is_main_process():  # once, not per process
        warn(
            f"preview: drawn at {rounded[0]}x{rounded[1]}, the training resolution "
            f"{size[0]}x{size[1]} rounded up to multiples of 8 (as diffusers' pipelines need)"
        )
    return rounded


@torch.no_grad()
def render_preview(
    models: LoadedModels,
    trainable: Trainable,
    preview: PreviewConfig,
    size: tuple[int, int],
    path: Path,
    device: torch.device,
    autocast: AbstractContextManager,
    clip_skip: int | None,
    sampling: tuple[int, float],
) -> Path | None:
    """Render the grid with the models' own pipeline and write it to `path` (PNG); None, with a
    warning, where it cannot be written: a grid is for looking at, and a folder gone read-only must
    not end the run (a full disk does: the next save would fail too). `sampling`: the (steps, guidance)
    to draw at, the preview section's or the model's own (PreviewConfig.sampling)."""
    parts = [*models.text_encoders, models.vae]
    placed = [next(part.parameters()).device for part in parts]
    for part in parts:
        part.to(device)
    pipe = build_pipeline(models)
    images = {}
    try:
        with autocast:
            for strength in preview.strengths:  # an embedding's strength is its use in the negative prompt
                settings = SamplingSettings(
                    *sampling,
                    *size,
                    trainable.negative_prompt(strength),
                    clip_skip=clip_skip or 1,
                )
                requests = requests_for(preview.prompts, [strength], preview.seeds)
                with trainable.strength(strength):
                    drawn = generate(
                        pipe, requests, settings, lambda value: None, progress=False, refuse_nan=False
                    )
                    images.update(drawn)
    finally:
        for part, where in zip(parts, placed, strict=True):
            part.to(where)
    ordered = {r: images[r] for r in requests_for(preview.prompts, preview.strengths, preview.seeds)}
    try:
        return save_image(make_grid(ordered).image, path)
    except OSError as error:
        if is_disk_full(error):
            raise
        warn(f"preview {path} not written ({error.strerror or error}); the trained files are saved as usual")
        return None
