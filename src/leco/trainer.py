"""The LECO training loop.

One step: latents from a partial rollout of the edited model (leco.rollout) with the frozen model's
predictions its entry's objective needs (leco.teacher, a rollout's steps at once: leco.steps), made
a training target (leco.objectives) that the trained part's prediction moves to. What is trained, a
LoRA or a token embedding, sits behind leco.trainable. Read `objective_loss`, then `train_step`.
"""

from __future__ import annotations

import contextlib
import functools
import random
import secrets
import signal
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from leco import objectives
from leco.checkpoints import (
    StopRequest,
    check_before_loading,
    read_state,
    resumed_with,
    run_metadata,
    state_parts_of,
)
from leco.conditioning import NO_EMBEDDINGS_IN_TRAINING, warn_if_misread
from leco.config import LecoConfig
from leco.distributed import Ranks
from leco.errors import Terminated, warn
from leco.models import (
    DTYPES,
    LoadedModels,
    autocast_for,
    load_models,
    pick_device,
    prepare_for_training,
    sampling_for,
    training_dtype,
)
from leco.objectives import Predictions
from leco.optim import Updates, non_finite_loss
from leco.preservation import TextAnchors, anchor_prompts, entries_and_anchors
from leco.preview import preview_size, render_preview
from leco.prompts import encode_texts, prepare_prompts, prompt_texts
from leco.rollout import Rollout, SampleQueue
from leco.step_gradients import step_gradients
from leco.steps import Row, Step, StepQueue, one_call, owners
from leco.teacher import teachers_of_run
from leco.tracking import Progress
from leco.trainable import EditedModel, Trainable, create_trainable


@dataclass
class TrainResult:
    path: Path  # the last file written
    state: Path | None  # the resumable state folder (for --resume); None for a closed-form edit
    steps: int
    interrupted: bool
    trainable: Trainable
    stopped_by: int | None = None  # the signal that stopped it; None where another process's did


