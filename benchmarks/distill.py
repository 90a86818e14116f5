"""CFG distillation: guidance 1 + the distilled LoRA against the base model at guidance 3.

Trains examples/ink-digits/distill_cfg3.yaml (the "words" phrasing only) for each seed, then, on
the phrasings it never saw, compares images of the same prompt and seed: the mean absolute pixel
difference (0..1) to the base model at guidance 3, for the base at guidance 1 (the gap to close)
and for guidance 1 with the LoRA; the judge's accuracy on what each phrasing names; UNet
evaluations (batch rows) and wall time per image. Then, at the level the LoRA is trained on, the
error left: over latents of the LoRA's own guidance-1 rollouts at every denoising step, the squared
distance of its conditional prediction to the guided one, as a share of the base model's.

usage: OMP_NUM_THREADS=1 python benchmarks/distill.py [--seeds 0,1,2] [--images 4] [--strengths 1,1.5]
           [--lora FILE ...]   (judge trained files instead of training)
           [--set train.lr=3e-3 --set network.rank=16 ...]   (the example's settings, changed)
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from recipe_runs import apply_changes, positive_int, seed_list, train_fully

from leco.cli import quiet_libraries
from leco.conditioning import PromptEncoder, predict
from leco.config import load_config
from leco.generate import build_pipeline
from leco.ink_digits.data import ALL_INKS, DIGIT_PHRASINGS, INK_PHRASINGS, caption
from leco.ink_digits.judge import InkDigitsJudge
from leco.lora_files import lora_strengths
from leco.models import load_models
from leco.objectives import guided
from leco.rollout import Rollout

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ink-digits" / "distill_cfg3.yaml"
HELD_OUT = ("number", "terse", "digit-only", "number-only", "ink-only")
TRAINED = "words"  # the example's own phrasing: what the LoRA fits where it was trained (--trained)


def cases(
    inks: tuple[str, ...], phrasings: tuple[str, ...] = HELD_OUT
) -> list[tuple[str, int | None, str | None, str]]:
    """(prompt, digit it names, ink it names, phrasing) for every prompt of these phrasings."""
    result = []
    for phrasing in phrasings:
        digits = range(10) if phrasing in DIGIT_PHRASINGS else [None]
        for digit in digits:
            for ink in inks if phrasing in INK_PHRASINGS else [None]:
                result.append((caption(digit, ink, phrasing), digit, ink, phrasing))
    return result


def gap_closed_by_phrasing(
    images: np.ndarray, plain: np.ndarray, reference: np.ndarray, phrasings: list[str]
) -> str:
    """How much of the guidance-1 gap each phrasing closes: where the LoRA falls short."""
    parts = []
    for phrasing in dict.fromkeys(phrasings):
        mask = np.array([p == phrasing for p in phrasings])
        gap = np.abs(plain[mask] - reference[mask]).mean()
        parts.append(f"{phrasing} {1 - np.abs(images[mask] - reference[mask]).mean() / gap:.0%}")
    return ", ".join(parts)


@torch.no_grad()
def prediction_error_left(
    models,
    set_strength: Callable[[float], None],
    held_out: list[tuple[str, int | None, str | None, str]],
    steps: int = 25,
) -> str:
    """Per phrasing: the LoRA's squared error to the guided prediction as a share of the base model's,
    summed over one guidance-1 rollout of the LoRA per prompt and every one of its steps."""
    prompts = [case[0] for case in held_out]
    encoder = PromptEncoder(models)
    set_strength(0.0)  # the prompts as the base model reads them (a LoRA may hold text-encoder layers)
    conditional, empty = encoder.encode(prompts), encoder.encode([""] * len(prompts))
    set_strength(1.0)
    trained_conditional = encoder.encode(prompts)
    scheduler = Rollout(models.scheduler_config, "ddim", steps, False).scheduler
    scheduler.set_timesteps(steps)
    side, channels = models.resolution // models.vae_scale_factor, models.unet.config.in_channels
    latents = torch.randn(len(prompts), channels, side, side, generator=torch.Generator().manual_seed(0))
    left = torch.zeros(len(prompts))
    base = torch.zeros(len(prompts))
    for t in scheduler.timesteps:
        timesteps = t.repeat(len(prompts))
        set_strength(0.0)
        plain = predict(models.unet, latents, timesteps, conditional)
        target = guided(predict(models.unet, latents, timesteps, empty), plain, 3.0)
        set_strength(1.0)
        trained = predict(models.unet, latents, timesteps, trained_conditional)
        left += (trained - target).pow(2).flatten(1).mean(1)
        base += (plain - target).pow(2).flatten(1).mean(1)
        latents = scheduler.step(trained, t, latents).prev_sample
    phrasings = [case[3] for case in held_out]
    parts = []
    for phrasing in dict.fromkeys(phrasings):
        mask = torch.tensor([p == phrasing for p in phrasings])
        parts.append(f"{phrasing} {float(left[mask].sum() / base[mask].sum()):.2f}")
    return ", ".join(parts)


class Sampler:
    def __init__(self, models, jobs: list[tuple[str, int]]) -> None:
        self.pipe, self.jobs = build_pipeline(models), jobs
        self.rows = 0
        models.unet.register_forward_pre_hook(
            lambda module, args: setattr(self, "rows", self.rows + args[0].shape[0])
        )

    @torch.no_grad()
    def __call__(self, guidance: float) -> tuple[np.ndarray, float, float]:
        """Images [N, H, W, 3] in 0..1, UNet rows per image, seconds per image."""
        self.rows, start, images = 0, time.perf_counter(), []
        for begin in range(0, len(self.jobs), 250):
            chunk = self.jobs[begin : begin + 250]
            images.append(
                self.pipe(
                    [p for p, _ in chunk],
                    num_inference_steps=25,
                    guidance_scale=guidance,
                    generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                    output_type="np",
                ).images
            )
        seconds = time.perf_counter() - start
        return np.concatenate(images), self.rows / len(self.jobs), seconds / len(self.jobs)


def accuracy(judge: InkDigitsJudge, images: np.ndarray, named: list[tuple[int | None, str | None]]) -> float:
    reading = judge.read(images)
    hits = []
    for digit, ink, read_digit, read_ink in zip(
        *zip(*named, strict=True), reading.digits, reading.inks, strict=True
    ):
        hits.append(
            (digit is None or read_digit == digit) and (ink is None or read_ink == ALL_INKS.index(ink))
        )
    return float(np.mean(hits))


def main() -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2", help="training seeds")
    parser.add_argument("--images", type=positive_int, default=4, help="image seeds per prompt")
    parser.add_argument("--iterations", type=positive_int, help="override the example's train.iterations")
    parser.add_argument(
        "--trained",
        action="store_true",
        help="also the gap closed on the trained phrasing (not in the totals)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="change a config value"
    )
    parser.add_argument(
        "--strengths",
        default="1",
        help="LoRA strengths to sample at (comma-separated): past 1 extrapolates what the LoRA learned",
    )
    parser.add_argument(
        "--lora", action="append", default=[], help="judge this trained file instead of training (repeatable)"
    )
    args = parser.parse_args()
    training_seeds = seed_list(parser, args.seeds)  # before minutes of sampling
    try:
        strengths = [float(s) for s in args.strengths.split(",")]
    except ValueError:
        parser.error(f"--strengths: {args.strengths!r} is not a comma-separated list of numbers, e.g. 1,1.5")
    for lora in args.lora:
        if not Path(lora).is_file():
            parser.error(f"--lora: {lora} not found")
    config = load_config(EXAMPLE)
    apply_changes(config, args.set)  # a bad change stops here, before minutes of sampling
    models = load_models("ink-digits", with_vae=True)
    judge = InkDigitsJudge.load(models.source)
    inks = tuple(sorted({p.split(" in ")[1].split()[0] for p in config.prompts[0].targets}))
    held_out = cases(inks, HELD_OUT + ((TRAINED,) if args.trained else ()))
    jobs = [(p, 500 + i) for p, _, _, _ in held_out for i in range(args.images)]
    named = [(d, ink) for _, d, ink, _ in held_out for _ in range(args.images)]
    phrasings = [phrasing for *_, phrasing in held_out for _ in range(args.images)]
    sampler = Sampler(models, jobs)
    reference, rows3, seconds3 = sampler(3.0)
    plain, rows1, seconds1 = sampler(1.0)
    # The totals are over the held-out phrasings only; the trained one shows in the by-phrasing line.
    keep = np.array([p != TRAINED for p in phrasings])
    held_named = [n for n, k in zip(named, keep, strict=True) if k]
    gap = float(np.abs(plain[keep] - reference[keep]).mean())
    held = sum(phrasing != TRAINED for *_, phrasing in held_out)
    print(f"held-out phrasings {', '.join(HELD_OUT)}: {held} prompts x {args.images} seeds")
    print(
        "| model, guidance | distance to base at 3 | gap closed | judge accuracy "
        "| UNet rows/image | s/image |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| base, 3 | 0 | - | {accuracy(judge, reference[keep], held_named):.1%} | {rows3:.0f} "
        f"| {seconds3:.4f} |"
    )
    print(
        f"| base, 1 | {gap:.4f} | 0% | {accuracy(judge, plain[keep], held_named):.1%} | {rows1:.0f} "
        f"| {seconds1:.4f} |"
    )
    with tempfile.TemporaryDirectory() as folder:
        runs = [(Path(lora).name, Path(lora), None) for lora in args.lora]
        for seed in training_seeds if not args.lora else []:
            config = load_config(EXAMPLE)
            config.train.seed, config.save.path, config.save.per_steps = seed, folder + f"/{seed}", 10**9
            if args.iterations:
                config.train.iterations = args.iterations
            apply_changes(config, args.set)
            start = time.perf_counter()
            result = train_fully(config, progress=False)
            runs.append((f"seed {seed}", result.path, time.perf_counter() - start))
        for name, path, trained in runs:
            took = f" ({trained:.0f} s to train)" if trained is not None else ""
            # applied as `leco generate` applies it: UNet and text-encoder layers alike
            with lora_strengths(sampler.pipe, path, models.family) as set_strength:
                for strength in strengths:
                    set_strength(strength)
                    images, rows, seconds = sampler(1.0)
                    distance = float(np.abs(images[keep] - reference[keep]).mean())
                    by_phrasing = gap_closed_by_phrasing(images, plain, reference, phrasings)
                    at = f" at {strength:g}" if strength != 1 else ""
                    print(
                        f"| LoRA {name}{took}{at}, 1 | {distance:.4f} | {1 - distance / gap:.0%} | "
                        f"{accuracy(judge, images[keep], held_named):.1%} | {rows:.0f} | {seconds:.4f} |\n"
                        f"|  | gap closed by phrasing: {by_phrasing} |",
                        flush=True,
                    )
                fit = prediction_error_left(models, set_strength, held_out)
            print(f"|  | prediction error left at strength 1 (share of the base's): {fit} |", flush=True)


if __name__ == "__main__":
    main()
