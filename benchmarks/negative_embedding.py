"""Negative embedding vs the plain word as negative prompt, on ink-digits at guidance 3.

Trains examples/ink-digits/negative_seven.yaml for each seed (aimed at another digit with --digit),
then draws the erased digit's prompts (several phrasings and inks) and every other digit in every
ink (the `keep: all` universe of the ink-digits detector) with the negative prompt "", the word
("seven") and the embedding ("<no-seven>"), same seeds. Prints how often the digit is still drawn,
how often everything else is still right (mean and worst concept) and the pixel drift against the
negative prompt "".

With --upper-bound it also trains, with the same objective, free text states (every row of the
negative prompt's encoding, no text encoder in between): what no file A1111 or ComfyUI can load,
but it tells whether a miss is the objective's or the token's. Two more rows say where between
them the token is held: the free states passed through the text encoder's final layer norm (every
token's states are outputs of it, its first row fixed), and a token fitted to the free states
themselves (its vectors trained to reproduce those states, then judged).

With --erase-guidance 0,0.5 it trains the embedding once per value of the erase entries'
guidance_scale (the example's by default): how far the negative prompt's prediction must push past
the concept, s(g+1)/(s-1) times its direction at sampling guidance s, against what it can reach.

usage: OMP_NUM_THREADS=1 python benchmarks/negative_embedding.py [--seeds 0,1,2] [--images 8]
           [--digit 7] [--erase-guidance 0,0.5,1] [--upper-bound]
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from recipe_runs import apply_changes, positive_int, seed_list, train_fully

from leco import embedding
from leco.cli import quiet_libraries
from leco.conditioning import Conditioning
from leco.config import load_config
from leco.embedding_files import embeddings_loaded
from leco.generate import build_pipeline
from leco.ink_digits.data import DIGIT_WORDS
from leco.ink_digits.judge import InkDigitsDetector
from leco.models import load_models

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ink-digits" / "negative_seven.yaml"


def erased_cases_for(digit: int) -> list[tuple[str, str]]:
    """The erased digit's prompts: several phrasings and inks, and none."""
    word, concept = DIGIT_WORDS[digit], f"digit:{digit}"
    return [
        (f"a digit {word} in red ink", concept),
        (f"a digit {word} in blue ink", concept),
        (f"the number {digit} written in green", concept),
        (f"{digit}, black ink", concept),
        (f"a digit {word}", concept),
    ]


def example_for(digit: int):
    """The example's config aimed at `digit`, changed as its comment says: the token, init_text,
    target, anchors.exclude and save.name."""
    config = load_config(EXAMPLE)
    if digit == 7:
        return config
    word = DIGIT_WORDS[digit]
    config.network.token, config.network.init_text = f"<no-{word}>", word
    config.prompts[0].target = [f"a digit {word}", f"the number {digit}"]
    config.anchors.exclude = [str(digit)]
    config.save.name = f"no_{word}_embedding"
    return config


@torch.no_grad()
def render(pipe, cases: list[tuple[str, str]], seeds: list[int], negative: str) -> np.ndarray:
    jobs = [(p, s) for p, _ in cases for s in seeds]
    images = []
    for start in range(0, len(jobs), 250):
        chunk = jobs[start : start + 250]
        images.append(
            pipe(
                [p for p, _ in chunk],
                negative_prompt=[negative] * len(chunk),
                num_inference_steps=25,
                guidance_scale=3.0,
                generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                output_type="np",
            ).images
        )
    return np.concatenate(images)


