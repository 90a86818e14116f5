"""Concept transplant across model families, measured on the two bundled models.

Task `purple` / `teal`: the student ink-digits (SD 1.x layout, epsilon) has the word but has never
drawn the ink; the teacher ink-digits-2 (SD 2.x layout, v-prediction) draws it. For each recipe
(trained over several seeds), prints: the ink detected on every digit in each phrasing, the
phrasings it was trained on and those it was not, the digit right in those images, and every other
digit and ink of the student kept (`keep: all`: mean, worst concept in a seed, drift).

Task `erase7-sd2` is the other direction: student ink-digits-2 (SD 2.x, v), teacher ink-digits
(SD 1.x, epsilon): seven erased from the student with the teacher's idea of a seven.

usage: python benchmarks/transplant.py [--tasks purple,teal,erase7-sd2] [--recipes example,...]
                                       [--seeds 0,1] [--images 4] [--json results.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from recipe_runs import ink_digits_spec, parse, print_table, recipe_parser, train_fully

from leco.cli import quiet_libraries
from leco.config import LecoConfig
from leco.evaluate import EvalSpec, evaluate
from leco.ink_digits import INK_DIGITS
from leco.ink_digits.data import (
    ALL_INKS,
    DIGIT_PHRASINGS,
    INK_PHRASINGS,
    MODEL_INKS,
    PHRASING_NAMES,
    caption,
)
from leco.models import load_models

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ink-digits" / "transplant_purple.yaml"
HELD_OUT = "number"  # the phrasing the `held-out` recipes never train on
ERASE_TASK = "erase7-sd2"
ERASE_RECIPES = ("example", "self")  # with ink-digits as the teacher, and without
# The inks only ink-digits-2 draws, each transplanted in turn, and the erasure taught by ink-digits.
TASKS = (*(ink for ink in ALL_INKS if ink not in MODEL_INKS[INK_DIGITS]), ERASE_TASK)


def ink_prompts(ink: str, phrasings: tuple[str, ...]) -> list[str]:
    """Every caption naming `ink` in the given phrasings (the ink-only phrasing once)."""
    return list(dict.fromkeys(caption(d, ink, p) for p in phrasings for d in range(10)))


def base_config(task: str, out: Path, seed: int) -> dict[str, Any]:
    if task == ERASE_TASK:
        return {
            "pretrained_model": {"name_or_path": "ink-digits-2"},
            "teacher": {"name_or_path": "ink-digits"},
            "prompts": [{"target": "a digit seven", "action": "erase"}, {"target": "7", "action": "erase"}],
            "anchors": {"prompts": "auto", "exclude": ["7"], "per_step": 0, "text_weight": 0.1},
            "network": {"type": "lierla", "rank": 4, "alpha": 1.0, "training_method": "xattn-strict"},
            "train": {
                "precision": "fp32",
                "iterations": 300,
                "lr": 3e-3,
                "max_denoising_steps": 25,
                "samples_per_rollout": 16,
                "seed": seed,
            },
            "save": {"name": f"s{seed}", "path": str(out), "per_steps": 10_000, "precision": "fp32"},
        }
    document = yaml.safe_load(EXAMPLE.read_text())
    entry = document["prompts"][0]
    del entry["target_file"]  # the example's prompts, written for the task's ink
    entry["target"] = ink_prompts(task, INK_PHRASINGS)
    document["train"]["seed"] = seed
    document["save"] = {"name": f"s{seed}", "path": str(out), "per_steps": 10_000, "precision": "fp32"}
    return document


def _set(path: str, value: Any) -> Callable[[dict, str], None]:
    section, key = path.split(".")
    return lambda document, task: document.setdefault(section, {}).__setitem__(key, value)


def _phrasings(*phrasings: str) -> Callable[[dict, str], None]:
    def apply(document: dict, task: str) -> None:
        document["prompts"][0]["target"] = ink_prompts(task, phrasings)

    return apply


def _doubled(phrasing: str) -> Callable[[dict, str], None]:
    """Every phrasing, and `phrasing` once more: drawn twice as often as each other."""

    def apply(document: dict, task: str) -> None:
        document["prompts"][0]["target"] = ink_prompts(task, INK_PHRASINGS) + ink_prompts(task, (phrasing,))

    return apply


def _text_anchors(weight: float, per_step: int) -> Callable[[dict, str], None]:
    def apply(document: dict, task: str) -> None:
        document["anchors"] = {"prompts": "auto", "per_step": per_step, "text_weight": weight}

    return apply


def _self_taught(document: dict, task: str) -> None:
    """No teacher: the student's own idea of the concept (what a transplant is compared with)."""
    document.pop("teacher", None)


BUT_HELD_OUT = tuple(p for p in INK_PHRASINGS if p != HELD_OUT)
EIGHT_HUNDRED = _set("train.iterations", 800)
# The previous example: anchors at weight 1, 1600 steps (teal moved blue: drift 0.042). The recipes
# below that change its phrasings or steps were measured on it.
PREVIOUS = [_set("anchors.weight", 1.0), _set("train.iterations", 1600)]

