"""The `leco` command: parse arguments, call the library, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from leco import __version__
from leco.errors import LecoError

NUMERIC_LIST_OPTIONS = ("--strengths",)


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

    generate = commands.add_parser("generate", help="images at several LoRA strengths, and a labelled grid")
    generate.add_argument("--model", required=True, help="repo id, diffusers folder or .safetensors file")
    generate.add_argument("--lora", help="LoRA .safetensors (kohya format); omit for the plain model")
    generate.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    generate.add_argument("--strengths", default="-1,0,1", help="LoRA strengths, e.g. -1,0,1 (default)")
    generate.add_argument("--seeds", default="0", help="e.g. 0-7 or 1,4,9 (default 0)")
    generate.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    generate.add_argument("--guidance", type=float, default=7.0, help="CFG scale (default 7)")
    generate.add_argument("--height", type=int)
    generate.add_argument("--width", type=int)
    generate.add_argument("--negative", default="", help="negative prompt")
    generate.add_argument(
        "--sampler", default="model", help="model (its own scheduler), ddim, euler, euler_a, dpm++"
    )
    generate.add_argument("--device", default="auto")
    generate.add_argument("--allow-pickle", action="store_true", help="allow loading a .ckpt model")
    generate.add_argument("--out", default="generated", help="output folder (default ./generated)")
    generate.add_argument("--no-progress", action="store_true")
    generate.set_defaults(run=run_generate)

    evaluate = commands.add_parser("eval", help="how much of the concept is gone, how much else is unchanged")
    evaluate.add_argument("--model", required=True, help="repo id, diffusers folder or .safetensors file")
    evaluate.add_argument("--lora", help="LoRA to judge (omit to judge the plain model)")
    evaluate.add_argument("--spec", required=True, help="eval spec YAML (prompts, concepts, detector)")
    evaluate.add_argument(
        "--out", default="eval_report.json", help="JSON report (default ./eval_report.json)"
    )
    evaluate.add_argument("--images", help="also save every generated image into this folder")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--allow-pickle", action="store_true", help="allow loading a .ckpt model")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(run=run_eval)
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


def load_for_images(args: argparse.Namespace):
    import torch

    from leco.config import PretrainedModelConfig
    from leco.models import load_models, pick_device

    device = pick_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    spec = PretrainedModelConfig(name_or_path=args.model, allow_pickle=args.allow_pickle)
    return load_models(spec, dtype=dtype, with_vae=True), device


def run_eval(args: argparse.Namespace) -> int:
    from leco.evaluate import evaluate, format_report, load_spec, write_report

    spec = load_spec(args.spec)
    models, device = load_for_images(args)
    report = evaluate(models, args.lora, spec, device, image_dir=args.images, progress=not args.no_progress)
    print(format_report(report))
    print(f"report: {write_report(report, args.out)}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from leco.generate import SamplingSettings, parse_seeds, parse_strengths, requests_for, run_generation

    models, device = load_for_images(args)
    requests = requests_for(args.prompt, parse_strengths(args.strengths), parse_seeds(args.seeds))
    settings = SamplingSettings(
        args.steps, args.guidance, args.height, args.width, args.negative, args.sampler
    )
    paths, grid = run_generation(
        models, args.lora, requests, settings, args.out, device, not args.no_progress
    )
    print(f"wrote {len(paths)} images and {grid}")
    return 0


def quiet_libraries() -> None:
    """Keep library chatter (loading bars, notes about optional packages) out of the terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _join_negative_values(argv: list[str]) -> list[str]:
    # argparse reads "--strengths -1,0,1" as two options; users write it that way, so join them.
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] in NUMERIC_LIST_OPTIONS and re.match(r"-\.?\d", arg):
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
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
