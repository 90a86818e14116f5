"""The reference LECO schedule (p1atdev/LECO's train_lora.py), emulated on leco's own trainer.

Every step rolls out k ~ U[1, S-1] DDIM steps from fresh noise with a doubled CFG batch, labels
the latent with the grid timestep after it, asks the frozen model three times (positive, neutral,
unconditional: each call a doubled guidance-1 batch) and runs the student on a doubled batch too.
Same UNet, LoRA, optimizer and loss as leco: only the schedule differs, so ratios are fair.
"""

from __future__ import annotations

import torch

from leco import objectives
from leco.conditioning import Conditioning
from leco.trainer import Trainer


class UNetCalls:
    """Counts the UNet's forward calls (a forward pre-hook: every call, whoever makes it)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls = 0
        unet.register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: tuple) -> None:
        self.calls += 1


def reference_step(trainer: Trainer, generator: torch.Generator, rollout_guidance: float = 3.0) -> float:
    """One step of the reference schedule on the trainer's first prompt entry; returns the loss."""
    prompt = trainer.prompts[0]
    texts = prompt.texts(0)
    edited, size = trainer.edited, prompt.size

    def condition(text: str) -> Conditioning:
        return edited.condition(edited.embeddings[text], 1, size, (0, 0))

    unconditional = condition(texts["unconditional"])
    target_cfg = Conditioning.cat([unconditional, condition(texts["target"])])
    rollout = trainer.samples.rollout
    steps = rollout.steps
    k = int(torch.randint(1, steps, (1,), generator=generator))
    scheduler = rollout.scheduler
    scheduler.set_timesteps(steps, device=trainer.device)
    scale = trainer.models.vae_scale_factor
    channels = trainer.unet.config.in_channels
    # Drawn on the CPU as leco's rollouts draw theirs, then moved: the same noise on every device.
    noise = torch.randn(1, channels, size[0] // scale, size[1] // scale, generator=generator)
    latents = noise.to(trainer.device)

    def predict(cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        with edited.autocast():  # the UNet's own precision, as leco's calls run it
            doubled = edited.predict(torch.cat([latents, latents]), t, cond).float()
        return doubled.chunk(2)

    with torch.no_grad():
        for t in scheduler.timesteps[:k]:
            u, c = predict(target_cfg)
            latents = scheduler.step(objectives.guided(u, c, rollout_guidance), t, latents).prev_sample
        t = torch.tensor([int(scheduler.timesteps[k])], device=trainer.device)
        teacher = {}
        with trainer.trainable.strength(0.0):
            for role in ("positive", "neutral", "unconditional"):  # three separate, doubled calls
                teacher[role] = predict(Conditioning.cat([unconditional, condition(texts[role])]))[1]
    student = predict(target_cfg)[1]
    target = prompt.objective.target(teacher, prompt.settings.guidance_scale)
    loss = objectives.loss(student, target)
    trainer.updates.start()
    trainer.updates.backward(loss)  # through leco's fp16 loss scaler, as its own steps are
    trainer.updates.step()
    trainer.step += 1
    return loss.item()
