"""Slider leak: how often prompts a slider does not target change, per recipe, on ink-digits.

A red(+1)/blue(-1) slider on "a digit five" (examples/ink-digits/slider_red_blue.yaml) is trained
with each recipe and seed. Same seed, strength -1, 0 and +1; an image "changed" when the judge
reads another digit or another ink than at strength 0. Untargeted prompts, by kind:

- other digits with an ink named ("a digit three in green ink"),
- other digits without an ink ("a digit three": the model picks the ink, the slider must not),
- ink-only prompts ("red ink"),
- the target class with an explicit other ink ("a digit five in green ink"): the prompt names the
  ink, and a prompt's explicit words win, so these count as untargeted too.

The slider's own ends: "a digit five" drawn red at +1 and blue at -1 (16 image seeds).

usage: OMP_NUM_THREADS=1 python benchmarks/slider_leak.py [--recipes default,anchors] [--seeds 0,1,2]
           [--set network.rank=16 ...]   (every recipe's config, changed)
           [--config examples/ink-digits/slider_red_blue_ai_toolkit.yaml --recipes default]
           [--slider 3,green,orange]   (the same recipes aimed at another digit and pair of inks)
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from recipe_runs import apply_changes, known_names, positive_int, seed_list, train_fully

from leco.cli import quiet_libraries
from leco.conditioning import PromptEncoder, predict
from leco.config import AnchorConfig, ConfigError, load_config
from leco.generate import build_pipeline
from leco.ink_digits import model_path
from leco.ink_digits.data import ALL_INKS, DIGIT_WORDS, MODEL_INKS
from leco.ink_digits.judge import InkDigitsJudge
from leco.lora_files import lora_strengths
from leco.models import load_models
from leco.objectives import OBJECTIVES, guided
from leco.preservation import anchor_prompts

INK_NAMES_OF_MODEL = MODEL_INKS["ink-digits"]  # the inks it draws (its vocabulary knows more)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ink-digits" / "slider_red_blue.yaml"
TARGET, PLUS, MINUS = 5, "red", "blue"
OWN_IMAGES = 16
LADDER = (-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5)  # --ladder: strengths the own prompt is drawn at
KINDS = ("digit+ink", "digit only", "ink only", "target digit + other ink")


def prompts() -> list[tuple[str, str]]:
    """(prompt, kind) of every untargeted prompt, and the slider's own ("own")."""
    others = [d for d in range(10) if d != TARGET]
    third = next(ink for ink in ("green", *INK_NAMES_OF_MODEL) if ink not in (PLUS, MINUS))
    cases = [
        (f"a digit {DIGIT_WORDS[d]} in {ink} ink", KINDS[0]) for d in others for ink in (third, PLUS, MINUS)
    ]
    cases += [(f"a digit {DIGIT_WORDS[d]}", KINDS[1]) for d in others]
    cases += [(f"{ink} ink", KINDS[2]) for ink in INK_NAMES_OF_MODEL]
    cases += [
        (f"a digit {DIGIT_WORDS[TARGET]} in {ink} ink", KINDS[3])
        for ink in INK_NAMES_OF_MODEL
        if ink not in (PLUS, MINUS)
    ]
    return [*cases, (f"a digit {DIGIT_WORDS[TARGET]}", "own")]


def _set(path: str, value: Any) -> Callable[[Any], None]:
    section, key = path.split(".")
    return lambda config: setattr(getattr(config, section), key, value)


def _guidance(value: float) -> Callable[[Any], None]:
    def apply(config: Any) -> None:
        for entry in config.prompts:
            entry.guidance_scale = value

    return apply


def _minus_end(key: str, value: float) -> Callable[[Any], None]:
    def apply(config: Any) -> None:
        for entry in config.prompts:
            if entry.multiplier < 0:
                setattr(entry, key, value)

    return apply


def _plus_end(key: str, value: float) -> Callable[[Any], None]:
    def apply(config: Any) -> None:
        for entry in config.prompts:
            if entry.multiplier > 0:
                setattr(entry, key, value)

    return apply


def _anchors(per_step: int = 4, weight: float = 1.0) -> Callable[[Any], None]:
    def apply(config: Any) -> None:
        config.anchors.prompts, config.anchors.per_step = "auto", per_step
        config.anchors.weight = weight

    return apply


def _text_anchors(weight: float) -> Callable[[Any], None]:
    def apply(config: Any) -> None:
        config.anchors.prompts, config.anchors.per_step, config.anchors.text_weight = "auto", 0, weight

    return apply


