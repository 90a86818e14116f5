"""CFG distillation on the bundled model: the LoRA's conditional prediction moves to the guided one."""

from pathlib import Path

import torch

from leco.conditioning import PromptEncoder, predict
from leco.config import load_config
from leco.models import load_models
from leco.objectives import guided
from leco.trainer import train

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ink-digits" / "distill_cfg3.yaml"
HELD_OUT = ["the number 3 written in blue", "5, green ink", "a digit two", "the number 8", "orange ink"]


def test_distilled_guidance_one_prediction_is_closer_to_the_guided_one_on_held_out_prompts(tmp_path):
    config = load_config(EXAMPLE)  # trained on the "words" phrasing only
    config.train.iterations, config.save.path, config.save.per_steps = 150, str(tmp_path), 10**6
    result = train(config, progress=False)
    models = load_models("ink-digits")
    models.unet = result.trainable.unet
    encoder = PromptEncoder(models)
    with torch.no_grad():
        conditional = encoder.encode(HELD_OUT)
        empty = encoder.encode([""] * len(HELD_OUT))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(len(HELD_OUT), 4, 8, 8, generator=generator)
    timesteps = torch.tensor([900, 700, 500, 300, 100])
    with torch.no_grad():
        with result.trainable.strength(0.0):
            base = predict(models.unet, latents, timesteps, conditional)
            target = guided(predict(models.unet, latents, timesteps, empty), base, 3.0)
        distilled = predict(models.unet, latents, timesteps, conditional)
    before = (base - target).abs().mean(dim=(1, 2, 3))
    after = (distilled - target).abs().mean(dim=(1, 2, 3))
    assert (after < before).all(), (before, after)  # every held-out prompt, each phrasing unseen
    assert after.mean() < 0.7 * before.mean(), (before.mean(), after.mean())
