"""Training-step speed: the reference LECO schedule against ours, on one small UNet, in one run.

Reference schedule (p1atdev/LECO's, emulated in benchmarks/reference.py): every step rolls out
k ~ U[1, S-1] DDIM steps from noise with a doubled CFG batch, then asks the frozen model three
times for positive, neutral and unconditional, each call again a doubled (guidance 1) batch, and
runs the student on a doubled batch as well. Ours: one rollout feeds m steps (samples_per_rollout), the
teacher is one batched call without duplicates, the student one plain call.

usage: python benchmarks/step_speed.py [--model DIR] [--steps 40] [--denoising-steps N] [--reuse 1,2,4,8]
           [--threads 2]
Prints steps/s, UNet calls per step and batch rows per step for each schedule, and the speed-up.
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
from reference import UNetCalls, reference_step

from leco.cli import quiet_libraries
from leco.config import LecoConfig
from leco.testing import save_tiny_pipeline
from leco.trainer import Trainer


def make_trainer(model: str, out: str, reuse: int, denoising_steps: int) -> Trainer:
    config = LecoConfig.model_validate(
        {
            "pretrained_model": {"name_or_path": model},
            "prompts": [{"target": "a red fox", "guidance_scale": 1.0}],
            "train": {
                "precision": "fp32",
                "seed": 0,
                "samples_per_rollout": reuse,
                "lr": 1e-4,
                "max_denoising_steps": denoising_steps,
                "iterations": 10**6,
            },
            "save": {"path": out, "name": "bench"},
        }
    )
    return Trainer(config, progress=False)


def measure(step, trainer: Trainer, count: int) -> tuple[float, float, float]:
    """steps/s, UNet calls per step and batch rows per step over `count` steps after a warm-up."""
    rows = []
    trainer.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    counter = UNetCalls(trainer.unet)
    step()  # warm-up (allocations, first rollout)
    counter.calls, rows[:] = 0, []
    start = time.perf_counter()
    for _ in range(count):
        step()
    elapsed = time.perf_counter() - start
    return count / elapsed, counter.calls / count, sum(rows) / count


def main() -> None:
    quiet_libraries()  # no loading bars between the table's rows
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="diffusers folder (default: a random small SD1-layout UNet)")
    parser.add_argument("--steps", type=positive_int, default=40, help="training steps timed per schedule")
    parser.add_argument("--denoising-steps", type=positive_int, default=50)
    parser.add_argument("--reuse", default="1,2,4,8", help="samples_per_rollout values to time")
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args()
    reuses = positive_ints(parser, "--reuse", args.reuse)  # before minutes of timing
    if args.model is not None and not Path(args.model).is_dir():
        parser.error(f"--model: {args.model} is not a folder; name a diffusers model folder")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / "small-sd1")
            save_tiny_pipeline(Path(model), "sd1", channels=(32, 64), sample_size=16)
        print(
            f"model: {model}; {args.steps} timed steps each; S={args.denoising_steps}; "
            f"{torch.get_num_threads()} CPU threads"
        )
        trainer = make_trainer(model, tmp, 1, args.denoising_steps)
        generator = torch.Generator().manual_seed(0)
        ref_speed, ref_calls, ref_rows = measure(
            lambda: reference_step(trainer, generator), trainer, args.steps
        )
        print(f"{'schedule':<34}{'steps/s':>9}{'UNet calls/step':>17}{'rows/step':>11}{'speed-up':>10}")
        print(
            f"{'reference (m=1, doubled teacher)':<34}{ref_speed:>9.2f}{ref_calls:>17.1f}{ref_rows:>11.1f}"
            f"{1.0:>10.2f}"
        )
        for reuse in reuses:
            trainer = make_trainer(model, tmp, reuse, args.denoising_steps)
            speed, calls, rows = measure(trainer.train_step, trainer, args.steps)
            print(
                f"{f'leco (m={reuse}, batched teacher)':<34}{speed:>9.2f}{calls:>17.1f}{rows:>11.1f}"
                f"{speed / ref_speed:>10.2f}"
            )


if __name__ == "__main__":
    main()
