"""CFG distillation fitted on whole sampling trajectories: a study, not a leco training mode.

leco's `action: distill` trains each step's prediction towards the guided one; the error left on
each step adds up along the 25 steps of a sample. This script trains the example's LoRA
(examples/ink-digits/distill_cfg3.yaml: rank 8 on every layer, the "words" prompts, cosine lr)
on the sampler's output instead: from one noise, the base model at guidance 3 and the LoRA at
guidance 1 each run DDIM's 25 steps, and the loss is the mean absolute difference of the two
decoded images (the measure benchmarks/distill.py reports), backpropagated through every step of
the LoRA's run. Judge the file it writes with benchmarks/distill.py --lora FILE.

usage: OMP_NUM_THREADS=1 python benchmarks/distill_trajectory.py --seed 0 --out traj0.safetensors
           [--iterations 600] [--batch 8] [--lr 1e-3] [--latent-mse]
       OMP_NUM_THREADS=1 python benchmarks/distill.py --lora traj0.safetensors --images 2 --trained
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import argparse
import time
from pathlib import Path

import torch
from recipe_runs import positive_int

from leco.cli import quiet_libraries
from leco.conditioning import Conditioning, PromptEncoder, predict
from leco.config import load_config
from leco.models import load_models
from leco.objectives import guided
from leco.rollout import Rollout
from leco.trainable import create_trainable

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ink-digits" / "distill_cfg3.yaml"
STEPS, GUIDANCE = 25, 3.0


def main() -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--iterations", type=positive_int, default=600)
    parser.add_argument("--batch", type=positive_int, default=8, help="trajectories a step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--latent-mse", action="store_true", help="squared latent distance, not image L1")
    parser.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    args = parser.parse_args()
    if Path(args.out).exists():
        parser.error(f"--out: {args.out} exists; name another file")
    torch.manual_seed(args.seed)
    config = load_config(EXAMPLE)
    models = load_models("ink-digits", with_vae=True)
    for module in (models.unet, models.vae, *models.text_encoders):
        module.requires_grad_(False)
    lora = create_trainable(models, config, torch.device("cpu"))
    optimizer = torch.optim.AdamW(lora.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.iterations)
    prompts = list(config.prompts[0].targets)  # its target_file's lines
    with torch.no_grad():
        conditional, empty = PromptEncoder(models).encode(prompts), PromptEncoder(models).encode([""])
    sampler = Rollout(models.scheduler_config, "ddim", STEPS, False).scheduler
    sampler.set_timesteps(STEPS)
    side, channels = models.resolution // models.vae_scale_factor, models.unet.config.in_channels
    scaling = models.vae.config.scaling_factor
    start = time.perf_counter()
    for iteration in range(args.iterations):
        chosen = torch.randint(len(prompts), (args.batch,))
        text = Conditioning(conditional.hidden_states[chosen])
        unconditional = Conditioning(empty.hidden_states.expand(args.batch, -1, -1))
        noise = torch.randn(args.batch, channels, side, side)
        with torch.no_grad(), lora.strength(0.0):
            reference = run_sampler(sampler, noise, models.unet, text, unconditional)
            reference_image = models.vae.decode(reference / scaling).sample
        with lora.strength(1.0):
            latents = run_sampler(sampler, noise, models.unet, text)
        if args.latent_mse:
            loss = (latents - reference).pow(2).mean()
        else:  # the images' mean absolute difference: what the benchmark measures (on 0..1, this on -1..1)
            loss = (models.vae.decode(latents / scaling).sample - reference_image).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if iteration % 50 == 0 or iteration == args.iterations - 1:
            print(
                f"step {iteration + 1}: loss {loss.item():.5f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    lora.save(args.out, resolution=models.resolution)
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s to train)")


def run_sampler(
    sampler, noise: torch.Tensor, unet, text: Conditioning, unconditional: Conditioning | None = None
) -> torch.Tensor:
    """DDIM's steps from `noise`, guided at GUIDANCE when `unconditional` is given; differentiable."""
    latents = noise * sampler.init_noise_sigma
    for timestep in sampler.timesteps:
        timesteps = timestep.repeat(len(latents))
        prediction = predict(unet, latents, timesteps, text)
        if unconditional is not None:
            prediction = guided(predict(unet, latents, timesteps, unconditional), prediction, GUIDANCE)
        latents = sampler.step(prediction, timestep, latents).prev_sample
    return latents


if __name__ == "__main__":
    main()