def _siblings(times: int) -> Callable[[Any], None]:
    """Auto anchors, with the model's prompts that differ from a target in one word drawn `times` as
    often (for "a digit five": "a digit three", ...)."""

    def one_word_apart(prompt: str, target: str) -> bool:
        a, b = prompt.split(), target.split()
        return len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1

    def apply(config: Any) -> None:
        folder = model_path(config.pretrained_model.name_or_path)
        pool = anchor_prompts(AnchorConfig(prompts="auto"), config.prompts, folder)
        targets = [t for entry in config.prompts for t in entry.targets]
        near = [p for p in pool if any(one_word_apart(p, t) for t in targets)]
        config.anchors.prompts, config.anchors.per_step = pool + near * (times - 1), 4

    return apply


RECIPES: dict[str, list[Callable[[Any], None]]] = {
    "default": [],
    "anchors": [_anchors()],
    "anchors8": [_anchors(8)],
    "anchors-weight4": [_anchors(4, 4.0)],
    # Rank 16 at the scale per direction of rank 4 reached both ends (88% / 88%): held harder.
    "anchors-weight4+rank16": [_anchors(4, 4.0), _set("network.rank", 16), _set("network.alpha", 4.0)],
    "anchors-weight4+rank16+900": [
        _anchors(4, 4.0),
        _set("network.rank", 16),
        _set("network.alpha", 4.0),
        _set("train.iterations", 900),
    ],
    "anchors-weight2+rank16+900": [
        _anchors(4, 2.0),
        _set("network.rank", 16),
        _set("network.alpha", 4.0),
        _set("train.iterations", 900),
    ],
    "anchors+strict": [_anchors(), _set("network.training_method", "xattn-strict")],
    # 16 latents from each rollout: the same steps, a quarter as many rollouts (for each end).
    "anchors+m16": [_anchors(), _set("train.samples_per_rollout", 16)],
    # A slider that should change nothing (its poles weigh 0) but is trained the same way: how many
    # images change merely because weights moved (the floor any recipe is measured against).
    "null": [_anchors(), _guidance(0.0)],
    "siblings10": [_siblings(10)],
    # Anchors on rollouts of their own (their own latents: a three's, not the five's), one entry more.
    "anchor-rollouts": [_anchors(), _set("anchors.rollouts", True)],
    # Keep the anchors' cross-attention keys and values (anchors.text_weight), no anchor UNet rows.
    **{
        f"text{weight:g}+strict": [_text_anchors(weight), _set("network.training_method", "xattn-strict")]
        for weight in (0.03, 0.1, 1, 10)
    },
    "text0.1+strict+600": [
        _text_anchors(0.1),
        _set("network.training_method", "xattn-strict"),
        _set("train.iterations", 600),
    ],
    # Rank 16 at the same scale per direction (alpha / rank = 1/4): room for both ends' directions.
    "text0.1+strict+rank16": [
        _text_anchors(0.1),
        _set("network.training_method", "xattn-strict"),
        _set("network.rank", 16),
        _set("network.alpha", 4.0),
    ],
    "anchors+text0.1+strict+rank16": [
        _anchors(),
        _set("anchors.text_weight", 0.1),
        _set("network.training_method", "xattn-strict"),
        _set("network.rank", 16),
        _set("network.alpha", 4.0),
    ],
    "anchors+text0.1+strict": [
        _anchors(),
        _set("anchors.text_weight", 0.1),
        _set("network.training_method", "xattn-strict"),
    ],
    "text0.1+strict+guidance4": [
        _text_anchors(0.1),
        _set("network.training_method", "xattn-strict"),
        _guidance(4.0),
    ],
    # Values only (xattn-values): the +1 and -1 ends move the cross-attention output by exact mirrors.
    "anchors+values": [_anchors(), _set("network.training_method", "xattn-values")],
    **{
        f"text{weight:g}+values": [_text_anchors(weight), _set("network.training_method", "xattn-values")]
        for weight in (0.1, 0.3)
    },
    "anchors+text0.1+values": [
        _anchors(),
        _set("anchors.text_weight", 0.1),
        _set("network.training_method", "xattn-values"),
    ],
    "text0.1": [_text_anchors(0.1)],
    "anchors+text0.1": [_anchors(), _set("anchors.text_weight", 0.1)],
    "anchors+text1": [_anchors(), _set("anchors.text_weight", 1.0)],
    "anchors+text0.3": [_anchors(), _set("anchors.text_weight", 0.3)],
    "anchors+text0.5": [_anchors(), _set("anchors.text_weight", 0.5)],
    "anchors+text1+600": [_anchors(), _set("anchors.text_weight", 1.0), _set("train.iterations", 600)],
    "anchors+text1+guidance3": [_anchors(), _set("anchors.text_weight", 1.0), _guidance(3.0)],
    # The LoRA on the text encoder, which reads each prompt whole (leco.network.text_encoder_lora).
    "te": [_set("network.training_method", "text-encoder")],
    "te-no-anchors": [_set("network.training_method", "text-encoder"), _set("anchors.prompts", [])],
    # Anchors kept through their text alone (no anchor rows in the UNet calls), or UNet anchors held
    # more lightly: the -1 end needs a large change of the states after the prompt (slider_padding.py).
    **{
        f"te+text{weight:g}-rows": [
            _set("network.training_method", "text-encoder"),
            _set("anchors.text_weight", weight),
            _set("anchors.per_step", 0),
        ]
        for weight in (0.01, 0.03, 0.1)
    },
    **{
        f"te+anchors-weight{weight:g}": [_set("network.training_method", "text-encoder"), _anchors(4, weight)]
        for weight in (0.1, 0.3)
    },
    **{
        f"te+text{weight:g}": [
            _set("network.training_method", "text-encoder"),
            _set("anchors.text_weight", weight),
        ]
        for weight in (0.03, 0.1, 0.3)
    },
    "te+text0.1+minus-weight3": [
        _set("network.training_method", "text-encoder"),
        _set("anchors.text_weight", 0.1),
        _minus_end("weight", 3.0),
    ],
    # The +1 end trained at a smaller strength: red lies nearer the model's mix than blue (it needs
    # half the change, slider_padding.py), so the file's scale is set by the far end; red saturates
    # past its trained strength (--ladder: red 16 of 16 at +1.5).
    **{
        f"te+text0.1+plus-at{m:g}": [
            _set("network.training_method", "text-encoder"),
            _set("anchors.text_weight", 0.1),
            _plus_end("multiplier", m),
        ]
        for m in (0.5, 0.7)
    },
    "full": [_set("network.training_method", "full")],
    # Every layer, the resnets and self-attention included: features of the drawn five, not only
    # of the words, may tell the five from the other digits.
    "anchors+full": [_anchors(), _set("network.training_method", "full")],
    "rank1": [_set("network.rank", 1)],
    "guidance1": [_guidance(1.0)],
    "guidance4": [_guidance(4.0)],
    "anchors+guidance4": [_anchors(), _guidance(4.0)],
    # The -1 end is the weak one: its entry (the second) weighs more, or asks for more.
    "anchors+minus-weight2": [_anchors(), _minus_end("weight", 2.0)],
    "text0.1+strict+minus-weight3": [
        _text_anchors(0.1),
        _set("network.training_method", "xattn-strict"),
        _minus_end("weight", 3.0),
    ],
    # The -1 end trained at a smaller strength: it is fitted short (--ladder), so ask for blue sooner.
    **{f"anchors+minus-at{m:g}": [_anchors(), _minus_end("multiplier", -m)] for m in (0.5, 0.7)},
    "text0.1+strict+minus-guidance4": [
        _text_anchors(0.1),
        _set("network.training_method", "xattn-strict"),
        _minus_end("guidance_scale", 4.0),
    ],
}


