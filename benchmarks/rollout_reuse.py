"""Choosing samples_per_rollout: erasure quality and wall time for several m, on ink-digits.

Trains the erase-seven example with each m (same seed, same number of steps), then runs the
example's eval spec on each LoRA. More reuse is faster (fewer rollout UNet calls per step) but
its latents come from an older LoRA and from one trajectory; this prints whether that costs
erasure or preservation.

usage: python benchmarks/rollout_reuse.py [--reuse 1,2,4,8] [--iterations 300] [--images 16]
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
from recipe_runs import positive_int, positive_ints

from leco import train
from leco.cli import quiet_libraries
from leco.config import load_config
from leco.evaluate import evaluate, load_spec
from leco.models import load_models

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "ink-digits"


def main() -> None:
    quiet_libraries()  # no loading bars between the table's rows
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reuse", default="1,2,4,8")
    parser.add_argument("--iterations", type=positive_int, default=None, help="default: the example's")
    parser.add_argument("--images", type=positive_int, default=16, help="images per eval prompt")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--example", default="erase_seven")
    args = parser.parse_args()
    reuses = positive_ints(parser, "--reuse", args.reuse)
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
            config.preview.prompts = []
            start = time.perf_counter()
            result = train(config, progress=False)
            seconds = time.perf_counter() - start
            calls = result.unet_calls / result.steps
            models = load_models(config.pretrained_model, with_vae=True)
            summary = evaluate(models, result.path, spec, "cpu", progress=False)["summary"]["1"]
            print(
                f"{reuse:>3}{seconds:>9.1f}{calls:>17.1f}{summary['erased_still_detected']:>18.0%}"
                f"{summary['kept_still_right']:>13.0%}{summary['kept_drift']:>12.3f}"
            )


if __name__ == "__main__":
    main()
