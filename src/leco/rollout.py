"""Partial rollouts: latents "as the edited model would generate them" at a known timestep.

A rollout starts from Gaussian latents and samples with the LoRA on (classifier-free guidance on
the target prompt) for S steps of a diffusers scheduler. Several training samples are taken from
ONE rollout: pick m distinct step counts k, run to the largest and keep a latent for each. With
`parallel_rollouts` R, R trajectories from their own noise run side by side in the same UNet
calls, each with its own m step counts: R*m samples for the calls of one.

The latent of sample k is labelled with the timestep it really has. With `timestep_offset`, it
is moved to a random timestep inside its step's interval (t_k, t_(k-1)] by a DDIM jump that reuses
the prediction the rollout made anyway, so every training timestep 1..T-1 gets trained.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler, LMSDiscreteScheduler
from torch import Tensor

from leco.config import TrainConfig
from leco.errors import LecoError
from leco.models import sampler_from_config
from leco.prompts import PreparedPrompt
from leco.samplers import refuse_epsilon_at_zero_snr, training_alphas_cumprod
from leco.trainable import EditedModel

# (model input latents, timestep) -> the guided prediction (noise or v) of the edited model.
GuidedModel = Callable[[Tensor, Tensor], Tensor]

SAMPLERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "lms": LMSDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
}


@dataclass
class TrainingSample:
    """A latent from a rollout, waiting for its training step."""

    prompt: int  # index of the prompt entry
    target: int  # index of the entry's target prompt
    latents: Tensor  # [batch, channels, h, w], at `timesteps`
    timesteps: Tensor  # [batch], integer training timesteps
    size: tuple[int, int]  # image (height, width) in pixels
    crop: tuple[int, int]

    def to_state(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "target": self.target,
            "latents": self.latents.cpu(),
            "timesteps": self.timesteps.cpu(),
            "size": list(self.size),
            "crop": list(self.crop),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> TrainingSample:
        return cls(
            state["prompt"],
            state["target"],
            state["latents"].to(device),
            state["timesteps"].to(device),
            tuple(state["size"]),
            tuple(state["crop"]),
        )


@dataclass
class SamplePlan:
    """One sample of a rollout: its latent comes from the prediction of step `step` (1-based)."""

    step: int
    timestep: int
    copy: int = 0  # which of the rollout's parallel trajectories (train.parallel_rollouts) it is taken from


class Rollout:
    """Runs partial sampling trajectories and hands out latents at chosen timesteps."""

    def __init__(
        self,
        scheduler_config: dict[str, Any],
        sampler: str = "ddim",
        steps: int = 50,
        timestep_offset: bool = True,
    ) -> None:
        config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        # "trailing" spacing makes the S step intervals tile all training timesteps, 999 included.
        self.scheduler = sampler_from_config(SAMPLERS[sampler], config, timestep_spacing="trailing")
        self.steps = steps
        self.timestep_offset = timestep_offset
        self.prediction_type = config.get("prediction_type", "epsilon")
        self.alphas_cumprod = training_alphas_cumprod(config)
        self.scheduler.set_timesteps(steps)
        # Stochastic samplers (ddpm, euler_a) draw their noise from our generator, for reproducibility.
        self.takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        self.grid = [int(round(float(t))) for t in self.scheduler.timesteps]

    @classmethod
    def for_training(cls, scheduler_config: dict[str, Any], train: TrainConfig) -> Rollout:
        refuse_epsilon_at_zero_snr(scheduler_config, "pretrained_model")
        sampler = SAMPLERS[train.noise_scheduler]
        keeps_zero_snr = "rescale_betas_zero_snr" in inspect.signature(sampler.__init__).parameters
        if scheduler_config.get("rescale_betas_zero_snr") and not keeps_zero_snr:
            others = ", ".join(
                name
                for name, other in SAMPLERS.items()
                if "rescale_betas_zero_snr" in inspect.signature(other.__init__).parameters
            )
            raise LecoError(
                f"train.noise_scheduler: {train.noise_scheduler} cannot sample this zero-terminal-SNR model "
                f"({sampler.__name__} drops rescale_betas_zero_snr: the rollouts would run on another noise "
                f"schedule than the loss reads); use {others}"
            )
        return cls(scheduler_config, train.noise_scheduler, train.max_denoising_steps, train.timestep_offset)

    def plan(self, count: int, generator: torch.Generator, copy: int = 0) -> list[SamplePlan]:
        """`count` samples of trajectory `copy` at distinct step counts, each with its training timestep."""
        steps = (torch.randperm(self.steps, generator=generator)[: min(count, self.steps)] + 1).tolist()
        plans = []
        for step in steps:
            high = self.grid[step - 1]  # the timestep the step's prediction is made at
            low = self.grid[step] if step < self.steps else 0  # exclusive
            timestep = high
            if self.timestep_offset and high - low > 1:
                timestep = high - int(torch.randint(0, high - low, (1,), generator=generator))
            plans.append(SamplePlan(step, timestep, copy))
        return plans

    @torch.no_grad()
    def run(
        self, model: GuidedModel, noise: Tensor, plans: list[SamplePlan], generator: torch.Generator
    ) -> list[Tensor]:
        """Trajectories from `noise` (one per plan copy, each an equal slice of the batch), as far as
        the plans need; returns their latents in order."""
        per_copy = len(noise) // (max(p.copy for p in plans) + 1)
        rows = [slice(p.copy * per_copy, (p.copy + 1) * per_copy) for p in plans]
        scheduler = self.scheduler
        scheduler.set_timesteps(self.steps, device=noise.device)
        latents = noise * scheduler.init_noise_sigma
        last = max(p.step for p in plans)
        results: dict[int, Tensor] = {}
        for index, t in enumerate(scheduler.timesteps[:last]):
            model_input = scheduler.scale_model_input(latents, t)  # the latent at t, VP-scaled
            due = [(i, p) for i, p in enumerate(plans) if p.step == index + 1]
            for i, plan in due:
                if plan.timestep == self.grid[index]:
                    results[i] = model_input[rows[i]].clone()
            needs_prediction = index < last - 1 or len(results) < len(plans)
            if not needs_prediction:
                break
            prediction = model(model_input, t)
            for i, plan in due:
                if i not in results:
                    latent, predicted = model_input[rows[i]], prediction[rows[i]]
                    results[i] = self.jump(latent, predicted, self.grid[index], plan.timestep)
            if index < last - 1:
                latents = self.advance(latents, prediction.float(), index, generator)
        return [results[i] for i in range(len(plans))]

    def advance(self, latents: Tensor, prediction: Tensor, index: int, generator: torch.Generator) -> Tensor:
        """The trajectory's next latent, at grid point `index + 1`.

        diffusers' DDIMScheduler.step moves to t - T // S, which is the next point of a trailing grid
        only where S divides T (a rollout of 30 steps would drift off the timesteps its latents are
        labelled with), so DDIM steps along the grid itself. The prediction comes in float32, because
        some samplers (euler_a) return the prediction's dtype and the latents stay float32.
        """
        if isinstance(self.scheduler, DDIMScheduler):
            return self.jump(latents, prediction, self.grid[index], self.grid[index + 1])
        extra = {"generator": generator} if self.takes_generator else {}
        return self.scheduler.step(prediction, self.scheduler.timesteps[index], latents, **extra).prev_sample

    def jump(self, latents: Tensor, prediction: Tensor, timestep: int, target: int) -> Tensor:
        """A deterministic DDIM step from `timestep` to any earlier `target` timestep.

        diffusers' DDIMScheduler.step only moves to the next point of its grid; here the target
        lies inside a grid interval, so the two-line DDIM update is written out.
        """
        alphas = self.alphas_cumprod.to(latents.device, torch.float32)
        a_t, a_target = alphas[timestep], alphas[target]
        x = latents.float()
        if self.prediction_type == "v_prediction":
            sample = a_t.sqrt() * x - (1 - a_t).sqrt() * prediction.float()
            noise = a_t.sqrt() * prediction.float() + (1 - a_t).sqrt() * x
        else:
            noise = prediction.float()
            sample = (x - (1 - a_t).sqrt() * noise) / a_t.sqrt()
        return (a_target.sqrt() * sample + (1 - a_target).sqrt() * noise).to(latents.dtype)

    def unet_calls(self, plans: list[SamplePlan]) -> int:
        """How many guided predictions `run` makes for these plans."""
        last = max(p.step for p in plans)
        exact_last = all(p.timestep == self.grid[p.step - 1] for p in plans if p.step == last)
        return last - 1 if exact_last else last


class SampleQueue:
    """Training samples: a random entry and target, one partial rollout (of the edited model, or a
    transplant's teacher for `teacher_share` of them), m latents.

    Entries are dealt from a shuffled deck (every entry once per round; `train.entry_order: random`
    draws each rollout's independently), then one of the entry's targets. A step takes up to
    `samples_per_step` latents of the current rollout; a new rollout starts when it is used up.
    """

    def __init__(
        self,
        rollout: Rollout,
        prompts: list[PreparedPrompt],
        edited: EditedModel,
        generator: torch.Generator,
        train: TrainConfig,
        vae_scale_factor: int,
        device: torch.device,
        teacher: Any = None,
        teacher_share: float = 0.0,
    ) -> None:
        """`teacher`: a transplant's leco.teacher.Teacher, which samples `teacher_share` of the rollouts."""
        self.rollout, self.prompts, self.edited, self.generator = rollout, prompts, edited, generator
        self.train, self.vae_scale_factor, self.device = train, vae_scale_factor, device
        self.samples: list[TrainingSample] = []
        self.deck: list[int] = []  # the entries still to be dealt this round
        self.teacher, self.teacher_share = teacher, teacher_share

    def next_entry(self) -> int:
        if self.train.entry_order == "random":
            return int(torch.randint(len(self.prompts), (1,), generator=self.generator))
        if not self.deck:
            self.deck = torch.randperm(len(self.prompts), generator=self.generator).tolist()
        return self.deck.pop()

    def next(self) -> list[TrainingSample]:
        if not self.samples:
            self.samples = self.roll_out()
        count = min(self.train.samples_per_step, len(self.samples))
        taken, self.samples = self.samples[:count], self.samples[count:]
        return taken

    def rest_of_rollout(self) -> list[list[TrainingSample]]:
        """Every step's samples still waiting in the current rollout (a new one if none wait)."""
        steps = [self.next()]
        while self.samples:
            steps.append(self.next())
        return steps

    @torch.no_grad()
    def roll_out(self) -> list[TrainingSample]:
        generator = self.generator
        index = self.next_entry()
        prompt = self.prompts[index]
        target = prompt.pick_target(generator)
        size = prompt.image_size(generator)
        crop = prompt.crop(*size, generator)
        scale = self.vae_scale_factor
        copies = self.train.parallel_rollouts
        batch = copies * prompt.batch_size
        shape = (batch, self.edited.unet.config.in_channels, size[0] // scale, size[1] // scale)
        # Drawn on the CPU so that a seed gives the same run on every device; latents stay fp32.
        noise = torch.randn(shape, generator=generator).to(self.device)
        m = self.train.samples_per_rollout
        plans = [plan for copy in range(copies) for plan in self.rollout.plan(m, generator, copy)]
        texts = prompt.texts(target)
        guidance = prompt.objective.rollout_guidance or self.train.rollout_guidance_scale
        by_teacher = self._by_teacher(generator)
        by_edited = self.train.rollout_model == "edited" and not by_teacher  # or the frozen model
        target_text, negative_text = texts["target"], texts["unconditional"]
        teacher_on_device = self.teacher.resident(self.device) if by_teacher else contextlib.nullcontext()
        with (
            self.edited.trainable.strength(prompt.settings.multiplier if by_edited else 0.0),
            teacher_on_device,
        ):  # the sampler made inside: trained text encoders read its prompts at this strength
            if by_teacher:
                model = self.teacher.guided(target_text, negative_text, guidance, size, crop)
            else:
                model = self.edited.guided(target_text, negative_text, guidance, size, crop, batch, by_edited)
            latents = self.rollout.run(model, noise, plans, generator)
        order = torch.randperm(len(plans), generator=generator).tolist()
        timesteps = [torch.full((prompt.batch_size,), plan.timestep, device=self.device) for plan in plans]
        return [TrainingSample(index, target, latents[i], timesteps[i], size, crop) for i in order]

    def _by_teacher(self, generator: torch.Generator) -> bool:
        """Whether the teacher samples this rollout (a draw only where both models sample some, so
        that runs without a teacher keep their random stream)."""
        if self.teacher_share in (0.0, 1.0):
            return self.teacher_share == 1.0
        return bool(torch.rand(1, generator=generator) < self.teacher_share)

    def state(self) -> dict[str, Any]:
        """The random stream, the entries still to be dealt and the latents still waiting."""
        return {
            "generator": self.generator.get_state(),
            "queue": [sample.to_state() for sample in self.samples],
            "entry_deck": list(self.deck),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.samples = [TrainingSample.from_state(item, self.device) for item in state["queue"]]
        self.deck = list(state.get("entry_deck", []))  # states saved before entries were dealt
