"""Erase only what is asked: erased vs everything else, per recipe, over several training seeds.

For each task (erase 1, 3, 5 or 8 digits, or one ink) and recipe, trains one LoRA per seed on the
bundled ink-digits model, judges all of them in one `leco eval` with `keep: all` (every other
digit in every ink, every ink), and prints: erased concepts still detected (mean, worst row),
everything else still right (mean, worst concept, worst seed), inks kept, the kept prompts'
images that read as before (`leco eval`'s unchanged: mean, worst seed), drift and training time.

usage: python benchmarks/specificity.py [--tasks 1,3,5,8,ink,d0,...,d9] [--recipes default,anchors,...]
                                        [--seeds 0,1,2] [--images 8] [--json results.json]
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
from recipe_runs import ink_digits_spec, parse, print_table, recipe_parser, train_fully

from leco.cli import quiet_libraries
from leco.config import LecoConfig
from leco.evaluate import EvalSpec, evaluate
from leco.ink_digits.data import DIGIT_WORDS
from leco.models import load_models

TASKS: dict[str, list[int] | str] = {
    "1": [7],
    "3": [3, 5, 8],
    "5": [0, 2, 4, 6, 9],
    "8": [0, 1, 2, 3, 4, 5, 6, 7],
    "ink": "red",
    # Each digit alone ("d0" ... "d9"): the erase-seven recipe aimed at every other digit.
    **{f"d{d}": [d] for d in range(10)},
}
BASE_STEPS = 300  # the erase-seven example's


def base_config(task: list[int] | str, out: Path, seed: int) -> dict[str, Any]:
    """Today's example settings: erase_seven.yaml for digits, erase_red.yaml for the ink."""
    if isinstance(task, str):
        prompts = [{"target": f"{task} ink", "action": "erase", "guidance_scale": 2.0}]
        network = {"type": "lierla", "rank": 4, "alpha": 1.0, "training_method": "noxattn"}
        anchors = {"prompts": ["black ink", "orange ink", "blue ink", "green ink"]}
    else:
        prompts = [{"target": f"a digit {DIGIT_WORDS[d]}", "action": "erase"} for d in task]
        network = {"type": "lierla", "rank": 4, "alpha": 1.0, "training_method": "xattn"}
        anchors = {}
    return {
        "pretrained_model": {"name_or_path": "ink-digits"},
        "prompts": prompts,
        "network": network,
        "anchors": anchors,
        "train": {
            "precision": "fp32",
            "iterations": BASE_STEPS,
            "lr": 3e-3,
            "max_denoising_steps": 25,
            "samples_per_rollout": 4,
            "seed": seed,
        },
        "save": {"name": f"s{seed}", "path": str(out), "per_steps": 10_000, "precision": "fp32"},
    }


def synonyms(task: list[int] | str) -> list[str]:
    """Words of the same concepts that a word filter cannot guess (for anchors: auto)."""
    return [] if isinstance(task, str) else [str(d) for d in task]


def _set(path: str, value: Any) -> Callable[[dict, Any], None]:
    section, key = path.split(".")
    return lambda c, task: c[section].__setitem__(key, value)


def _auto_anchors(per_step: int = 4, weight: float = 1.0) -> Callable[[dict, Any], None]:
    def apply(config: dict, task: Any) -> None:
        config["anchors"] = {
            "prompts": "auto",
            "exclude": synonyms(task),
            "per_step": per_step,
            "weight": weight,
        }

    return apply


def _text_anchors(weight: float) -> Callable[[dict, Any], None]:
    """Auto anchors kept through their text states alone (anchors.text_weight), on keys and values."""

    def apply(config: dict, task: Any) -> None:
        config["anchors"] = {
            "prompts": "auto",
            "exclude": synonyms(task),
            "per_step": 0,
            "text_weight": weight,
        }
        config["network"]["training_method"] = "xattn-strict"

    return apply


def _scaled_steps(config: dict, task: Any) -> None:
    concepts = 1 if isinstance(task, str) else len(task)
    config["train"]["iterations"] = BASE_STEPS * concepts


def _scaled_steps_twice(config: dict, task: Any) -> None:
    concepts = 1 if isinstance(task, str) else len(task)
    config["train"]["iterations"] = 2 * BASE_STEPS * concepts


