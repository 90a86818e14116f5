"""What one optimizer step trains: rollout samples, the rows trained at them, and the frozen
predictions those rows need.

A row is one trained prediction: the entry's target prompt at a sample's latents, or an anchor
prompt riding along at the same latents (objective: preserve). The frozen model's predictions for a
step do not depend on the training so far, so they can be asked for ahead of the step, for many
steps in one batched call (`ask_frozen_predictions`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from leco import objectives
from leco.config import AnchorConfig
from leco.preservation import draw_anchors
from leco.prompts import PreparedPrompt
from leco.rollout import SampleQueue, TrainingSample
from leco.teacher import Teachers

# Latent elements in one batched frozen-model call: 8 SD images at 512 px (64 x 64 x 4 latents
# each), the no-grad batch size sampling UIs use on 12 GB GPUs (not measured here: no GPU); on
# ink-digits a whole rollout's steps fit in one call.
TEACHER_CALL_PIXELS = 8 * 64 * 64 * 4

Request = tuple[int, dict[str, str]]  # (sample index, role -> prompt text)


@dataclass
class Row:
    """One trained prediction: a sample's latents, the prompts of every role, and its objective."""

    sample: int  # index into the step's samples
    texts: dict[str, str]  # role -> prompt text
    objective: objectives.Objective
    guidance_scale: float
    weight: float


@dataclass
class Step:
    """One optimizer step: its rollout samples, the anchors trained with them, and (once asked) the
    frozen predictions of its rows."""

    samples: list[TrainingSample]
    anchors: list[str]
    frozen: list[dict[str, torch.Tensor]] | None = None

    def to_state(self) -> dict[str, Any]:
        frozen = [{k: v.cpu() for k, v in p.items()} for p in self.frozen] if self.frozen else None
        return {"samples": [s.to_state() for s in self.samples], "anchors": self.anchors, "frozen": frozen}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> Step:
        samples = [TrainingSample.from_state(s, device) for s in state["samples"]]
        frozen = state["frozen"] and [{k: v.to(device) for k, v in p.items()} for p in state["frozen"]]
        return cls(samples, state["anchors"], frozen)


def rows_of(step: Step, prompts: list[PreparedPrompt], anchor_weight: float) -> list[Row]:
    """Each sample's target row, followed by its anchor rows."""
    prompt = prompts[step.samples[0].prompt]
    settings, preserve = prompt.settings, objectives.OBJECTIVES["preserve"]
    rows = []
    for i, sample in enumerate(step.samples):
        rows.append(
            Row(i, prompt.texts(sample.target), prompt.objective, settings.guidance_scale, settings.weight)
        )
        rows += [Row(i, {"target": a, "empty": ""}, preserve, 1.0, anchor_weight) for a in step.anchors]
    return rows


def one_call(steps: list[Step], rows: list[list[Row]]) -> tuple[list[TrainingSample], list[tuple[int, str]]]:
    """The steps' rows as one student UNet call: every sample, and each row's (sample index, target text)."""
    samples: list[TrainingSample] = []
    requests: list[tuple[int, str]] = []
    for step, step_rows in zip(steps, rows, strict=True):
        requests += [(len(samples) + row.sample, row.texts["target"]) for row in step_rows]
        samples += step.samples
    return samples, requests


def owners(steps: list[Step], rows: list[list[Row]]) -> list[int]:
    """The step each batch element of the `one_call` UNet call belongs to."""
    return [
        index
        for index, (step, step_rows) in enumerate(zip(steps, rows, strict=True))
        for row in step_rows
        for _ in range(len(step.samples[row.sample].latents))
    ]


def wanted(rows: list[Row], extra_roles: tuple[str, ...]) -> list[Request]:
    """The frozen predictions each row reads: its objective's roles and the trained part's extra ones."""
    return [(row.sample, {k: row.texts[k] for k in row.objective.roles + extra_roles}) for row in rows]


def ask_frozen_predictions(steps: list[Step], requests: list[list[Request]], teachers: Teachers) -> None:
    """Fills each step's `frozen` (one dict per request), batching steps into few teacher calls."""
    calls: list[list[int]] = [[]]
    pixels = 0
    for index, (step, asked) in enumerate(zip(steps, requests, strict=True)):
        size = sum(len(texts) for _, texts in asked) * step.samples[0].latents.numel()
        if calls[-1] and pixels + size > TEACHER_CALL_PIXELS:
            calls.append([])
            pixels = 0
        calls[-1].append(index)
        pixels += size
    for call in calls:
        samples: list[TrainingSample] = []
        batched: list[Request] = []
        for index in call:
            batched += [(len(samples) + where, texts) for where, texts in requests[index]]
            samples += steps[index].samples
        answers = iter(teachers.predict(samples, batched))
        for index in call:
            steps[index].frozen = [next(answers) for _ in requests[index]]


class StepQueue:
    """The steps of the current rollout, each with the frozen predictions its rows need.

    The frozen model does not change while the samples of one rollout are trained, so the
    predictions of all its steps are asked for when the rollout is made: one teacher call per
    rollout instead of one per step (benchmarks/time_to_erase.py, `teacher-per-step`).
    """

    def __init__(
        self,
        samples: SampleQueue,
        anchors: list[str],
        anchor_config: AnchorConfig,
        teachers: Teachers,
        extra_roles: tuple[str, ...],
    ) -> None:
        self.samples, self.anchors, self.anchor_config = samples, anchors, anchor_config
        self.teachers, self.extra_roles = teachers, extra_roles
        self.ready: list[Step] = []
        # (loss, gradients) of steps already taken from `ready` whose gradients came from one forward
        # (train.steps_per_forward); kept here so that a saved state holds them too.
        self.gradients: list[tuple[torch.Tensor, list[torch.Tensor]]] = []

    def next_steps(self, count: int) -> list[Step]:
        """Up to `count` steps, all of one rollout (the next one when none waits)."""
        steps = [self.next()]
        while len(steps) < count and self.ready:
            steps.append(self.ready.pop(0))
        return steps

    def next(self) -> Step:
        if not self.ready:
            per_step = self.anchor_config.per_step
            steps = [
                Step(samples, draw_anchors(self.anchors, per_step, self.samples.generator))
                for samples in self.samples.rest_of_rollout()
            ]
            ask_frozen_predictions(steps, [self.wanted(step) for step in steps], self.teachers)
            self.ready = steps
        return self.ready.pop(0)

    def rows(self, step: Step) -> list[Row]:
        return rows_of(step, self.samples.prompts, self.anchor_config.weight)

    def wanted(self, step: Step) -> list[Request]:
        return wanted(self.rows(step), self.extra_roles)

    def frozen(self, step: Step) -> list[dict[str, torch.Tensor]]:
        """The step's frozen predictions: asked for with its rollout, or now (a step made by hand)."""
        return step.frozen or self.teachers.predict(step.samples, self.wanted(step))

    def state(self) -> dict[str, Any]:
        """The random stream, and the latents, steps and gradients still waiting: what an exact resume
        needs."""
        waiting = [(loss.cpu(), [g.cpu() for g in gradients]) for loss, gradients in self.gradients]
        return {**self.samples.state(), "ready": [step.to_state() for step in self.ready], "waiting": waiting}

    def load_state(self, state: dict[str, Any], device: torch.device) -> None:
        self.samples.load_state(state)
        self.ready = [Step.from_state(step, device) for step in state.get("ready", [])]
        waiting = state.get("waiting", [])  # none in states saved before steps shared a forward
        self.gradients = [(loss.to(device), [g.to(device) for g in grads]) for loss, grads in waiting]