class Trainer:
    def __init__(
        self,
        config: LecoConfig,
        *,
        progress: bool = True,
        resume: str | Path | None = None,
        overwrite: bool = False,
        models: LoadedModels | None = None,  # already loaded (benchmarks on built models); default: load
    ) -> None:
        self.config, self.progress = config, progress
        self.resume_source, self.overwrite = Path(resume) if resume is not None else None, overwrite
        train = config.train
        requested = pick_device(train.device)
        self.ranks = Ranks(requested)  # data-parallel processes, if launched so
        self.device = self.ranks.device(requested)
        self.dtype = training_dtype(self.device, train.precision)
        self.autocast = functools.partial(autocast_for, self.device, self.dtype)
        self.seed = train.seed if train.seed not in (None, -1) else random.SystemRandom().randrange(2**31)
        self.resumes: list[dict[str, Any]] = []  # where the run was resumed with other settings
        self.run_id = secrets.token_hex(8)  # a resumed run keeps its first one: one W&B run, not two
        self.folder = check_before_loading(config, self.resume_source, overwrite, self.ranks.is_main)
        previews = bool(config.preview.prompts)
        state = read_state(resume, config.to_json(), self.ranks.count) if resume is not None else None
        models = models or load_models(config.pretrained_model, dtype=self.dtype, with_vae=previews)
        self.models = models
        anchors = anchor_prompts(config.anchors, config.prompts, models.folder)
        entries, self.anchors = entries_and_anchors(config, anchors)
        self.prompts = prepare_prompts(entries, models, train)
        self.preview_size = preview_size(config.preview, self.prompts[0].size)
        recommended = sampling_for(models)  # the model's card, read once, as leco generate reads it
        recommended_pair = (recommended.steps, recommended.guidance)
        self.preview_sampling = config.preview.sampling(recommended_pair, config.distills_only)
        texts = [*prompt_texts(self.prompts), *self.anchors]
        embeddings = encode_texts(models, texts, config.pretrained_model.clip_skip, self.device)
        self.unet = prepare_for_training(models.unet, self.device, config)
        torch.manual_seed(self.seed)  # the trained part's initial weights
        self.trainable = create_trainable(models, config, self.device)
        warn_if_misread(
            models, config.preview.prompts, "preview prompt", embedding_hint=NO_EMBEDDINGS_IN_TRAINING
        )
        self.edited = EditedModel(self.unet, self.trainable, embeddings, models.family.is_sdxl, self.autocast)
        self.teachers = teachers_of_run(config, self.edited, models, self.prompts, self.dtype, self.device)
        self.text_anchors = TextAnchors.of_run(config, anchors, embeddings)
        fp16 = self.dtype == torch.float16
        self.updates = Updates(train, self.trainable.parameters(), self.device, fp16=fp16)
        rollout = Rollout.for_training(models.scheduler_config, train)
        # Entries, rollouts, timesteps, anchors: each process draws its own.
        self.generator = torch.Generator().manual_seed(self.seed + self.ranks.index)
        teacher_share = config.teacher.rollout_share if config.teacher else 0.0  # of the rollouts
        queue = (rollout, self.prompts, self.edited, self.generator, train, models.vae_scale_factor)
        self.samples = SampleQueue(*queue, self.device, self.teachers.concept, teacher_share)
        roles = self.trainable.extra_roles
        self.step_queue = StepQueue(self.samples, self.anchors, config.anchors, self.teachers, roles)
        alphas_cumprod, v_prediction = self.teachers.frozen.alphas_cumprod, models.family.v_pred
        self.snr_weights = objectives.min_snr_weighting(train.min_snr_gamma, alphas_cumprod, v_prediction)
        self.step = 0
        if state is not None:
            self.resume(state, resume)

    # -- one training step ------------------------------------------------------------------------

    def train_step(self) -> float:
        waiting = self.step_queue.gradients
        if not waiting:  # the next steps' gradients, from one batched forward and backward
            waiting += self.step_gradients(self.step_queue.next_steps(self.config.train.steps_per_forward))
        loss, gradients = waiting.pop(0)
        self.updates.start(gradients)
        if self.text_anchors is not None:  # a function of the weights alone: taken as they are now
            text_loss = self.text_anchors.loss(self.trainable, self.step)
            self.updates.backward(text_loss)
            loss = loss + text_loss.detach()
        if self.ranks.any(not torch.isfinite(loss), self.device):
            raise non_finite_loss(self.step + 1, loss.item(), self.dtype)
        self.ranks.mean_gradients(self.trainable.parameters())
        self.updates.step()
        self.step += 1
        return self.ranks.mean(loss.item(), self.device)

    def step_gradients(self, steps: list[Step]) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """Each step's objective loss and gradient (unscaled), from one student UNet call and one
        backward at the weights as they are now (leco.step_gradients)."""
        self.updates.start()
        parameters, modules = self.trainable.parameters(), self.trainable.weight_modules()
        step_owners = owners(steps, [self.step_queue.rows(step) for step in steps])
        # The backward too at the entry's strength: gradient checkpointing recomputes layers in it.
        with self.strength(steps), step_gradients(parameters, modules, step_owners) as gradients:
            losses = self.step_losses(steps)
            self.updates.backward(torch.stack(losses).sum())
        grouped = gradients.by_group()
        return [(loss.detach(), self.updates.unscaled(g)) for loss, g in zip(losses, grouped, strict=True)]

    def step_losses(self, steps: list[Step]) -> list[torch.Tensor]:
        """Each step's objective loss, the student's predictions for all of them from one UNet call."""
        rows = [self.step_queue.rows(step) for step in steps]
        frozen = [self.step_queue.frozen(step) for step in steps]
        student = iter(self.edited.student(*one_call(steps, rows)))
        return [self.objective_loss(*each, student) for each in zip(steps, rows, frozen, strict=True)]

    def strength(self, steps: list[Step]) -> AbstractContextManager:
        """The trained part at the strength the steps' entry trains (all of one rollout: one entry)."""
        return self.trainable.strength(self.prompts[steps[0].samples[0].prompt].settings.multiplier)

    def objective_loss(
        self, step: Step, rows: list[Row], frozen: list[Predictions], student: Iterator[torch.Tensor]
    ) -> torch.Tensor:
        """The step's weighted objective losses, averaged over its samples, from the trained predictions
        of its rows (`student`, in row order) and the frozen ones.

        Rows: the entry's target prompt at each sample, plus anchor prompts riding along at the same
        latents (objective: preserve); see leco.steps.
        """
        total = torch.zeros((), device=self.device)
        for row, predictions in zip(rows, frozen, strict=True):
            conditional_target = row.objective.target(predictions, row.guidance_scale)
            target = self.trainable.training_target(conditional_target, predictions)
            weights = self.snr_weights(step.samples[row.sample].timesteps)
            total = total + row.weight * objectives.loss(next(student), target, weights)
        return total / len(step.samples)

    def loss(self, step: Step) -> torch.Tensor:
        """One step's loss at the weights as they are (the anchors' text term included)."""
        with self.strength([step]):  # a backward of it outside recomputes checkpointed layers at 1
            (loss,) = self.step_losses([step])
        if self.text_anchors is None:
            return loss
        return loss + self.text_anchors.loss(self.trainable, self.step)

    # -- saving and resuming ----------------------------------------------------------------------

    def save(self, suffix: str) -> Path:
        """The trained file and the resumable state, as of now (the main process writes them)."""
        state = {  # every process takes part in gathering it
            "step": self.step,
            "seed": self.seed,
            "config": self.config.to_json(),
            "trainable": self.trainable.state_dict(),
            **self.updates.state_dict(),  # optimizer, lr_scheduler, scaler
            "ranks": self.ranks.gather(self.step_queue.state()),  # each process's own, in rank order
            "resumes": self.resumes,
            "run_id": self.run_id,
        }
        if not self.ranks.is_main:
            return self.folder.file(suffix)
        save, entries = self.config.save, [p.settings for p in self.prompts]
        trained_in = next(name for name, dtype in DTYPES.items() if dtype == self.dtype)
        metadata = run_metadata(self.config, entries, self.step, self.seed, self.resumes, trained_in)
        resolution, dtype = max(max(p.size) for p in self.prompts), DTYPES[save.precision]
        return self.folder.save(
            self.trainable, suffix, state, metadata, dtype, resolution, save.max_step_files
        )

    def resume(self, state: dict[str, Any], path: str | Path) -> None:
        """Continue from a state read_state() checked (before the models were loaded)."""
        self.trainable.load_state_dict(state["trainable"], source=str(path))
        with state_parts_of(path):  # a damaged part: one line, not a traceback
            self.updates.load_state_dict(state)
            self.step_queue.load_state(state["ranks"][self.ranks.index], self.device)
        self.step, self.seed = state["step"], state["seed"]
        self.run_id = state.get("run_id", self.run_id)  # states of earlier releases have none
        self.resumes = resumed_with(state, self.config.to_json())

    def save_if_due(self, stop: StopRequest) -> None:
        save, preview, suffix = self.config.save, self.config.preview, f"{self.step}steps"
        if self.step % save.per_steps == 0:
            with stop.saving():
                self.save(suffix)
        # A stop asked for meanwhile is not kept waiting by a grid: the run saves and stops first.
        if self.step % (preview.every or save.per_steps) == 0 and not stop.requested:
            self.render_preview(suffix)

    def render_preview(self, suffix: str) -> None:
        """The preview grid as of now, written by the main process when the config asks for one."""
        preview, size, grid = self.config.preview, self.preview_size, self.folder.preview_file(suffix)
        if self.ranks.is_main and preview.prompts:
            path = self.folder.grid_target(grid)  # beside an earlier run --overwrite replaces: a temp name
            skip = self.config.pretrained_model.clip_skip
            render_preview(
                self.models,
                self.trainable,
                preview,
                size,
                path,
                self.device,
                self.autocast(),
                skip,
                self.preview_sampling,
            )

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        iterations, main = self.config.train.iterations, self.ranks.is_main  # main: writes files and logs
        with contextlib.ExitStack() as cleanup:  # the lock, logs and bar are released on any exit
            if main:
                self.folder.open(overwrite=self.overwrite, resume_source=self.resume_source)
                if self.resume_source is not None:
                    self.folder.keep_final_files(self.step)
                cleanup.callback(self.folder.close)
            progress = Progress(self.config, self.step, self.run_id, show=self.progress, main=main)
            cleanup.callback(progress.close)
            stopping = False
            with StopRequest() as stop:
                while self.step < iterations and not stopping:
                    loss = self.train_step()
                    progress.update(self.step, loss, self.updates.lr)
                    if self.step < iterations:  # the last step is saved below
                        self.save_if_due(stop)
                    stopping = self.ranks.any(stop.requested, self.device)
                stopping = stopping and self.step < iterations  # a stop during the last step: finished
                suffix = "interrupted" if stopping else "last"
                with stop.saving():
                    path = self.save(suffix)
            if stop.wants_exit_now:
                name = signal.Signals(stop.by_signal).name
                if main and self.config.preview.prompts:  # data-parallel: said once
                    skipped = f"the {suffix} preview grid was skipped ({name} asks for a quick exit)"
                    warn(f"{skipped}; the file is saved")
            else:
                try:
                    self.render_preview(suffix)  # saved: Ctrl-C now ends the preview at once
                except (KeyboardInterrupt, Terminated):
                    warn(f"the {suffix} preview grid was skipped (stopped); the trained file was saved first")
        stopped_by = stop.by_signal if stopping else None
        return TrainResult(path, self.folder.state_dir, self.step, stopping, self.trainable, stopped_by)
