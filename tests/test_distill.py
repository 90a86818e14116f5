"""CFG distillation on the bundled model: the LoRA's conditional prediction moves to the guided one."""

from pathlib import Path

import torch

from leco import train
from leco.conditioning import PromptEncoder, predict
from leco.config import load_config
from leco.generate import build_pipeline
from leco.models import load_models
from leco.objectives import guided

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ink-digits" / "distill_cfg3.yaml"
# Every phrasing here is one the example never trains on ("a digit D in INK ink" only).
HELD_OUT = ["the number 3 written in blue", "5, green ink", "a digit two", "the number 8", "orange ink"]


def guidance_one_latents(models, prompts: list[str], steps: int = 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents where a guidance-1 sampler really goes, at every step of its trajectory, and their
    timesteps: where a distilled LoRA is used, not random noise at arbitrary timesteps."""
    pipe = build_pipeline(models)
    latents, timesteps = [], []

    def record(pipe, step, timestep, kwargs):
        latents.append(kwargs["latents"].clone())
        timesteps.append(int(timestep))
        return kwargs

    pipe(
        prompts,
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=[torch.Generator().manual_seed(100 + i) for i in range(len(prompts))],
        output_type="latent",
        callback_on_step_end=record,
    )
    # the latents after step i are the input of step i + 1, whose timestep is the next one
    pairs = list(zip(latents[:-1], timesteps[1:], strict=True))[::4]
    batch = torch.cat([x for x, _ in pairs])
    return batch, torch.tensor([t for _, t in pairs]).repeat_interleave(len(prompts))


def test_distilled_guidance_one_prediction_is_closer_to_the_guided_one_on_held_out_prompts(tmp_path):
    config = load_config(EXAMPLE)
    config.train.iterations, config.save.path, config.save.per_steps = 200, str(tmp_path), 10**6
    config.train.samples_per_step = 1  # the example's 4 latents a step fit better; 1 keeps this test short
    result = train(config, progress=False)
    models = load_models("ink-digits", with_vae=True)
    with result.trainable.strength(0.0):
        models.unet = result.trainable.unet
        latents, timesteps = guidance_one_latents(models, HELD_OUT)
    encoder = PromptEncoder(models)
    repeats = len(latents) // len(HELD_OUT)
    with torch.no_grad():
        conditional = encoder.encode(HELD_OUT * repeats)
        empty = encoder.encode([""] * len(latents))
        with result.trainable.strength(0.0):
            base = predict(models.unet, latents, timesteps, conditional)
            target = guided(predict(models.unet, latents, timesteps, empty), base, 3.0)
        distilled = predict(models.unet, latents, timesteps, conditional)
    before = (base - target).pow(2).flatten(1).mean(1).view(repeats, len(HELD_OUT)).mean(0)
    after = (distilled - target).pow(2).flatten(1).mean(1).view(repeats, len(HELD_OUT)).mean(0)
    # Each held-out prompt that names a digit, over its whole trajectory. The ink-only prompt is
    # too far from the trained phrasing to gain (measured: slightly worse); the mean covers it.
    assert (after[:4] < before[:4]).all(), (before, after)
    assert after.mean() < 0.8 * before.mean(), (before.mean(), after.mean())
