"""What the recipe benchmarks share: the command line (tasks x recipes, trained over seeds, judged with
images) and the loop that prints one table row per task and recipe."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ValidationError

from leco.evaluate import ConceptPrompt, EvalSpec


def recipe_parser(
    description: str, *, tasks: str, recipes: str, seeds: str, images: int, recipe_help: str | None = None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default=tasks)
    parser.add_argument("--recipes", default=recipes, help=recipe_help)
    parser.add_argument("--seeds", default=seeds, help="training seeds")
    parser.add_argument("--images", type=int, default=images, help="images per prompt and strength")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    return parser


def parse(
    parser: argparse.ArgumentParser, known_recipes: Collection[str], known_tasks: Collection[str]
) -> tuple[argparse.Namespace, list[int]]:
    """The arguments and the seeds; an unknown task or recipe stops here, before any training."""
    args = parser.parse_args()
    unknown_tasks = [t for t in args.tasks.split(",") if t not in known_tasks]
    if unknown_tasks:
        parser.error(f"--tasks: {', '.join(unknown_tasks)} not known; choose from {', '.join(known_tasks)}")
    unknown = [r for r in args.recipes.split(",") if r not in known_recipes]
    if unknown:
        parser.error(f"--recipes: {', '.join(unknown)} not known; choose from {', '.join(known_recipes)}")
    seeds = seed_list(parser, args.seeds)
    if args.images < 1:
        parser.error(f"--images: {args.images} must be 1 or more")
    if args.json and not os.access(Path(args.json).resolve().parent, os.W_OK):
        parser.error(f"--json: cannot write into the folder of {args.json}; name a file in a writable folder")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    return args, seeds


def seed_list(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """--seeds as whole numbers; anything else stops with one line."""
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        parser.error(f"--seeds: {text!r} is not a comma-separated list of whole numbers, e.g. 0,1,2")


def print_table(
    args: argparse.Namespace,
    header: list[str],
    recipes_of: Callable[[str], list[str]],
    measure: Callable[[str, str, Path], dict[str, Any]],
    format_row: Callable[[str, str, dict[str, Any]], str],
) -> None:
    """One row per task and recipe, printed as it is measured; every figure to --json at the end."""
    print("\n".join(header))
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as folder:
        for task in args.tasks.split(","):
            for recipe in recipes_of(task):
                results[f"{task}/{recipe}"] = result = measure(task, recipe, Path(folder))
                print(format_row(task, recipe, result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def ink_digits_spec(
    images: int,
    erase: list[tuple[str, str]] = (),
    enhance: list[tuple[str, str]] = (),
    keep: list[tuple[str, str]] = (),
) -> EvalSpec:
    """(prompt, concept) pairs judged at ink-digits' settings, strength 1 against 0, with `keep: all`."""

    def items(pairs: list[tuple[str, str]]) -> list[ConceptPrompt]:
        return [ConceptPrompt(prompt=p, concept=c) for p, c in pairs]

    return EvalSpec(
        images_per_prompt=images,
        strengths=[0.0, 1.0],
        steps=25,
        guidance=3.0,
        erase=items(erase),
        enhance=items(enhance),
        keep=[*items(keep), "all"],
    )


def apply_changes(config: Any, changes: list[str]) -> None:
    """`section.key=value` changes, the value read as YAML (`anchors.prompts=[""]`), checked and
    converted by the section's own pydantic model."""
    for change in changes:
        key, equals, value = change.partition("=")
        name, dot, field = key.partition(".")
        section = getattr(config, name, None)
        if not (equals and dot and isinstance(section, BaseModel)):
            raise SystemExit(f"--set {change!r}: give SECTION.KEY=VALUE, e.g. train.lr=3e-3")
        try:
            updated = type(section).model_validate({**section.model_dump(), field: yaml.safe_load(value)})
        except (ValidationError, yaml.YAMLError) as error:
            reason = error.errors()[0]["msg"] if isinstance(error, ValidationError) else "not valid YAML"
            raise SystemExit(f"--set {change!r}: {reason}") from None
        setattr(config, name, updated)
