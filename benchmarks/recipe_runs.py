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

from leco.config import apply_overrides
from leco.errors import LecoError
from leco.evaluate import ConceptPrompt, EnhancedPrompt, EvalSpec


def recipe_parser(
    description: str, *, tasks: str, recipes: str, seeds: str, images: int, recipe_help: str | None = None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default=tasks)
    parser.add_argument("--recipes", default=recipes, help=recipe_help)
    parser.add_argument("--seeds", default=seeds, help="training seeds")
    parser.add_argument("--images", type=positive_int, default=images, help="images per prompt and strength")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    return parser


def parse(
    parser: argparse.ArgumentParser, known_recipes: Collection[str], known_tasks: Collection[str]
) -> tuple[argparse.Namespace, list[int]]:
    """The arguments and the seeds; an unknown task or recipe stops here, before any training."""
    args = parser.parse_args()
    known_names(parser, "--tasks", args.tasks, known_tasks)
    known_names(parser, "--recipes", args.recipes, known_recipes)
    seeds = seed_list(parser, args.seeds)
    if args.json and not os.access(Path(args.json).resolve().parent, os.W_OK):
        parser.error(f"--json: cannot write into the folder of {args.json}; name a file in a writable folder")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    return args, seeds


def positive_int(text: str) -> int:
    """An argparse type: a whole number of 1 or more (argparse names the option with the message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more (argparse names the option)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):  # nan fails this too
        raise argparse.ArgumentTypeError(f"{text} must be a finite number of seconds, 0 or more")
    return value


def positive_ints(parser: argparse.ArgumentParser, option: str, text: str) -> list[int]:
    """A comma-separated list of whole numbers of 1 or more; anything else stops with one line."""
    try:
        return [positive_int(part) for part in text.split(",")]
    except argparse.ArgumentTypeError as error:
        parser.error(f"{option}: {error} (give e.g. 1,2,4)")


def known_names(parser: argparse.ArgumentParser, option: str, text: str, known: Collection[str]) -> list[str]:
    """Comma-separated names, each one of `known`; an unknown one stops with one line, before any work."""
    names = text.split(",")
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"{option}: {', '.join(unknown)} not known; choose from {', '.join(known)}")
    return names


def seed_list(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """--seeds as whole numbers; anything else stops with one line."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        parser.error(f"--seeds: {text!r} is not a comma-separated list of whole numbers, e.g. 0,1,2")
    if any(seed < 0 for seed in seeds):  # leco reads -1 as "draw one": a row that cannot be repeated
        parser.error(f"--seeds: {text!r}: seeds are 0 or more, so that every row can be trained again")
    return seeds


def train_fully(config: Any, **options: Any) -> Any:
    """leco.train, but a run stopped by Ctrl-C or SIGTERM (which leco.train saves and returns)
    ends the benchmark: no row is printed from a half-trained file."""
    from leco import train

    result = train(config, **options)
    if result.interrupted:
        raise SystemExit(f"interrupted at step {result.steps}; the benchmark stops (saved {result.path})")
    return result


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

    def items(pairs: list[tuple[str, str]], kind: type[ConceptPrompt] = ConceptPrompt) -> list:
        return [kind(prompt=p, concept=c) for p, c in pairs]

    return EvalSpec(
        images_per_prompt=images,
        strengths=[0.0, 1.0],
        steps=25,
        guidance=3.0,
        erase=items(erase),
        enhance=items(enhance, EnhancedPrompt),
        keep=[*items(keep), "all"],
    )


def apply_changes(config: Any, changes: list[str]) -> None:
    """`--set SECTION.KEY=VALUE` changes to the example's config, as `leco train --set` makes them."""
    try:
        apply_overrides(config, changes)
    except LecoError as error:
        raise SystemExit(str(error)) from None