def _closed_form(config: dict, task: Any) -> None:
    config["train"]["method"] = "closed_form"
    config["network"] = {"type": "lierla", "rank": 8}
    config["anchors"] = {"prompts": "auto", "exclude": synonyms(task)}
    if isinstance(task, str):
        config["prompts"] = [{"target": f"{task} ink", "action": "erase"}]


RECIPES: dict[str, list[Callable[[dict, Any], None]]] = {
    "default": [],
    "anchors": [_auto_anchors()],
    "anchors1": [_auto_anchors(per_step=1)],
    "anchors1+m16": [_auto_anchors(per_step=1), _set("train.samples_per_rollout", 16)],
    "anchors+m16": [_auto_anchors(), _set("train.samples_per_rollout", 16)],
    "noxattn": [_set("network.training_method", "noxattn")],
    "full": [_set("network.training_method", "full")],
    "rank1": [_set("network.rank", 1)],
    "rank8": [_set("network.rank", 8)],
    "lr1e-3": [_set("train.lr", 1e-3)],
    "steps150": [_set("train.iterations", 150)],
    "scaled": [_scaled_steps],
    "anchors+scaled": [_auto_anchors(), _scaled_steps],
    "anchors1+m16+scaled": [_auto_anchors(per_step=1), _set("train.samples_per_rollout", 16), _scaled_steps],
    "closed-form": [_closed_form],
    # The LoRA on the text encoder (it reads each prompt whole), with auto anchors riding along and
    # kept through their text states too.
    "te+anchors": [_set("network.training_method", "text-encoder"), _auto_anchors()],
    "te+anchors+text0.1": [
        _set("network.training_method", "text-encoder"),
        _auto_anchors(),
        lambda config, task: config["anchors"].__setitem__("text_weight", 0.1),
    ],
    **{f"text{w:g}+strict": [_text_anchors(w)] for w in (0.1, 1, 10)},
    **{
        f"text{w:g}+strict+m16+scaled": [
            _text_anchors(w),
            _set("train.samples_per_rollout", 16),
            _scaled_steps,
        ]
        for w in (0.1, 1)
    },
    "text0.1+strict+m16": [_text_anchors(0.1), _set("train.samples_per_rollout", 16)],
    "text0.1+strict+m16+scaled2": [
        _text_anchors(0.1),
        _set("train.samples_per_rollout", 16),
        _scaled_steps_twice,
    ],
    "anchors1+text1": [_auto_anchors(per_step=1), _set("anchors.text_weight", 1.0)],
    # Rank 4 is fewer directions than five concepts: one per concept and more.
    **{
        f"text0.1+strict+m16+scaled+rank{rank}": [
            _text_anchors(0.1),
            _set("train.samples_per_rollout", 16),
            _scaled_steps,
            _set("network.rank", rank),
            _set("network.alpha", float(rank) / 4),
        ]
        for rank in (8, 16, 32)
    },
    "text0.1+strict+m16+scaled2+rank32": [
        _text_anchors(0.1),
        _set("train.samples_per_rollout", 16),
        _scaled_steps_twice,
        _set("network.rank", 32),
        _set("network.alpha", 8.0),
    ],
    # Entries drawn independently per rollout (before shuffled rounds became the default).
    "text0.1+strict+m16+scaled+rank16+random": [
        _text_anchors(0.1),
        _set("train.samples_per_rollout", 16),
        _scaled_steps,
        _set("network.rank", 16),
        _set("network.alpha", 4.0),
        _set("train.entry_order", "random"),
    ],
}


def eval_spec(task: list[int] | str, images: int) -> EvalSpec:
    if isinstance(task, str):
        erase = [
            ("a digit two in red ink", "ink:red"),
            ("the number 8 written in red", "ink:red"),
            ("5, red ink", "ink:red"),
            ("red ink", "ink:red"),
        ]
    else:
        erase = []
        for d in task:
            word = DIGIT_WORDS[d]
            erase += [
                (f"a digit {word} in red ink", f"digit:{d}"),
                (f"a digit {word} in blue ink", f"digit:{d}"),
                (f"the number {d} written in green", f"digit:{d}"),  # a paraphrase never trained on
                (f"a digit {word}", f"digit:{d}"),
            ]
    return ink_digits_spec(images, erase=erase)


