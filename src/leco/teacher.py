"""The frozen model's predictions: what the edited model is trained towards.

A `Teacher` answers, for latents at known timesteps, what a frozen UNet predicts for named prompt
texts, all in ONE batched UNet call, returned in the *student's* prediction type. The usual
teacher is the student's own UNet with the trained part switched off; a transplant plugs in
another model with the same latent space (its own tokenizer, text encoders and prediction type).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from leco.conditioning import Conditioning, conditioning_for, predict
from leco.config import LecoConfig, TeacherConfig
from leco.errors import LecoError, warn
from leco.models import TEACHER_OPTION_NAMES, LoadedModels, load_models
from leco.objectives import CONCEPT_ROLES, guided
from leco.prompts import PreparedPrompt, encode_texts, prompt_texts
from leco.samplers import refuse_epsilon_at_zero_snr, training_alphas_cumprod
from leco.trainable import EditedModel, Trainable


class Sample(Protocol):
    latents: Tensor
    timesteps: Tensor
    size: tuple[int, int]
    crop: tuple[int, int]


@dataclass
class Block:
    """Predictions wanted at one batch of latents: one per distinct text."""

    latents: Tensor  # [batch, channels, h, w]
    timesteps: Tensor  # [batch]
    size: tuple[int, int]  # image (height, width) in pixels, for SDXL's size ids
    crop: tuple[int, int]
    texts: list[str]


class Teacher:
    def __init__(
        self,
        unet: torch.nn.Module,
        embeddings: dict[str, Conditioning],
        *,
        prediction_type: str,
        student_prediction_type: str,
        alphas_cumprod: Tensor,
        sdxl: bool,
        autocast: Callable[[], AbstractContextManager],
        frozen: Callable[[], AbstractContextManager] = contextlib.nullcontext,
        offload: bool = False,
    ) -> None:
        self.unet = unet
        self.embeddings = embeddings  # text -> its encoding by this model's own text encoders
        self.prediction_type = prediction_type
        self.student_prediction_type = student_prediction_type
        self.alphas_cumprod = alphas_cumprod.float()
        self.sdxl = sdxl
        self.autocast = autocast
        self.frozen = frozen  # switches the student's trained part off when the teacher is the student
        self.offload = offload  # keep the UNet on the CPU between calls (a second model on a small GPU)
        self.resident_on: torch.device | None = None  # where it stays for a while (see `resident`)

    @classmethod
    def of_student(
        cls,
        models: LoadedModels,
        embeddings: dict[str, Conditioning],
        trainable: Trainable,
        autocast: Callable[[], AbstractContextManager],
    ) -> Teacher:
        """The student's own UNet with the trained part switched off."""
        return cls(
            models.unet,
            embeddings,
            prediction_type=models.family.prediction_type,
            student_prediction_type=models.family.prediction_type,
            alphas_cumprod=training_alphas_cumprod(models.scheduler_config),
            sdxl=models.family.is_sdxl,
            autocast=autocast,
            frozen=lambda: trainable.strength(0.0),
        )

    @torch.no_grad()
    def predict(self, blocks: list[Block]) -> list[dict[str, Tensor]]:
        """For each block, text -> prediction (float32, the student's prediction type)."""
        blocks_with_texts = [b for b in blocks if b.texts]
        if not blocks_with_texts:
            return [{} for _ in blocks]
        if len(blocks_with_texts) < len(blocks):  # a teacher asked nothing at some samples
            answered = iter(self.predict(blocks_with_texts))
            return [next(answered) if b.texts else {} for b in blocks]
        latents = torch.cat([b.latents.repeat(len(b.texts), 1, 1, 1) for b in blocks])
        timesteps = torch.cat([b.timesteps.repeat(len(b.texts)) for b in blocks])
        cond = Conditioning.cat([self.conditioning(b) for b in blocks])
        moves = self.offload and self.resident_on is None
        if moves:
            self.unet.to(latents.device)
        try:
            with self.frozen(), self.autocast():
                out = predict(self.unet, latents, timesteps, cond).float()
        finally:
            if moves:
                self.unet.to("cpu")
        out = convert_prediction(
            out, latents, timesteps, self.alphas_cumprod, self.prediction_type, self.student_prediction_type
        )
        results, row = [], 0
        for block in blocks:
            batch = block.latents.shape[0]
            results.append(
                {text: out[row + i * batch : row + (i + 1) * batch] for i, text in enumerate(block.texts)}
            )
            row += batch * len(block.texts)
        return results

    @contextlib.contextmanager
    def resident(self, device: torch.device) -> Iterator[None]:
        """An offloaded UNet kept on `device` for many calls (a rollout's every step): moved there
        and back once, not at each call."""
        if not self.offload or self.resident_on is not None:
            yield
            return
        self.unet.to(device)
        self.resident_on = device
        try:
            yield
        finally:
            self.resident_on = None
            self.unet.to("cpu")

    def guided(
        self, target: str, unconditional: str, scale: float, size: tuple[int, int], crop: tuple[int, int]
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """Sampling `target` with this model and classifier-free guidance, in the student's
        prediction type (for rollouts on the teacher's own trajectories)."""
        texts = [target] if scale == 1.0 else [unconditional, target]

        def model(latents: Tensor, timestep: Tensor) -> Tensor:
            timesteps = timestep.reshape(-1).expand(latents.shape[0])
            answer = self.predict([Block(latents, timesteps, size, crop, texts)])[0]
            if scale == 1.0:
                return answer[target]
            return guided(answer[unconditional], answer[target], scale)

        return model

    def conditioning(self, block: Block) -> Conditioning:
        embeds = Conditioning.cat([self.embeddings[text] for text in block.texts])
        return conditioning_for(embeds, block.latents.shape[0], block.size, block.crop, self.sdxl)


class Teachers:
    """Who answers which role: concept roles from the teacher model if there is one, the rest from the
    frozen student. With no teacher model every role comes from one batched call."""

    def __init__(self, frozen: Teacher, concept: Teacher | None = None) -> None:
        self.frozen = frozen
        self.concept = concept or frozen

    def source(self, role: str) -> Teacher:
        return self.concept if role in CONCEPT_ROLES else self.frozen

    def predict(
        self, samples: list[Sample], wanted: list[tuple[int, dict[str, str]]]
    ) -> list[dict[str, Tensor]]:
        """For each (sample index, role -> text) request, role -> prediction at that sample's latents."""
        answers = {}
        for teacher in dict.fromkeys((self.frozen, self.concept)):
            blocks = []
            for index, sample in enumerate(samples):
                texts = [
                    text
                    for where, roles in wanted
                    if where == index
                    for role, text in roles.items()
                    if self.source(role) is teacher
                ]
                blocks.append(
                    Block(
                        sample.latents, sample.timesteps, sample.size, sample.crop, list(dict.fromkeys(texts))
                    )
                )
            answers[id(teacher)] = teacher.predict(blocks)
        return [
            {role: answers[id(self.source(role))][where][text] for role, text in roles.items()}
            for where, roles in wanted
        ]


def convert_prediction(
    prediction: Tensor, latents: Tensor, timesteps: Tensor, alphas_cumprod: Tensor, source: str, target: str
) -> Tensor:
    """A noise (epsilon) or v prediction at x_t, expressed as the other kind.

    With a = alpha_bar_t and x_t = sqrt(a) x0 + sqrt(1 - a) eps, v = sqrt(a) eps - sqrt(1 - a) x0
    (diffusers' `get_velocity`), so eps = sqrt(a) v + sqrt(1 - a) x_t and
    v = (eps - sqrt(1 - a) x_t) / sqrt(a).
    """
    if source == target:
        return prediction
    a = alphas_cumprod.to(latents.device)[timesteps.long()].view(-1, *[1] * (latents.ndim - 1))
    x = latents.float()
    if source == "v_prediction" and target == "epsilon":
        return a.sqrt() * prediction + (1 - a).sqrt() * x
    if source == "epsilon" and target == "v_prediction":
        return (prediction - (1 - a).sqrt() * x) / a.sqrt()
    raise ValueError(f"cannot convert a {source} prediction to {target}")


def load_teacher(
    config: TeacherConfig,
    student: LoadedModels,
    texts: list[str],
    dtype: torch.dtype,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> Teacher:
    """Another model as the teacher of the concept roles; checked for a shared latent space first."""
    try:
        models = load_models(config, dtype=dtype, names=TEACHER_OPTION_NAMES)
    except LecoError as error:  # said of the teacher, not of the model being trained
        message = str(error)
        raise LecoError(
            message if message.startswith("teacher.") else f"teacher.name_or_path: {message}"
        ) from None
    check_compatible(student, models, config.name_or_path)
    if _same_file(models.source, student.source):
        warn(
            f"teacher: {config.name_or_path} is the model being trained, so nothing new is carried over; "
            "name the model that knows the concept"
        )
    if config.offload and torch.device(device).type == "cpu":
        warn("teacher.offload: this run is on the CPU, where the teacher already is; nothing to offload")
    reader = "teacher's prompt"
    embeddings = encode_texts(models, texts, config.clip_skip, device, "teacher.clip_skip", reader)
    return Teacher(
        models.unet.to("cpu" if config.offload else device),
        embeddings,
        prediction_type=models.family.prediction_type,
        student_prediction_type=student.family.prediction_type,
        alphas_cumprod=training_alphas_cumprod(models.scheduler_config),
        sdxl=models.family.is_sdxl,
        autocast=autocast,
        offload=config.offload,
    )


def check_compatible(student: LoadedModels, teacher: LoadedModels, name: str) -> None:
    """Same latent space (channels, VAE scale) and the same training noise schedule, or one line why not."""
    latent_space = (
        "not share a latent space; use a teacher with the student's latents (SD1 and SD2 share one)"
    )
    schedule = "not share a noise schedule; a transplant needs the student's (SD1 and SD2 share one)"
    checks = [
        ("latent channels", student.unet.config.in_channels, teacher.unet.config.in_channels, latent_space),
        ("VAE downsampling factor", student.vae_scale_factor, teacher.vae_scale_factor, latent_space),
        (
            "VAE scaling_factor",
            round(student.latent_scaling, 6),
            round(teacher.latent_scaling, 6),
            latent_space,
        ),
        (
            "training timesteps",
            student.scheduler_config.get("num_train_timesteps", 1000),
            teacher.scheduler_config.get("num_train_timesteps", 1000),
            schedule,
        ),
    ]
    for what, ours, theirs, why in checks:
        if ours != theirs:
            raise LecoError(
                f"teacher.name_or_path: {name} has {what} {theirs}, the student {ours}: they do {why}"
            )
    refuse_epsilon_at_zero_snr(teacher.scheduler_config, f"teacher.name_or_path: {name}")
    ours, theirs = (training_alphas_cumprod(m.scheduler_config) for m in (student, teacher))
    if not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6):
        raise LecoError(
            f"teacher.name_or_path: {name} was trained with another noise schedule (betas) than the student; "
            "a transplant needs the same schedule"
        )


def teachers_of_run(
    config: LecoConfig,
    edited: EditedModel,
    models: LoadedModels,
    prompts: list[PreparedPrompt],
    dtype: torch.dtype,
    device: torch.device,
) -> Teachers:
    """The frozen student (the trained part off), and the `teacher:` model of the concept roles if any."""
    concept = None
    if config.teacher is not None:
        # The rollout texts too where the teacher samples some (teacher.rollout_share).
        rollouts = ("target",) if config.teacher.rollout_share > 0 else ()
        texts = prompt_texts(prompts, (*CONCEPT_ROLES, *rollouts))
        concept = load_teacher(config.teacher, models, texts, dtype, device, edited.autocast)
    frozen = Teacher.of_student(models, edited.embeddings, edited.trainable, edited.autocast)
    return Teachers(frozen, concept)


def _same_file(one: str, other: str) -> bool:
    if Path(one).exists() and Path(other).exists():
        return Path(one).resolve() == Path(other).resolve()
    return one == other
