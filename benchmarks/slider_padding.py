"""How far the text states after a slider's prompt must move for each end: a study, not a leco method.

In a causal text encoder "a digit five" is the start of "a digit five in green ink", so an edit of
the text encoder that must leave the second alone can only change the states after the prompt's
last word (its end-of-text and padding positions). This frees exactly those states of "a digit
five" (no LoRA: the states themselves are the parameters), fits them to each end's LECO target
(neutral + 2 * (this pole - the other pole), the slider example's), then draws with them and
reports the inks the judge reads and how far the states moved (mean squared change over the mean
square of the prompt's states).

usage: python benchmarks/slider_padding.py [--steps 300] [--lr 0.02] [--images 16]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from recipe_runs import positive_int

from leco.cli import quiet_libraries
from leco.conditioning import PromptEncoder
from leco.generate import build_pipeline
from leco.ink_digits.data import ALL_INKS
from leco.ink_digits.judge import InkDigitsJudge
from leco.models import load_models

PROMPT, POLES = "a digit five", ("red", "blue")
GUIDANCE, STEPS, BATCH = 3.0, 25, 8


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=positive_int, default=300, help="optimizer steps per end")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--images", type=positive_int, default=16, help="images drawn per end")
    args = parser.parse_args()
    quiet_libraries()
    torch.manual_seed(0)
    models = load_models("ink-digits", with_vae=True)
    pipe, judge, encoder = build_pipeline(models), InkDigitsJudge.load(models.source), PromptEncoder(models)
    with torch.no_grad():
        states = {text: encoder.encode([text]).hidden_states for text in (PROMPT, "", *_poles())}
    tokens = models.tokenizers[0](PROMPT).input_ids  # bos, words, eos: the states after them are free
    free_from = len(tokens) - 1
    prompt = states[PROMPT]
    print(f"'{PROMPT}': states from position {free_from} of {prompt.shape[1]} free; {args.steps} steps")
    for end, (pole, other) in enumerate((_poles(), _poles()[::-1])):
        fitted = fit(models, pipe, states, pole, other, free_from, args)
        change = (fitted - prompt).pow(2).mean() / prompt.pow(2).mean()
        inks = draw(pipe, judge, fitted, states[""], args.images)
        drawn = ", ".join(f"{ALL_INKS[i]} {int((inks == i).sum())}" for i in np.unique(inks))
        print(f"{'+1' if end == 0 else '-1'} end ({POLES[end]}): drawn {drawn}; states moved {change:.2f}")


def _poles() -> tuple[str, str]:
    return tuple(f"{PROMPT} in {ink} ink" for ink in POLES)


def fit(models, pipe, states, pole: str, other: str, free_from: int, args) -> torch.Tensor:
    """The prompt's states with those from `free_from` on fitted to the end's LECO target, at
    noised latents of images drawn with the pole's own prompt."""
    unet, alphas = models.unet, pipe.scheduler.alphas_cumprod
    clean = draw(pipe, None, states[pole], states[""], 32, output_type="latent")
    prompt = states[PROMPT]
    free = torch.nn.Parameter(prompt[:, free_from:].clone())
    optimizer = torch.optim.Adam([free], lr=args.lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        pick = torch.randint(len(clean), (BATCH,), generator=generator)
        timesteps = torch.randint(len(alphas), (BATCH,), generator=generator)
        noise = torch.randn(clean[pick].shape, generator=generator)
        alpha = alphas[timesteps].view(-1, 1, 1, 1)
        latents = alpha.sqrt() * clean[pick] + (1 - alpha).sqrt() * noise

        def predict(cond: torch.Tensor, latents=latents, timesteps=timesteps) -> torch.Tensor:
            return unet(latents, timesteps, encoder_hidden_states=cond.expand(BATCH, -1, -1)).sample

        with torch.no_grad():
            target = predict(prompt) + 2.0 * (predict(states[pole]) - predict(states[other]))
        loss = (predict(torch.cat([prompt[:, :free_from], free], dim=1)) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.cat([prompt[:, :free_from], free.detach()], dim=1)


@torch.no_grad()
def draw(pipe, judge, cond, empty, images: int, output_type: str = "np"):
    out = pipe(
        prompt_embeds=cond.expand(images, -1, -1),
        negative_prompt_embeds=empty.expand(images, -1, -1),
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=[torch.Generator().manual_seed(1000 + i) for i in range(images)],
        output_type=output_type,
    ).images
    return out if judge is None else judge.read(out).inks


if __name__ == "__main__":
    main()
