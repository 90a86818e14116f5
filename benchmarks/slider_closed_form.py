"""A slider solved in closed form on the cross-attention keys and values, measured as slider_leak.py
measures trained sliders (a study, not a leco method).

The red(+1)/blue(-1) slider on "a digit five": the text states of "a digit five" from its last word
(or from its end token) on are mapped to themselves plus g/2 times the difference of the states of
"a digit five in red ink" and "a digit five in blue ink" (aligned the same way), while every prompt
of the model's own list without "five", and the fives in other inks, keep theirs: the least-squares
edit of leco.closed_form, cut to the LoRA's rank. At -1 the edit is subtracted. It shows how far a
linear key/value edit gets: the same wall as the trained xattn-strict sliders (README).

usage: OMP_NUM_THREADS=1 python benchmarks/slider_closed_form.py [--settings 2:eos,6:eos,12:eos]
           [--preserve 0.1] [--regularization 0.1] [--rank 8] [--images 4]
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse

import numpy as np
import torch
from recipe_runs import positive_int
from slider_leak import EXAMPLE, INK_NAMES_OF_MODEL, KINDS, MINUS, OWN_IMAGES, PLUS, prompts, readings

from leco.cli import quiet_libraries
from leco.closed_form import last_word, lora_settings, solve_into, text_states
from leco.config import AnchorConfig, load_config
from leco.generate import build_pipeline
from leco.ink_digits.data import ALL_INKS
from leco.ink_digits.judge import InkDigitsJudge
from leco.models import load_models
from leco.network import LoRANetwork
from leco.preservation import anchor_prompts

TARGET = "a digit five"
POLES = (f"a digit five in {PLUS} ink", f"a digit five in {MINUS} ink")


def slider_edit(models, config, states, kept: list[str], push: float, start: str) -> LoRANetwork:
    """The closed-form slider at push g, its rows from the last word ("word") or the end token ("eos")."""

    def rows(text: str) -> torch.Tensor:
        return states[text][last_word(models, text) + (start == "eos") :]

    source, plus, minus = rows(TARGET), rows(POLES[0]), rows(POLES[1])
    length = min(len(source), len(plus))
    source, plus, minus = source[:length], plus[:length], minus[:length]
    target = source + push / 2 * (plus - minus)
    keep = torch.cat([states[text] for text in kept])
    network = LoRANetwork.create(models.unet, models.family, lora_settings(config.network))
    solve_into(network, source, target, keep, config)
    return network


def measure(models, network: LoRANetwork, images: int) -> dict[str, float]:
    cases = prompts()
    kinds = np.repeat([k for _, k in cases], images)
    pipe, judge = build_pipeline(models), InkDigitsJudge.load(models.source)
    seeds = list(range(1000, 1000 + images))

    def set_strength(strength: float) -> None:  # the network is already in the pipeline's UNet
        network.multiplier = strength

    base = readings(pipe, set_strength, judge, cases, seeds, 0.0)
    changed, own = [], {}
    own_cases = [case for case in cases if case[1] == "own"]
    for strength in (-1.0, 1.0):
        digit, ink = readings(pipe, set_strength, judge, cases, seeds, strength)
        moved = (digit != base[0]) | (ink != base[1])
        changed += [float(moved[kinds == kind].mean()) for kind in KINDS]
        _, own_ink = readings(
            pipe, set_strength, judge, own_cases, list(range(1000, 1000 + OWN_IMAGES)), strength
        )
        wanted = ALL_INKS.index(PLUS if strength > 0 else MINUS)
        own[f"{PLUS} at +1" if strength > 0 else f"{MINUS} at -1"] = float((own_ink == wanted).mean())
    return {"untargeted": float(np.mean(changed)), "worst": max(changed), **own}


def _settings(parser: argparse.ArgumentParser, text: str) -> list[tuple[float, str]]:
    """--settings as (push, start) pairs; anything else stops with one line."""
    pairs = []
    for setting in text.split(","):
        push, _, start = setting.partition(":")
        try:
            pairs.append((float(push), start))
        except ValueError:
            start = None
        if start not in ("word", "eos"):
            parser.error(f"--settings: {setting!r} is not PUSH:START with START word or eos, e.g. 2:eos")
    return pairs


def main() -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", default="2:eos,6:eos,12:eos", help="push:start pairs (start: word|eos)")
    parser.add_argument("--preserve", type=float, default=0.1)
    parser.add_argument("--regularization", type=float, default=0.1)
    parser.add_argument("--rank", type=positive_int, default=8)
    parser.add_argument("--images", type=positive_int, default=4)
    args = parser.parse_args()
    settings = _settings(parser, args.settings)  # before the model loads
    models = load_models("ink-digits", with_vae=True)
    config = load_config(EXAMPLE)
    config.closed_form.preserve_scale, config.closed_form.regularization = args.preserve, args.regularization
    config.network.rank = args.rank
    kept = anchor_prompts(AnchorConfig(prompts="auto"), config.prompts, models.source)
    kept += [f"a digit five in {ink} ink" for ink in INK_NAMES_OF_MODEL]
    states = text_states(models, None, [TARGET, *POLES, *kept])
    print(f"| push, rows from | untargeted changed (worst) | {PLUS} at +1 | {MINUS} at -1 |")
    print("|---|---|---|---|")
    for push, start in settings:
        network = slider_edit(models, config, states, kept, push, start)
        r = measure(models, network, args.images)
        network.remove()
        cells = [
            f"{r['untargeted']:.1%} ({r['worst']:.1%})",
            f"{r[f'{PLUS} at +1']:.0%}",
            f"{r[f'{MINUS} at -1']:.0%}",
        ]
        print(f"| {push}, {start} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