def run(task_name: str, recipe: str, seeds: list[int], images: int, models, folder: Path) -> dict[str, Any]:
    task = TASKS[task_name]
    files, seconds = [], []
    for seed in seeds:
        document = base_config(task, folder / f"{task_name}-{recipe}", seed)
        for change in RECIPES[recipe]:
            change(document, task)
        start = time.perf_counter()
        result = train_fully(LecoConfig.model_validate(document), progress=False)
        seconds.append(time.perf_counter() - start)
        files.append(result.path)
    report = evaluate(models, files, eval_spec(task, images), "cpu", progress=False)
    return summarise(report, seconds)


def summarise(report: dict[str, Any], seconds: list[float]) -> dict[str, Any]:
    rows = [r for r in report["rows"] if r["strength"] == 1.0]
    labels = list(report["loras"])

    def per_seed(kind: str, select: Callable[[dict], bool] = lambda r: True) -> list[float]:
        return [
            float(
                np.mean(
                    [r["detected"] for r in rows if r["lora"] == label and r["kind"] == kind and select(r)]
                )
            )
            for label in labels
        ]

    kept_rows: dict[str, list[float]] = {}
    for r in rows:
        if r["kind"] == "keep":
            kept_rows.setdefault(f"{r['prompt']} [{r['concept']}]", []).append(r["detected"])
    # The worst case: one kept concept in one training seed.
    worst_concept = min(kept_rows, key=lambda k: min(kept_rows[k]))
    erased, kept = per_seed("erase"), per_seed("keep")
    inks = per_seed("keep", lambda r: "ink:" in r["concept"])
    # An erased concept (all its prompts) in one training seed.
    erased_concepts: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["kind"] == "erase":
            erased_concepts.setdefault((r["concept"], r["lora"]), []).append(r["detected"])
    worst_erased = max(erased_concepts, key=lambda k: np.mean(erased_concepts[k]))
    erased_worst_row = max((r["detected"] for r in rows if r["kind"] == "erase"), default=float("nan"))
    # What the kept prompts' images read as, digit and ink, against the plain model's (same seed).
    unchanged = [report["per_lora"][label]["1"]["kept_unchanged"] for label in labels]
    return {
        "erased_mean": float(np.mean(erased)),
        "erased_worst_seed": max(erased),
        "erased_worst_row": erased_worst_row,
        "erased_worst_concept": worst_erased[0],
        "erased_worst_concept_value": float(np.mean(erased_concepts[worst_erased])),
        "kept_mean": float(np.mean(kept)),
        "kept_worst_seed": min(kept),
        "kept_worst_concept": worst_concept,
        "kept_worst_concept_value": float(min(kept_rows[worst_concept])),
        "ink_kept_mean": float(np.mean(inks)) if inks else float("nan"),
        "unchanged_mean": float(np.mean(unchanged)),
        "unchanged_worst_seed": min(unchanged),
        "drift": float(np.mean([r["drift"] for r in rows if r["kind"] == "keep"])),
        "train_seconds": float(np.mean(seconds)),
    }


def format_row(task: str, recipe: str, r: dict[str, Any]) -> str:
    return (
        f"| {task} | {recipe} | {r['erased_mean']:.0%} / {r['erased_worst_seed']:.0%} / "
        f"{r['erased_worst_concept']} {r['erased_worst_concept_value']:.0%} | "
        f"{r['kept_mean']:.1%} / {r['kept_worst_seed']:.1%} | "
        f"{r['kept_worst_concept']} {r['kept_worst_concept_value']:.0%} | {r['ink_kept_mean']:.1%} | "
        f"{r['unchanged_mean']:.1%} / {r['unchanged_worst_seed']:.1%} | {r['drift']:.3f} | "
        f"{r['train_seconds']:.1f} |"
    )


def main() -> None:
    quiet_libraries()
    parser = recipe_parser(__doc__, tasks="1,3,5,8,ink", recipes=",".join(RECIPES), seeds="0,1,2", images=8)
    args, seeds = parse(parser, RECIPES, TASKS)
    models = load_models("ink-digits", with_vae=True)
    header = [
        f"seeds {seeds}, {args.images} images per prompt and strength, strength 1 vs 0, keep: all",
        "| task | recipe | erased still detected: mean / worst seed / worst concept in a seed "
        "| kept right: mean / worst seed | worst kept concept (worst seed) | inks kept "
        "| unchanged: mean / worst seed | drift | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print_table(
        args,
        header,
        lambda task: args.recipes.split(","),
        lambda task, recipe, folder: run(task, recipe, seeds, args.images, models, folder),
        format_row,
    )


if __name__ == "__main__":
    main()