def aim(config) -> None:
    """The example's words for its digit and inks replaced by --slider's, in every prompt text."""
    words = {DIGIT_WORDS[5]: DIGIT_WORDS[TARGET], "5": str(TARGET), "red": PLUS, "blue": MINUS}
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b")
    for index, entry in enumerate(config.prompts):
        changes = {}
        for role in ("target", "positive", "unconditional", "neutral"):
            value = getattr(entry, role)
            if isinstance(value, str):
                changes[role] = pattern.sub(lambda m: words[m.group()], value)
            elif value:
                changes[role] = [pattern.sub(lambda m: words[m.group()], text) for text in value]
        # All roles at once: one at a time, swapped poles would pass through positive == unconditional.
        config.prompts[index] = entry.model_copy(update=changes)


def configure(recipe: str, seed: int, out: Path, changes: list[str] = (), base: Path = EXAMPLE):
    config = load_config(base)
    aim(config)
    config.train.seed, config.save.path, config.save.per_steps = seed, str(out), 10**9
    config.preview.prompts = []
    for change in RECIPES[recipe]:
        change(config)
    apply_changes(config, list(changes))
    return config


@torch.no_grad()
def readings(
    pipe, set_strength: Callable[[float], None], judge: InkDigitsJudge, cases, seeds, strength: float
):
    """Digit and ink read off every (prompt, seed) image at one strength."""
    jobs = [(p, s) for p, _ in cases for s in seeds]
    set_strength(strength)
    digits, inks = [], []
    for start in range(0, len(jobs), 200):
        chunk = jobs[start : start + 200]
        images = pipe(
            [p for p, _ in chunk],
            num_inference_steps=25,
            guidance_scale=3.0,
            generator=[torch.Generator().manual_seed(s) for _, s in chunk],
            output_type="np",
        ).images
        reading = judge.read(images)
        digits.append(reading.digits)
        inks.append(reading.inks)
    set_strength(1.0)
    return np.concatenate(digits), np.concatenate(inks)