TEACHER_FIRST = "example+teacher-first"
RECIPES: dict[str, list[Callable[[dict, str], None]]] = {
    "example": [],
    "example+1600": [_set("train.iterations", 1600)],  # the anchors' weight slows the ink
    "example+weight2": [_set("anchors.weight", 2.0)],  # between the previous example's 1 and 4
    "example+weight3": [_set("anchors.weight", 3.0)],
    "example+3200": [_set("train.iterations", 3200)],  # a third more steps at the example's weight
    "example+weight2.5": [_set("anchors.weight", 2.5)],
    "example+lr2e-3": [_set("train.lr", 2e-3)],
    # More anchors in each step: more of what must stay, at the same balance of the two losses.
    "example+weight2.5+anchors8": [_set("anchors.weight", 2.5), _set("anchors.per_step", 8)],
    "example+anchors8": [_set("anchors.per_step", 8)],
    # The phrasing without the word "ink" drawn twice as often (it stayed blue for teal, seed 1).
    "example+number2x": [_doubled("number")],
    # Anchors on rollouts of their own: kept where the kept prompts' own images are made.
    "example+anchor-rollouts": [_set("anchors.rollouts", True)],
    # Twice the rank: room for the ink without crowding out the digits' shapes.
    "example+rank16": [_set("network.rank", 16), _set("network.alpha", 16.0)],
    "example+number2x+rank16": [_doubled("number"), _set("network.rank", 16), _set("network.alpha", 16.0)],
    "example+number2x+3200": [_doubled("number"), _set("train.iterations", 3200)],
    # The other words' keys and values left free: teal's "number" phrasing may read too close to blue.
    "example+no-text": [_set("anchors.text_weight", 0.0)],
    # The lr decayed to 0 by the last step (the change that lifted every seed of the distillation).
    "example+cosine": [_set("train.lr_scheduler", "cosine")],
    # The example before min-SNR weighting (train.min_snr_gamma: 5) joined it; the recipes above
    # and below were measured on that example.
    "example-without-min-snr": [_set("train.min_snr_gamma", None)],
    # Rollouts by the teacher: the student learns the teacher's prediction all along the teacher's
    # own way to a teal image, not only where its own (still blue) rollouts pass.
    "example+teacher-rollouts": [_set("teacher.rollout_share", 1.0)],
    # A share of the rollouts by each: the teacher's way to the image, and the student's own (where
    # the student must learn to draw the digit right on its own trajectory).
    "example+mixed-rollouts": [_set("teacher.rollout_share", 0.5)],
    "example+quarter-rollouts": [_set("teacher.rollout_share", 0.25)],
    TEACHER_FIRST: [],  # trained in two phases by `run`
    "example+weight2.5+anchor-rollouts": [_set("anchors.weight", 2.5), _set("anchors.rollouts", True)],
    "previous": PREVIOUS,
    "previous+800": [*PREVIOUS, EIGHT_HUNDRED],  # half the steps: the "number" phrasing lags
    "previous+anchors8": [*PREVIOUS, _set("anchors.per_step", 8)],
    # One phrasing, 800 steps and no text anchors: the example before the previous one.
    "words": [*PREVIOUS, _phrasings("words"), _text_anchors(0.0, 4), EIGHT_HUNDRED],
    # Every phrasing but one: does the transplant reach a phrasing it was not trained on?
    "held-out": [*PREVIOUS, _phrasings(*BUT_HELD_OUT), EIGHT_HUNDRED],
    "held-out+no-text": [*PREVIOUS, _phrasings(*BUT_HELD_OUT), _text_anchors(0.0, 4), EIGHT_HUNDRED],
    # Keys and values only, kept for the other words: faster, and a little less of the ink.
    "held-out+strict": [
        *PREVIOUS,
        _phrasings(*BUT_HELD_OUT),
        _text_anchors(0.1, 0),
        _set("network.training_method", "xattn-strict"),
        _set("network.rank", 16),
        _set("network.alpha", 16.0),
        _set("train.lr", 3e-3),
        EIGHT_HUNDRED,
    ],
    "self": [_self_taught],
}


def eval_spec(task: str, images: int) -> EvalSpec:
    if task == ERASE_TASK:
        erase = [
            ("a digit seven in red ink", "digit:7"),
            ("a digit seven in purple ink", "digit:7"),
            ("the number 7 written in teal", "digit:7"),
            ("a digit seven", "digit:7"),
        ]
        return ink_digits_spec(images, erase=erase)
    enhance = [(p, f"ink:{task}") for p in ink_prompts(task, INK_PHRASINGS)]
    digits = [
        (caption(d, task, p), f"digit:{d}") for p in INK_PHRASINGS if p in DIGIT_PHRASINGS for d in range(10)
    ]
    return ink_digits_spec(images, enhance=enhance, keep=digits)


