"""The LECO training loop.

One step: take a latent from a partial rollout made with the LoRA on (leco.rollout), ask the frozen
model (LoRA off) for its positive/neutral/unconditional predictions in one batched call, and move
the LoRA's prediction for the target prompt towards neutral -/+ g * (positive - unconditional)
(leco.objectives). Read `Trainer.train_step` first; everything else is setup and saving.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from leco.conditioning import Conditioning, predict
from leco.config import LecoConfig, load_config
from leco.errors import LecoError
from leco.generate import SamplingSettings, build_pipeline, generate, requests_for
from leco.models import load_models, pick_device
from leco.network import LoRANetwork
from leco.objectives import guided, leco_loss, leco_target
from leco.optim import build_lr_scheduler, build_optimizer
from leco.preview import make_grid, save_image
from leco.prompts import PreparedPrompt, conditioning_for, encode_texts, prepare_prompts, prompt_texts
from leco.rollout import GuidedModel, Rollout
from leco.tracking import Tracker
from leco.training_state import read_state, state_dir, write_state

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class TrainingSample:
    """A latent from a rollout, waiting for its training step."""

    prompt: int
    latents: torch.Tensor  # [batch, channels, h, w], at `timesteps`
    timesteps: torch.Tensor  # [batch], integer training timesteps
    size: tuple[int, int]  # image (height, width) in pixels
    crop: tuple[int, int]


@dataclass
class TrainResult:
    path: Path  # the last LoRA file written
    state: Path  # the resumable state folder (for --resume)
    steps: int
    interrupted: bool
    network: LoRANetwork
    unet_calls: int  # UNet calls this run made (rollouts, teacher, student)


class Trainer:
    def __init__(self, config: LecoConfig, *, progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        train = config.train
        self.device = pick_device(train.device)
        self.dtype = DTYPES[train.precision]
        if self.device.type == "cpu" and self.dtype == torch.float16:
            print("leco: warning: fp16 is not supported well on the CPU; training in fp32")
            self.dtype = torch.float32
        self.seed = train.seed if train.seed is not None else random.SystemRandom().randrange(2**31)

        models = load_models(config.pretrained_model, dtype=self.dtype, with_vae=bool(config.preview.prompts))
        self.models = models
        for encoder in models.text_encoders:
            encoder.to(self.device)
        texts = prompt_texts(config.prompts) + config.anchors.prompts
        embeddings = encode_texts(models, texts, config.pretrained_model.clip_skip, str(self.device))
        self.prompts = prepare_prompts(config.prompts, embeddings, models, train)
        self.anchors = [embeddings[text] for text in config.anchors.prompts]
        for encoder in models.text_encoders:  # embeddings are cached: free the GPU for the UNet
            encoder.to("cpu")
        self.unet = models.unet.to(self.device)
        self._configure_unet()

        torch.manual_seed(self.seed)  # the LoRA's initial down weights
        self.network = LoRANetwork.create(self.unet, models.family, config.network)
        self.optimizer = build_optimizer(
            train.optimizer, self.network.parameters(), train.lr, train.optimizer_args
        )
        self.lr_scheduler = build_lr_scheduler(
            train.lr_scheduler,
            self.optimizer,
            train.iterations,
            train.lr_warmup_steps,
            train.lr_scheduler_args,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.rollout = Rollout(
            models.scheduler_config, train.noise_scheduler, train.max_denoising_steps, train.timestep_offset
        )
        self.generator = torch.Generator().manual_seed(self.seed)  # prompts, rollouts, timesteps
        self.queue: list[TrainingSample] = []
        self.step = 0
        self.unet_calls = 0

    # -- one training step ------------------------------------------------------------------------

    def train_step(self) -> float:
        loss = self.loss(self.next_sample())
        if not torch.isfinite(loss):
            raise LecoError(
                f"training stopped at step {self.step + 1}: the loss became {loss.item()}; use "
                "train.precision: bf16 or fp32 (fp16 overflows easily), or a lower train.lr"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.train.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.config.train.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        self.step += 1
        return loss.item()

    def loss(self, sample: TrainingSample) -> torch.Tensor:
        """The LECO loss of the LoRA'd model (student) against the frozen model's target.

        Anchor prompts ride along in the same two UNet calls: their student predictions must stay
        what the frozen model predicts for them.
        """
        prompt = self.prompts[sample.prompt]
        anchors = self.pick_anchors()
        teacher, teacher_anchors = self.teacher_predictions(prompt, sample, anchors)
        settings = prompt.settings
        target = leco_target(
            settings.action,
            teacher["neutral"],
            teacher["positive"],
            teacher["unconditional"],
            settings.guidance_scale,
        )
        cond = self.conditioning(
            Conditioning.cat([prompt.target, *anchors]), prompt, sample.size, sample.crop
        )
        rows = 1 + len(anchors)
        with self.network.strength(settings.multiplier), self.autocast():
            student = self.predict(sample.latents.repeat(rows, 1, 1, 1), sample.timesteps.repeat(rows), cond)
        student, student_anchors = student[: len(target)], student[len(target) :]
        loss = leco_loss(student, target)
        if anchors:
            loss = loss + self.config.anchors.weight * leco_loss(student_anchors, teacher_anchors)
        return loss

    @torch.no_grad()
    def teacher_predictions(
        self, prompt: PreparedPrompt, sample: TrainingSample, anchors: list[Conditioning] | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The frozen model's positive/neutral/unconditional (and anchor) predictions in ONE UNet call."""
        anchors = anchors or []
        rows = len(prompt.teacher) + len(anchors)
        cond = self.conditioning(
            Conditioning.cat([prompt.teacher, *anchors]), prompt, sample.size, sample.crop
        )
        with self.network.strength(0.0), self.autocast():
            out = self.predict(sample.latents.repeat(rows, 1, 1, 1), sample.timesteps.repeat(rows), cond)
        chunks = out.chunk(rows)
        roles = {role: chunks[row] for role, row in prompt.teacher_rows.items()}
        return roles, torch.cat(chunks[len(prompt.teacher) :]) if anchors else out[:0]

    def pick_anchors(self) -> list[Conditioning]:
        if not self.anchors:
            return []
        count = min(self.config.anchors.per_step, len(self.anchors))
        return [self.anchors[i] for i in torch.randperm(len(self.anchors), generator=self.generator)[:count]]

    def next_sample(self) -> TrainingSample:
        """Pop the next latent; when none is left, run a new rollout for a randomly chosen prompt."""
        if not self.queue:
            self.queue = self.rollout_samples()
        return self.queue.pop(0)

    @torch.no_grad()
    def rollout_samples(self) -> list[TrainingSample]:
        index = int(torch.randint(len(self.prompts), (1,), generator=self.generator))
        prompt = self.prompts[index]
        height, width = prompt.image_size(self.generator)
        crop = prompt.crop(height, width, self.generator)
        scale = self.models.vae_scale_factor
        shape = (prompt.batch_size, self.unet.config.in_channels, height // scale, width // scale)
        # Latents stay fp32 (autocast runs the UNet in the training precision); drawn on the CPU so a
        # seed gives the same run on every device.
        noise = torch.randn(shape, generator=self.generator).to(self.device)
        plans = self.rollout.plan(self.config.train.samples_per_rollout, self.generator)
        model = self.guided_model(prompt, (height, width), crop)
        with self.network.strength(prompt.settings.multiplier):  # "as the edited model would generate"
            latents = self.rollout.run(model, noise, plans, self.generator)
        order = torch.randperm(len(plans), generator=self.generator).tolist()
        batch = prompt.batch_size
        return [
            TrainingSample(
                index,
                latents[i],
                torch.full((batch,), plans[i].timestep, device=self.device),
                (height, width),
                crop,
            )
            for i in order
        ]

    def guided_model(
        self, prompt: PreparedPrompt, size: tuple[int, int], crop: tuple[int, int]
    ) -> GuidedModel:
        """The edited model (LoRA on) with classifier-free guidance on the target prompt."""
        scale = self.config.train.rollout_guidance_scale
        target = self.conditioning(prompt.target, prompt, size, crop)
        both = Conditioning.cat([self.conditioning(prompt.unconditional, prompt, size, crop), target])

        def model(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                if scale == 1.0:  # no guidance, no doubled batch
                    return self.predict(latents, timestep, target)
                unconditional, conditional = self.predict(
                    torch.cat([latents, latents]), timestep, both
                ).chunk(2)
            return guided(unconditional, conditional, scale)

        return model

    # -- helpers ----------------------------------------------------------------------------------

    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        self.unet_calls += 1
        return predict(self.unet, latents, timesteps, cond)

    def conditioning(
        self, embeds: Conditioning, prompt: PreparedPrompt, size: tuple[int, int], crop: tuple[int, int]
    ) -> Conditioning:
        return conditioning_for(embeds, prompt.batch_size, *size, crop, self.models.family.is_sdxl)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _configure_unet(self) -> None:
        if self.config.other.use_xformers:
            try:
                self.unet.enable_xformers_memory_efficient_attention()
            except (ModuleNotFoundError, ValueError) as error:
                print(
                    f"leco: warning: xformers unavailable ({str(error).splitlines()[0][:80]}); "
                    "using PyTorch SDPA"
                )
        if self.config.train.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()

    # -- saving and resuming ----------------------------------------------------------------------

    def save(self, suffix: str) -> Path:
        save = self.config.save
        path = Path(save.path) / f"{save.name}_{suffix}.safetensors"
        extra = {
            "leco.config": self.config.model_dump(mode="json"),
            "leco.prompts": [p.settings.model_dump() for p in self.prompts],
            "leco.step": str(self.step),
            "leco.seed": str(self.seed),
            "ss_steps": str(self.step),
            "ss_sd_model_name": Path(self.models.source).name,
        }
        self.network.save(
            path,
            dtype=DTYPES[save.precision],
            resolution=self.prompts[0].resolution,
            title=save.name,
            extra_metadata=extra,
        )
        write_state(state_dir(save.path, save.name), self.state())
        return path

    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "seed": self.seed,
            "config": self.config.to_json(),
            "lora": self.network.kohya_state_dict(torch.float32),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
            "queue": [
                {
                    "prompt": s.prompt,
                    "latents": s.latents.cpu(),
                    "timesteps": s.timesteps.cpu(),
                    "size": list(s.size),
                    "crop": list(s.crop),
                }
                for s in self.queue
            ],
        }

    def resume(self, path: str | Path) -> None:
        state = read_state(path, self.config.to_json())
        self.network.load_kohya_state_dict(state["lora"], source=str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self.step, self.seed = state["step"], state["seed"]
        self.queue = [
            TrainingSample(
                q["prompt"],
                q["latents"].to(self.device),
                q["timesteps"].to(self.device),
                tuple(q["size"]),
                tuple(q["crop"]),
            )
            for q in state["queue"]
        ]

    # -- previews ---------------------------------------------------------------------------------

    def preview_due(self) -> bool:
        preview = self.config.preview
        every = preview.every or self.config.save.per_steps
        return bool(preview.prompts) and self.step % every == 0 and self.step < self.config.train.iterations

    @torch.no_grad()
    def render_preview(self, suffix: str) -> Path:
        """A strengths x prompts x seeds grid of the LoRA as it is now."""
        preview, save = self.config.preview, self.config.save
        parts = [*self.models.text_encoders, self.models.vae]
        for part in parts:
            part.to(self.device)
        pipe = build_pipeline(self.models)
        size = self.prompts[0].resolution
        settings = SamplingSettings(preview.steps, preview.guidance, size, size)
        requests = requests_for(preview.prompts, preview.strengths, preview.seeds)

        def set_strength(value: float) -> None:
            self.network.multiplier = value

        try:
            with self.autocast():
                images = dict(generate(pipe, requests, settings, set_strength, progress=False))
        finally:
            self.network.multiplier = 1.0
            for part in parts:
                part.to("cpu")
        return save_image(make_grid(images).image, Path(save.path) / "previews" / f"{save.name}_{suffix}.png")

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        train, save = self.config.train, self.config.save
        tracker = Tracker(self.config)
        bar = tqdm(
            total=train.iterations,
            initial=self.step,
            desc=save.name,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        interrupted = False
        try:
            with StopRequest() as stop:
                while self.step < train.iterations:
                    loss = self.train_step()
                    lr = self.lr_scheduler.get_last_lr()[0]
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3e}", lr=f"{lr:.2e}", refresh=False)
                    tracker.log({"loss": loss, "lr": lr}, self.step)
                    if self.step % save.per_steps == 0 and self.step < train.iterations:
                        self.save(f"{self.step}steps")
                    if self.preview_due():
                        self.render_preview(f"{self.step}steps")
                    if stop.requested:
                        interrupted = True
                        break
        finally:
            bar.close()
            tracker.close()
        suffix = "interrupted" if interrupted else "last"
        path = self.save(suffix)
        if self.config.preview.prompts:
            self.render_preview(suffix)
        state = state_dir(save.path, save.name)
        return TrainResult(path, state, self.step, interrupted, self.network, self.unet_calls)


class StopRequest:
    """Ctrl-C asks the loop to stop after the current step (and save); a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nleco: stopping after this step and saving (Ctrl-C again to abort without saving)", flush=True
        )


def train(
    config: LecoConfig | str | Path, *, resume: str | Path | None = None, progress: bool = True
) -> TrainResult:
    """Train a LECO LoRA as the config says; returns where the final file was written."""
    if not isinstance(config, LecoConfig):
        config = load_config(config)
    trainer = Trainer(config, progress=progress)
    if resume is not None:
        trainer.resume(resume)
    return trainer.run()