def ink_counts(inks: np.ndarray) -> str:
    return " ".join(f"{ALL_INKS[i]} {int((inks == i).sum())}" for i in np.unique(inks))


def ladder(pipe, set_strength: Callable[[float], None], judge: InkDigitsJudge) -> str:
    """The inks of the slider's own prompt (OWN_IMAGES seeds) at each strength of LADDER."""
    own = [(f"a digit {DIGIT_WORDS[TARGET]}", "own")]
    parts = []
    for strength in LADDER:
        _, inks = readings(pipe, set_strength, judge, own, list(range(1000, 1000 + OWN_IMAGES)), strength)
        parts.append(f"{strength:+g}: {ink_counts(inks)}")
    return "; ".join(parts)


@torch.no_grad()
def targets_drawn(models, judge: InkDigitsJudge) -> str:
    """What each end's training target draws when sampled as the conditional prediction itself (no
    LoRA; guidance 3 against ""): whether a weak end is the target's fault or the fit's."""
    pipe, config = build_pipeline(models), load_config(EXAMPLE)
    aim(config)
    encoder = PromptEncoder(models)
    seeds, parts = list(range(1000, 1000 + OWN_IMAGES)), []
    channels, side = models.unet.config.in_channels, models.resolution // models.vae_scale_factor
    for entry in config.prompts:
        roles = {role: entry.role_text(role, 0) for role in ("positive", "unconditional", "neutral")}
        states = {role: encoder.encode([text] * len(seeds)) for role, text in {**roles, "empty": ""}.items()}
        scheduler = pipe.scheduler
        scheduler.set_timesteps(25)
        noise = [torch.randn(channels, side, side, generator=torch.Generator().manual_seed(s)) for s in seeds]
        latents = torch.stack(noise) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            p = {
                role: predict(models.unet, model_input, t.repeat(len(seeds)), c) for role, c in states.items()
            }
            conditional = OBJECTIVES[entry.action].target(p, entry.guidance_scale)
            latents = scheduler.step(guided(p["empty"], conditional, 3.0), t, latents).prev_sample
        images = models.vae.decode(latents / models.vae.config.scaling_factor).sample
        images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        parts.append(f"entry at {entry.multiplier:+g}: {ink_counts(judge.read(images).inks)}")
    return "; ".join(parts)


def measure(
    recipe: str,
    seeds: list[int],
    images: int,
    models,
    folder: Path,
    changes: list[str],
    with_ladder: bool,
    config_path: Path = EXAMPLE,
) -> dict[str, Any]:
    cases = prompts()
    kinds = np.repeat([k for _, k in cases], images)
    changed = {kind: [] for kind in KINDS}
    own = {"red at +1": [], "blue at -1": []}
    seconds, ladders = [], []
    for seed in seeds:
        start = time.perf_counter()
        config = configure(recipe, seed, folder / recipe / str(seed), changes, config_path)
        result = train_fully(config, progress=False)
        seconds.append(time.perf_counter() - start)
        pipe = build_pipeline(models)
        judge = InkDigitsJudge.load(models.source)
        # Applied as `leco generate` applies a file (diffusers for the UNet part, leco for the text
        # encoders'): what users get, whichever part a recipe trains.
        with lora_strengths(pipe, result.path, models.family) as set_strength:
            image_seeds = list(range(1000, 1000 + images))
            base = readings(pipe, set_strength, judge, cases, image_seeds, 0.0)
            if with_ladder:
                ladders.append(f"seed {seed}: {ladder(pipe, set_strength, judge)}")
            for strength in (-1.0, 1.0):
                digit, ink = readings(pipe, set_strength, judge, cases, image_seeds, strength)
                moved = (digit != base[0]) | (ink != base[1])
                for kind in KINDS:
                    changed[kind].append(float(moved[kinds == kind].mean()))
                # The slider's own ends over OWN_IMAGES seeds: one prompt, so more images cost little.
                own_cases = [case for case in cases if case[1] == "own"]
                _, own_ink = readings(
                    pipe, set_strength, judge, own_cases, list(range(1000, 1000 + OWN_IMAGES)), strength
                )
                wanted = ALL_INKS.index(PLUS if strength > 0 else MINUS)
                own["red at +1" if strength > 0 else "blue at -1"].append(float((own_ink == wanted).mean()))
    untargeted = [v for kind in KINDS for v in changed[kind]]
    return {
        **{kind: float(np.mean(v)) for kind, v in changed.items()},
        "untargeted": float(np.mean(untargeted)),
        "untargeted_worst": max(untargeted),
        **{k: min(v) for k, v in own.items()},
        "train_seconds": float(np.mean(seconds)),
        "ladders": ladders,
    }