def run(task: str, recipe: str, seeds: list[int], images: int, folder: Path) -> dict[str, Any]:
    files, seconds, trained_on = [], [], set()
    for seed in seeds:
        document = base_config(task, folder / f"{task}-{recipe}", seed)
        for change in RECIPES[recipe]:
            change(document, task)
        config = LecoConfig.model_validate(document)
        trained_on |= {target for entry in config.prompts for target in entry.targets}
        start = time.perf_counter()
        if recipe == TEACHER_FIRST:  # the teacher's rollouts for half the run, the student's after
            half = config.model_copy(deep=True)
            half.train.iterations //= 2
            half.teacher.rollout_share = 1.0
            result = train_fully(config, resume=train_fully(half, progress=False).state, progress=False)
        else:
            result = train_fully(config, progress=False)
        seconds.append(time.perf_counter() - start)
        files.append(result.path)
    student = load_models(document["pretrained_model"]["name_or_path"], with_vae=True)
    report = evaluate(student, files, eval_spec(task, images), "cpu", progress=False)
    return summarise(report, seconds, trained_on)


def summarise(report: dict[str, Any], seconds: list[float], trained_on: set[str]) -> dict[str, Any]:
    rows = [r for r in report["rows"] if r["strength"] == 1.0]
    before = [r for r in report["rows"] if r["strength"] == 0.0]

    def mean(selected: list[dict]) -> float:
        return float(np.mean([r["detected"] for r in selected])) if selected else float("nan")

    enhanced = [r for r in rows if r["kind"] == "enhance"]
    erased = [r for r in rows if r["kind"] == "erase"]
    edited = {r["prompt"] for r in enhanced + erased}
    digit_rows = [r for r in rows if r["kind"] == "keep" and r["prompt"] in edited]
    kept = [r for r in rows if r["kind"] == "keep" and r["prompt"] not in edited]
    worst = min(kept, key=lambda r: r["detected"])
    by_phrasing: dict[str, list[dict]] = {}
    for r in enhanced + erased:
        by_phrasing.setdefault(PHRASING_OF.get(r["prompt"], "?"), []).append(r)
    digits_by_phrasing: dict[str, list[dict]] = {}
    for r in digit_rows:
        digits_by_phrasing.setdefault(PHRASING_OF.get(r["prompt"], "?"), []).append(r)
    return {
        "by_phrasing": {phrasing: mean(selected) for phrasing, selected in by_phrasing.items()},
        "digits_by_phrasing": {phrasing: mean(selected) for phrasing, selected in digits_by_phrasing.items()},
        "concept_before": mean([r for r in before if r["kind"] in ("enhance", "erase")]),
        "concept_trained": mean([r for r in enhanced + erased if r["prompt"] in trained_on]),
        "concept_untrained": mean([r for r in enhanced + erased if r["prompt"] not in trained_on]),
        "concept_worst": min((r["detected"] for r in enhanced), default=float("nan"))
        if enhanced
        else max(r["detected"] for r in erased),
        "digit_right": mean(digit_rows),
        "kept_mean": mean(kept),
        "kept_worst": f"{worst['prompt']} [{worst['concept']}] {worst['detected']:.0%}",
        "drift": float(np.mean([r["drift"] for r in kept])),
        "train_seconds": float(np.mean(seconds)),
    }


# Which phrasing wrote a caption, for every caption either bundled model knows.
PHRASING_OF = {caption(d, ink, p): p for p in PHRASING_NAMES for d in range(10) for ink in ALL_INKS}


def format_row(task: str, recipe: str, r: dict[str, Any]) -> str:
    return (
        f"| {task} | {recipe} | {r['concept_before']:.0%} | {r['concept_trained']:.0%} | "
        f"{r['concept_untrained']:.0%} | {r['concept_worst']:.0%} | {r['digit_right']:.1%} | "
        f"{r['kept_mean']:.1%} | {r['kept_worst']} | {r['drift']:.3f} | {r['train_seconds']:.0f} |\n"
        f"|  | by phrasing: {', '.join(f'{k} {v:.0%}' for k, v in r['by_phrasing'].items())}; "
        f"digit right: {', '.join(f'{k} {v:.1%}' for k, v in r['digits_by_phrasing'].items())} |"
    )


def main() -> None:
    quiet_libraries()
    parser = recipe_parser(
        __doc__,
        tasks="purple,teal,erase7-sd2",
        recipes="example,held-out",
        seeds="0,1",
        images=4,
        recipe_help=f"for the inks ({ERASE_TASK}: {', '.join(ERASE_RECIPES)})",
    )
    args, seeds = parse(parser, RECIPES, TASKS)
    header = [
        f"seeds {seeds}, {args.images} images per prompt and strength, guidance 3, keep: all",
        "| task | recipe | concept before | after, trained prompts | after, other prompts | worst prompt "
        "| digit right | everything else kept | worst kept (one seed) | drift | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print_table(
        args,
        header,
        lambda task: list(ERASE_RECIPES) if task == ERASE_TASK else args.recipes.split(","),
        lambda task, recipe, folder: run(task, recipe, seeds, args.images, folder),
        format_row,
    )


if __name__ == "__main__":
    main()
