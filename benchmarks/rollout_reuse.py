"""Choosing samples_per_rollout: erasure quality and wall time for several m, on ink-digits.

Trains the erase-seven example with each m (same seed, same number of steps), then runs the
example's eval spec on each LoRA. More reuse is faster (fewer rollout UNet calls per step) but
its latents come from an older LoRA and from one trajectory; this prints whether that costs
erasure or preservation.

usage: python benchmarks/rollout_reuse.py [--reuse 1,2,4,8] [--iterations 300] [--images 16]
           [--threads N] [--example erase_seven]   (another example of examples/ink-digits, by name)
"""

from __future__ import annotations

import os

# Library notes about optional packages would bury the table; read when the libraries are imported.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from recipe_runs import positive_int, positive_ints, train_fully

from leco.cli import quiet_libraries
from leco.config import load_config
from leco.evaluate import evaluate, load_spec
from leco.models import load_models

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "ink-digits"


class UNetCalls:
    """Counts the forward calls of every UNet while open (the run loads its own: a global hook)."""

    def __enter__(self) -> UNetCalls:
        self.calls = 0
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self._count)
        return self

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, UNet2DConditionModel):
            self.calls += 1

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def main() -> None:
    quiet_libraries()  # no loading bars between the table's rows
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reuse", default="1,2,4,8")
    parser.add_argument("--iterations", type=positive_int, default=None, help="default: the example's")
    parser.add_argument("--images", type=positive_int, default=16, help="images per eval prompt")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument(
        "--example", default="erase_seven", help="an example of examples/ink-digits, by name (no .yaml)"
    )
    args = parser.parse_args()
    reuses = positive_ints(parser, "--reuse", args.reuse)
    for needed in (f"{args.example}.yaml", f"{args.example}_eval.yaml"):
        if not (EXAMPLES / needed).is_file():
            parser.error(f"--example: {EXAMPLES / needed} does not exist; name an example, e.g. erase_seven")
    torch.set_num_threads(args.threads)
    spec = load_spec(EXAMPLES / f"{args.example}_eval.yaml")
    spec.images_per_prompt = args.images
    header = f"{'m':>3}{'train s':>9}{'UNet calls/step':>17}{'erased: detected':>18}{'kept: right':>13}"
    print(header + f"{'kept drift':>12}")
    with tempfile.TemporaryDirectory() as out:
        for reuse in reuses:
            config = load_config(EXAMPLES / f"{args.example}.yaml")
            config.train.samples_per_rollout = reuse
            config.train.iterations = args.iterations or config.train.iterations
            config.save.path, config.save.name = out, f"m{reuse}"
            config.preview = type(config.preview)()  # no previews: not what is timed
            start = time.perf_counter()
            with UNetCalls() as counter:
                result = train_fully(config, progress=False)
            seconds = time.perf_counter() - start
            calls = counter.calls / result.steps
            models = load_models(config.pretrained_model, with_vae=True)
            summary = evaluate(models, result.path, spec, "cpu", progress=False)["summary"]["1"]
            print(
                f"{reuse:>3}{seconds:>9.1f}{calls:>17.1f}{summary['erased_still_detected']:>18.0%}"
                f"{summary['kept_still_right']:>13.0%}{summary['kept_drift']:>12.3f}"
            )


if __name__ == "__main__":
    main()
