"""Is the ink-digits model any good? Generate captions with the diffusers pipeline; the judge reads them."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from leco.ink_digits import GUIDANCE, STEPS
from leco.ink_digits.data import ALL_INKS, DIGIT_PHRASINGS, INK_PHRASINGS, PHRASING_NAMES, caption
from leco.ink_digits.judge import InkDigitsJudge, trained_inks


def load_pipeline(folder: str | Path) -> StableDiffusionPipeline:
    """The model folder as an ordinary diffusers pipeline, offline."""
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seed_of(digit: int | None, ink: int | None, repeat: int) -> int:
    """A fixed seed per image; the same (digit, ink, repeat) gets the same noise in every phrasing."""
    return 100_000 * repeat + 100 * (digit if digit is not None else 10) + (ink if ink is not None else 9)


@torch.no_grad()
def measure(
    model: str | Path | StableDiffusionPipeline,
    guidance: float = GUIDANCE,
    steps: int = STEPS,
    seeds: int = 2,
    phrasings: Sequence[str] = PHRASING_NAMES,
    digits: Sequence[int] = range(10),
    inks: Sequence[str] | None = None,
    batch: int = 50,
    judge: InkDigitsJudge | None = None,
) -> dict[str, dict[str, float | int | None]]:
    """Digit and ink accuracy per phrasing, judged only on what the phrasing names.

    Every phrasing gets len(digits) x len(inks) x seeds images: a phrasing that leaves out the ink
    (or the digit) repeats each caption with more seeds instead of generating the same image again.
    `inks` defaults to the inks the model was trained on (its build_report.json says which).
    """
    pipe = model if isinstance(model, StableDiffusionPipeline) else load_pipeline(model)
    judge = judge or InkDigitsJudge.load(pipe.name_or_path)
    ink_ids = [ALL_INKS.index(ink) for ink in (trained_inks(pipe.name_or_path) if inks is None else inks)]
    results: dict[str, dict[str, float | int | None]] = {}
    for phrasing in phrasings:
        names_digit, names_ink = phrasing in DIGIT_PHRASINGS, phrasing in INK_PHRASINGS
        repeats = seeds * (1 if names_digit else len(digits)) * (1 if names_ink else len(ink_ids))
        cases = list(
            product(digits if names_digit else [None], ink_ids if names_ink else [None], range(repeats))
        )
        digit_hits, ink_hits = [], []
        for start in range(0, len(cases), batch):
            chunk = cases[start : start + batch]
            prompts = [caption(d, ALL_INKS[i] if i is not None else None, phrasing) for d, i, _ in chunk]
            generators = [torch.Generator().manual_seed(seed_of(d, i, r)) for d, i, r in chunk]
            images = pipe(
                prompts,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generators,
                output_type="np",
            ).images
            reading = judge.read(images)
            digit_hits += [p == d for p, (d, _, _) in zip(reading.digits, chunk, strict=True)]
            ink_hits += [p == i for p, (_, i, _) in zip(reading.inks, chunk, strict=True)]
        results[phrasing] = {
            "digit_accuracy": float(np.mean(digit_hits)) if names_digit else None,
            "ink_accuracy": float(np.mean(ink_hits)) if names_ink else None,
            "images": len(cases),
        }
    return results


def format_quality(results: dict[str, dict[str, float | int | None]]) -> str:
    """The per-phrasing table as markdown."""
    lines = ["| phrasing | example | images | digit accuracy | ink accuracy |", "|---|---|---|---|---|"]
    for phrasing, values in results.items():
        digit, ink = values["digit_accuracy"], values["ink_accuracy"]
        example = caption(7, "red", phrasing)
        lines.append(
            f'| {phrasing} | "{example}" | {values["images"]} | '
            f"{f'{digit:.1%}' if digit is not None else '-'} | {f'{ink:.1%}' if ink is not None else '-'} |"
        )
    return "\n".join(lines)