def aim_at(parser: argparse.ArgumentParser, text: str) -> None:
    global TARGET, PLUS, MINUS
    parts = text.split(",")
    inks = INK_NAMES_OF_MODEL
    if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) > 9 or not set(parts[1:]) <= set(inks):
        parser.error(f"--slider: give a digit and two of the inks {', '.join(inks)}, e.g. 3,green,orange")
    if parts[1] == parts[2]:
        parser.error("--slider: the two ends need two different inks")
    TARGET, PLUS, MINUS = int(parts[0]), parts[1], parts[2]


def main() -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument(
        "--config",
        type=Path,
        default=EXAMPLE,
        help="the red/blue slider config each recipe changes (any file leco train reads: e.g. the kohya "
        "TOML or ai-toolkit job examples); default: the slider example",
    )
    parser.add_argument(
        "--slider",
        default="5,red,blue",
        metavar="DIGIT,PLUS_INK,MINUS_INK",
        help="the digit and the inks of the two ends (default 5,red,blue: the example's); the config's "
        "prompts are rewritten for them",
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--images", type=positive_int, default=8, help="images per prompt and strength")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="change every recipe's config"
    )
    parser.add_argument(
        "--ladder",
        action="store_true",
        help=f"also the inks of the own prompt at strengths {', '.join(f'{s:g}' for s in LADDER)}, and "
        "what each end's training target draws",
    )
    args = parser.parse_args()
    aim_at(parser, args.slider)
    seeds = seed_list(parser, args.seeds)
    recipes = known_names(parser, "--recipes", args.recipes, RECIPES)
    try:
        base = load_config(args.config)
    except ConfigError as error:  # one line, as leco train says it
        parser.error(f"--config: {error}")
    apply_changes(base, args.set)  # a bad change stops here, before any training
    models = load_models("ink-digits", with_vae=True)
    changed = f"; --set {' '.join(args.set)}" if args.set else ""
    changed += f"; config {args.config.name}" if args.config != EXAMPLE else ""
    if args.slider != "5,red,blue":
        changed += f"; slider on {DIGIT_WORDS[TARGET]}: {PLUS} at +1, {MINUS} at -1"
    print(f"changed at +-1 vs 0 (same seed), mean over strengths and training seeds {seeds}; ", end="")
    print(f"own ends: worst{changed}")
    header = ["recipe", *KINDS, "all untargeted (worst)", f"{PLUS} at +1", f"{MINUS} at -1", "train s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as folder:
        for recipe in recipes:
            r = measure(recipe, seeds, args.images, models, Path(folder), args.set, args.ladder, args.config)
            cells = [
                recipe,
                *(f"{r[k]:.1%}" for k in KINDS),
                f"{r['untargeted']:.1%} ({r['untargeted_worst']:.1%})",
            ]
            cells += [f"{r['red at +1']:.0%}", f"{r['blue at -1']:.0%}", f"{r['train_seconds']:.0f}"]
            print("| " + " | ".join(cells) + " |", flush=True)
            for line in r["ladders"]:
                print(f"  {recipe}, {line}", flush=True)
    if args.ladder:
        drawn = targets_drawn(models, InkDigitsJudge.load(models.source))
        print(f"training targets sampled directly ({OWN_IMAGES} seeds): {drawn}")


if __name__ == "__main__":
    main()
