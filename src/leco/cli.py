"""The `leco` command: parse arguments, call the library, print. Nothing else lives here."""

from __future__ import annotations

import argparse
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
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except LecoError as error:
        print(f"leco: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
