"""python -m leco.ink_digits build|quality: retrain the bundled models, or measure them."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from leco.errors import LecoError
from leco.files import check_output
from leco.ink_digits import INK_DIGITS, INK_DIGITS_2, MODEL_NAMES, model_path


def _whole(low: int, high: int | None = None):
    """An argparse type: a whole number from `low` (to `high`), else argparse's one-line error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{value}: use {low} to {high}" if high else f"{value}: use {low} or more"
            )
        return value

    return parse


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 100:  # nan fails both comparisons
        raise argparse.ArgumentTypeError(f"{text}: use a guidance scale from 0 to 100, e.g. 3")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m leco.ink_digits", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build", help="retrain deterministically: ink-digits, then ink-digits-2 on its VAE (or --model)"
    )
    build.add_argument("--model", choices=MODEL_NAMES, help="build only this model (default: both, in order)")
    build.add_argument("--out", type=Path, help="folder to write (with --model; default: the shipped one)")
    build.add_argument(
        "--base", type=Path, help="ink-digits folder whose VAE ink-digits-2 reuses (default: the shipped one)"
    )
    build.add_argument("--threads", type=_whole(1), default=2, help="torch threads; the weights depend on it")
    quality = commands.add_parser("quality", help="digit and ink accuracy per caption phrasing")
    quality.add_argument(
        "--model", help=f"{' or '.join(MODEL_NAMES)} or a model folder (default: both bundled models)"
    )
    quality.add_argument("--guidance", type=_guidance, help="default: the recommended guidance")
    quality.add_argument("--steps", type=_whole(1, 1000), help="default: the recommended number of steps")
    quality.add_argument("--seeds", type=_whole(1), default=2, help="images per digit x ink")
    quality.add_argument("--threads", type=_whole(1), default=2)
    return parser


def main(argv: list[str] | None = None) -> None:
    # Before torch loads OpenMP: threads that spin while waiting for a descheduled partner made the
    # build ten times slower on a busy machine. The wait policy does not change any result.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "build" and args.out is not None and args.model is None:
        parser.error("build --out: name the model it is for with --model")
    try:
        run_build(args) if args.command == "build" else run_quality(args)
    except LecoError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def run_build(args: argparse.Namespace) -> None:
    from leco.ink_digits.build import Recipe, build
    from leco.ink_digits.build2 import Recipe2, build2

    names = [args.model] if args.model else list(MODEL_NAMES)
    if args.out is not None:  # before an hour of training: a folder of other files is never replaced
        check_output(args.out, overwrite=True, folder_marker="model_index.json")
        if args.out.is_file():
            raise LecoError(f"--out: {args.out} is a file; name a folder for the model")
    for name in names:
        out = args.out or model_path(name)
        if name == INK_DIGITS:
            build(out, Recipe(threads=args.threads))
        else:
            build2(out, Recipe2(threads=args.threads), base=args.base or model_path(INK_DIGITS))
        print((out / "README.md").read_text())


def run_quality(args: argparse.Namespace) -> None:
    from leco.ink_digits import GUIDANCE, STEPS
    from leco.ink_digits.quality import format_quality, measure
    from leco.ink_digits.training import torch_threads

    guidance = GUIDANCE if args.guidance is None else args.guidance
    steps = STEPS if args.steps is None else args.steps
    names = [args.model] if args.model else [INK_DIGITS, INK_DIGITS_2]
    for name in names:
        folder = model_path(name) if name in MODEL_NAMES else Path(name)
        if not (folder / "model_index.json").is_file():
            known = " nor ".join(MODEL_NAMES)
            raise LecoError(
                f"quality --model: {name!r} is neither {known} nor a model folder (one with model_index.json)"
            )
        print(f"{folder}: guidance {guidance:g}, {steps} steps, {args.seeds} seeds per digit x ink")
        with torch_threads(args.threads):  # the caller (a test, a notebook) keeps its own setting
            print(format_quality(measure(folder, guidance, steps, seeds=args.seeds)))


if __name__ == "__main__":
    main()
