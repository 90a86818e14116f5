"""How well the CFG-distillation LoRA fits its own training target, as training goes.

Trains examples/ink-digits/distill_cfg3.yaml (changed with --set) and, every --every steps, prints
the error the LoRA leaves on a fixed set of training steps drawn before the first one (rollout
latents, timesteps and prompts as training draws them): the squared distance of its conditional
prediction to the guided target, as a share of the base model's, in all and by quarter of the
timestep range (0 = least noise). Where this stops falling, more steps of the same recipe cannot
help; benchmarks/distill.py measures what it does to images.

With --fixed N it trains on N steps drawn once and cycled, instead of fresh ones, and prints the error
on those N too: where the error on them stops falling is what the network can fit at all (its
capacity); the gap between them and the held steps is what more data would buy.

usage: OMP_NUM_THREADS=1 python benchmarks/distill_fit.py [--set train.lr=3e-3 --set network.rank=32 ...]
       [--fixed 200] [--held 48] [--every 150]   (steps held fixed to measure on, and how often)
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse
import tempfile
from pathlib import Path

import torch
from recipe_runs import apply_changes, positive_int

from leco.cli import quiet_libraries
from leco.config import load_config
from leco.steps import Step
from leco.trainer import Trainer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ink-digits" / "distill_cfg3.yaml"


@torch.no_grad()
def error_left(trainer: Trainer, held: list[Step]) -> tuple[float, dict[int, float]]:
    """(share of the base's squared error left, the same by quarter of the timestep range)."""
    sums: dict[int, list[float]] = {}
    for step in held:
        rows, samples = trainer.step_queue.rows(step), step.samples
        frozen = trainer.step_queue.frozen(step)
        student = trainer.edited.student(samples, [(row.sample, row.texts["target"]) for row in rows])
        for row, predictions, prediction in zip(rows, frozen, student, strict=True):
            target = row.objective.target(predictions, row.guidance_scale)
            quarter = int(samples[row.sample].timesteps[0]) * 4 // 1000
            left_and_base = sums.setdefault(quarter, [0.0, 0.0])
            left_and_base[0] += float((prediction - target).pow(2).mean())
            left_and_base[1] += float((predictions["positive"] - target).pow(2).mean())
    total = sum(a for a, _ in sums.values()) / sum(b for _, b in sums.values())
    return total, {quarter: a / b for quarter, (a, b) in sorted(sums.items())}


def train_on(trainer: Trainer, step: Step) -> None:
    """One update on a step already drawn (its frozen predictions kept with it)."""
    trainer.updates.start()
    trainer.updates.backward(trainer.loss(step))
    trainer.updates.step()
    trainer.step += 1


def main() -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--held", type=positive_int, default=48, help="training steps held fixed to measure on"
    )
    parser.add_argument("--every", type=positive_int, default=150, help="measure every this many steps")
    parser.add_argument("--fixed", type=int, default=0, help="train on this many steps, drawn once")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="change a config value"
    )
    args = parser.parse_args()
    config = load_config(EXAMPLE)
    apply_changes(config, args.set)
    with tempfile.TemporaryDirectory() as folder:
        config.save.path, config.save.per_steps = folder, 10**9
        trainer = Trainer(config, progress=False)
        held = [trainer.step_queue.next() for _ in range(args.held)]
        fixed = [trainer.step_queue.next() for _ in range(args.fixed)]
        print(f"{EXAMPLE.name} {' '.join(args.set)}: error left (share of the base's), by timestep quarter")
        on_fixed_column = (" on the fixed steps |", "---|") if fixed else ("", "")
        print(f"| step | error left | by quarter (0 = least noise) |{on_fixed_column[0]}")
        print(f"|---|---|---|{on_fixed_column[1]}")
        while True:
            total, by_quarter = error_left(trainer, held)
            quarters = ", ".join(f"{q}: {share:.2f}" for q, share in by_quarter.items())
            on_fixed = f" {error_left(trainer, fixed)[0]:.2f} |" if fixed else ""
            print(f"| {trainer.step} | {total:.2f} | {quarters} |{on_fixed}", flush=True)
            if trainer.step >= config.train.iterations:
                break
            for _ in range(min(args.every, config.train.iterations - trainer.step)):
                if fixed:
                    train_on(trainer, fixed[trainer.step % len(fixed)])
                else:
                    trainer.train_step()


if __name__ == "__main__":
    main()
