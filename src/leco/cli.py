"""The `leco` command: parse arguments, call the library, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from leco import __version__
from leco.errors import LecoError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leco",
        description="Train LoRAs that erase, weaken, strengthen or re-map concepts in Stable Diffusion "
        "models, from the model's own knowledge (LECO / ESD). No training images needed.",
    )
    parser.add_argument("--version", action="version", version=f"leco {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="train a LoRA from a config YAML")
    train.add_argument("config", nargs="?", help="config YAML (the reference LECO format)")
    train.add_argument("--config_file", help="the same, spelled as the reference tool spells it")
    train.add_argument("--resume", metavar="DIR", help="continue from the *_state folder a run saved")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    train.set_defaults(run=run_train)
    return parser


def run_train(args: argparse.Namespace) -> int:
    from leco.trainer import train

    config = args.config or args.config_file
    if config is None or (args.config and args.config_file):
        raise LecoError("train: give the config once: leco train CONFIG.yaml (or --config_file CONFIG.yaml)")
    result = train(config, resume=args.resume, progress=not args.no_progress)
    if result.interrupted:
        print(f"interrupted after step {result.steps}; saved {result.path}")
        print(f"continue with: leco train {config} --resume {result.state}")
        return 130
    print(f"done: {result.steps} steps; saved {result.path}")
    return 0


def quiet_libraries() -> None:
    """Keep library chatter (loading bars, notes about optional packages) out of the terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    quiet_libraries()
    try:
        return args.run(args)
    except LecoError as error:
        print(f"leco: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leco: aborted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