class FreeStates(embedding.TokenEmbedding):
    """The negative prompt's text states themselves, trained (starting from the token's)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            start = super().encode().hidden_states
        self.states = torch.nn.Parameter(start.detach().clone())

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.states]

    def encode(self) -> Conditioning:
        return Conditioning(self.states)


class NormedStates(FreeStates):
    """Free states through the text encoder's final layer norm, the first (start) row kept fixed:
    the room every token has, whatever the layers before can reach."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        inputs = []  # the token's states before the norm: where training starts
        hook = self._norm().register_forward_hook(lambda module, args, out: inputs.append(args[0]))
        with torch.no_grad():
            super(FreeStates, self).encode()
        hook.remove()
        self.states = torch.nn.Parameter(inputs[-1].detach().clone())

    def _norm(self) -> torch.nn.Module:
        return self.models.text_encoders[0].final_layer_norm

    def encode(self) -> Conditioning:
        fixed_first = torch.cat([self.states[:, :1].detach(), self.states[:, 1:]], dim=1)
        return Conditioning(self._norm()(fixed_first))


def train_states(kind: type[FreeStates], folder: str, digit: int) -> torch.Tensor:
    """Train `kind` in place of the token with the example's objective; its final text states."""
    config = example_for(digit)
    config.save.path, config.save.per_steps = folder, 10**9
    config.train.lr, config.train.iterations = 1e-2, 900  # the states' own scale: a smaller lr, longer
    original, embedding.TokenEmbedding = embedding.TokenEmbedding, kind  # what create_trainable builds
    try:
        result = train_fully(config, progress=False)
    finally:
        embedding.TokenEmbedding = original
    result.trainable.remove()
    with torch.no_grad():
        return result.trainable.encode().hidden_states.detach()


def fitted_token(models, states: torch.Tensor, digit: int, steps: int = 3000) -> tuple[torch.Tensor, float]:
    """A token whose states come as near `states` as its vectors can bring them; its states and the
    error left (relative, rows after the first)."""
    config = example_for(digit)
    token = embedding.TokenEmbedding(models, "<fitted>", config.network.vectors, config.network.init_text)
    optimizer = torch.optim.Adam(token.parameters(), lr=2e-2)
    for _ in range(steps):
        error = (token.encode().hidden_states - states)[:, 1:].pow(2).mean()
        optimizer.zero_grad()
        error.backward()
        optimizer.step()
    with torch.no_grad():
        reached = token.encode().hidden_states.detach()
    token.remove()
    return reached, float((reached - states)[:, 1:].norm() / states[:, 1:].norm())


@torch.no_grad()
def render_states(pipe, cases, seeds, states: torch.Tensor) -> np.ndarray:
    jobs = [(p, s) for p, _ in cases for s in seeds]
    prompt_states = pipe.encode_prompt([p for p, _ in jobs], "cpu", 1, False)[0]
    return pipe(
        prompt_embeds=prompt_states,
        negative_prompt_embeds=states.expand(len(jobs), -1, -1),
        num_inference_steps=25,
        guidance_scale=3.0,
        generator=[torch.Generator().manual_seed(s) for _, s in jobs],
        output_type="np",
    ).images


def upper_bound(
    pipe, models, detector, cases: list, seeds, base_kept: np.ndarray, folder: str, digit: int
) -> list[str]:
    erased_cases, kept_cases = cases

    def row(name: str, states: torch.Tensor) -> str:
        images = [render_states(pipe, cases, seeds, states) for cases in (erased_cases, kept_cases)]
        drift = float(np.abs(images[1] - base_kept).mean())
        erased = judge(detector, erased_cases, seeds, images[0])
        return line(name, erased, judge(detector, kept_cases, seeds, images[1]), kept_cases, drift)

    free = train_states(FreeStates, folder + "/free", digit)
    normed = train_states(NormedStates, folder + "/normed", digit)
    fitted, left = fitted_token(models, free, digit)
    return [
        row("free text states (upper bound; 900 steps, lr 1e-2, seed 0)", free),
        row("free text states through the final layer norm (as above)", normed),
        row(f"a token fitted to the free states ({left:.0%} of them left unreached)", fitted),
    ]


def judge(detector, cases, seeds, images: np.ndarray) -> list[float]:
    """Share of each case's images that show its concept."""
    per_case = images.reshape(len(cases), len(seeds), *images.shape[1:])
    return [
        float(np.mean(detector.present(list(batch), concept)))
        for (_, concept), batch in zip(cases, per_case, strict=True)
    ]


