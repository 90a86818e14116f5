"""python -m leco.ink_digits build|quality: retrain the bundled model, or measure it."""

from __future__ import annotations

import argparse
from pathlib import Path

from leco.ink_digits import default_model_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m leco.ink_digits", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="retrain everything, deterministically")
    build.add_argument("--out", type=Path, default=default_model_path(), help="diffusers folder to write")
    build.add_argument("--threads", type=int, default=2, help="torch threads; the weights depend on it")
    quality = commands.add_parser("quality", help="digit and ink accuracy per caption phrasing")
    quality.add_argument("--model", type=Path, default=default_model_path())
    quality.add_argument("--guidance", type=float, help="default: the recommended guidance")
    quality.add_argument("--steps", type=int, help="default: the recommended number of steps")
    quality.add_argument("--seeds", type=int, default=2, help="images per digit x ink")
    quality.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from leco.ink_digits.build import Recipe
    from leco.ink_digits.build import build as run_build
    from leco.ink_digits.quality import GUIDANCE, STEPS, format_quality, measure

    if args.command == "build":
        run_build(args.out, Recipe(threads=args.threads))
        print((args.out / "README.md").read_text())
        return
    torch.set_num_threads(args.threads)
    guidance = GUIDANCE if args.guidance is None else args.guidance
    steps = STEPS if args.steps is None else args.steps
    print(f"{args.model}: guidance {guidance:g}, {steps} steps, {args.seeds} seeds per digit x ink")
    print(format_quality(measure(args.model, guidance, steps, seeds=args.seeds)))


if __name__ == "__main__":
    main()