def line(name: str, erased: list[float], kept: list[float], cases, drift: float) -> str:
    worst = int(np.argmin(kept))
    return (
        f"| {name} | {np.mean(erased):.0%} (worst {max(erased):.0%}) | {np.mean(kept):.1%} | "
        f"{cases[worst][0]} {kept[worst]:.0%} | {drift:.3f} |"
    )


def main() -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2", help="training seeds")
    parser.add_argument("--images", type=positive_int, default=8, help="image seeds per prompt")
    parser.add_argument("--upper-bound", action="store_true", help="also train free text states")
    parser.add_argument(
        "--digit",
        type=int,
        choices=range(10),
        default=7,
        metavar="D",
        help="the digit to erase (default 7, the example's; others change the example as its comment says)",
    )
    parser.add_argument(
        "--erase-guidance", help="comma-separated guidance_scale values for the erase entries (one row each)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="change a config value"
    )
    args = parser.parse_args()
    training_seeds = seed_list(parser, args.seeds)  # before minutes of sampling
    try:
        guidances = [float(g) for g in args.erase_guidance.split(",")] if args.erase_guidance else [None]
    except ValueError:
        parser.error(f"--erase-guidance: {args.erase_guidance!r} is not a comma-separated list of numbers")
    models = load_models("ink-digits", with_vae=True)
    detector = InkDigitsDetector.for_model(models.source)
    erased_cases = erased_cases_for(args.digit)
    kept_cases = [(p, c) for p, c in detector.concept_universe([f"digit:{args.digit}"])]
    pipe = build_pipeline(models)
    seeds = list(range(2000, 2000 + args.images))
    config = example_for(args.digit)
    apply_changes(config, args.set)  # a bad change stops here, before minutes of sampling
    token = config.network.token
    print(
        f"guidance 3, {args.images} images per prompt; {len(erased_cases)} erased prompts, "
        f"{len(kept_cases)} kept"
    )
    word = DIGIT_WORDS[args.digit]
    print(f'| negative prompt | {word} still drawn | everything else right | worst kept | drift vs "" |')
    print("|---|---|---|---|---|")
    base = {}
    for negative in ("", word):
        images = [render(pipe, cases, seeds, negative) for cases in (erased_cases, kept_cases)]
        base.setdefault("images", images)
        drift = float(np.abs(images[1] - base["images"][1]).mean())
        erased, kept = (
            judge(detector, erased_cases, seeds, images[0]),
            judge(detector, kept_cases, seeds, images[1]),
        )
        print(line(f'"{negative}"', erased, kept, kept_cases, drift), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for seed, guidance in ((s, g) for s in training_seeds for g in guidances):
            config = example_for(args.digit)
            run = f"{folder}/{seed}-{guidance}"
            config.train.seed, config.save.path, config.save.per_steps = seed, run, 10**9
            apply_changes(config, args.set)
            for entry in config.prompts:
                if guidance is not None and entry.action == "erase":
                    entry.guidance_scale = guidance
            result = train_fully(config, progress=False)
            result.trainable.remove()
            with embeddings_loaded(pipe, [str(result.path)]):
                images = [render(pipe, cases, seeds, token) for cases in (erased_cases, kept_cases)]
            drift = float(np.abs(images[1] - base["images"][1]).mean())
            erased, kept = (
                judge(detector, erased_cases, seeds, images[0]),
                judge(detector, kept_cases, seeds, images[1]),
            )
            changed = "" if guidance is None else f", erase guidance {guidance:g}"
            label = f"{token} (seed {seed}{changed})"
            print(line(label, erased, kept, kept_cases, drift), flush=True)
        if args.upper_bound:
            cases = (erased_cases, kept_cases)
            for row in upper_bound(
                pipe, models, detector, cases, seeds, base["images"][1], folder, args.digit
            ):
                print(row, flush=True)


if __name__ == "__main__":
    main()
