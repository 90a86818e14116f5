"""Training configuration: the reference LECO `config.yaml` + `prompts.yaml`, validated strictly.

Every key of the reference tool's files keeps its meaning; keys we add have defaults, so old files
load unchanged. Unknown keys and wrong values are errors that name the file and the key: a typo
such as `guidance: 4` must never be dropped silently.
"""

from __future__ import annotations

import ast
import codecs
import contextlib
import difflib
import json
import math
import os
import re
import shlex
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from leco.errors import LecoError, check_list, first_line, warn

# Samples taken from one partial rollout (see leco.rollout). benchmarks/time_to_erase.py: one entry
# erases in as many steps at 16 as at 1, each step a third of the cost (erase_seven.yaml uses 16);
# but entries are drawn per rollout, so a two-entry slider at 16 got a third as many rollouts per
# entry and its -1 end fell from 100% to 25% (benchmarks/slider_leak.py). 4 is the safe default.
DEFAULT_SAMPLES_PER_ROLLOUT = 4
# Larger sides are typos (the largest SD models draw 4096 px at most); caught before any allocation.
MAX_SIDE = 16384
MAX_STRENGTH = 100.0  # of a LoRA, as trained (multiplier) or drawn; far past it images are noise
MAX_GUIDANCE = 100.0  # ComfyUI's limit (A1111's slider stops at 30); far past it images overflow to NaN
MAX_NAME_BYTES = 200  # save.name: room for leco's suffixes and temp-file wrappers within 255 bytes

# The spellings torch, diffusers and ai-toolkit's get_torch_dtype use.
_PRECISION_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "single": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
}
OPTIMIZERS = (
    "adamw",
    "adam",
    "lion",
    "adamw8bit",
    "adam8bit",
    "lion8bit",
    "prodigy",
    "dadaptadam",
    "dadaptlion",
    "sgd",
)
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "step",
)
# The arguments each schedule reads (train.lr_scheduler_args); the others read none.
LR_SCHEDULER_ARGS = {
    "cosine": ("num_cycles",),  # half-waves over the run: 0.5 (default) falls once to 0
    "cosine_with_restarts": ("num_cycles",),
    "polynomial": ("power", "lr_end"),
    "step": ("step_size", "gamma"),
}


class ConfigError(LecoError):
    """A config or prompts file that cannot be used as written."""


def _canonical_precision(value: Any) -> Any:
    if isinstance(value, str):
        return _PRECISION_ALIASES.get(value.lower(), value.lower())
    return value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


Precision = Annotated[Literal["fp32", "fp16", "bf16"], BeforeValidator(_canonical_precision)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, os.PathLike):  # a Python caller's Path where a path is asked for
            value = os.fspath(value)
        return no_bool_for_numbers(cls, value, info)


def no_bool_for_numbers(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """A field validator: pydantic reads `iterations: true` as 1 (and `[true]` as [1.0]); in a config
    that is a slip, never a number."""
    field = model.model_fields.get(info.field_name or "")
    values = value if isinstance(value, list) else [value]
    if field is not None and any(isinstance(v, bool) for v in values) and not _accepts_bool(field.annotation):
        raise ValueError(
            "true/false, which this key does not take; give its value (in YAML, quote the words it "
            "reads as true/false: yes, no, on, off)"
        )
    return value


def _accepts_bool(annotation: Any) -> bool:
    return annotation is bool or annotation is Any or any(_accepts_bool(a) for a in get_args(annotation))


class PretrainedModelConfig(_Section):
    name_or_path: str
    # None = detect from the weights; an explicit value that contradicts them is an error.
    v2: bool | None = None
    v_pred: bool | None = None
    sdxl: bool | None = None
    clip_skip: int | None = Field(None, ge=1)
    # `.ckpt` files are pickles that can run code when loaded: the user must opt in.
    allow_pickle: bool = False
    # A diffusers folder whose configs describe a single-file checkpoint of a non-standard shape.
    config: str | None = None
    revision: str | None = None


class NetworkConfig(_Section):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)  # init_text: 7, as prompts take
    # lierla / c3lier: a LoRA (kohya's names); all-linear / all: a LoRA on every Linear and 1x1 conv of
    # the UNet, or on every layer (ai-toolkit's lora without and with conv); embedding: the vectors
    # of a new token (a negative embedding).
    type: Literal["lierla", "c3lier", "all-linear", "all", "embedding"] = "lierla"
    rank: int = Field(4, ge=1)
    # kohya semantics: scale = alpha / rank; alpha 0 means alpha = rank (scale 1).
    alpha: float = Field(1.0, ge=0, allow_inf_nan=False)
    conv_rank: int | None = Field(None, ge=1)
    conv_alpha: float | None = Field(None, ge=0, allow_inf_nan=False)
    # The reference tool's key for the layer preset (its filters selected nothing for xattn);
    # text-encoder: the LoRA is on the text encoder(s) instead of the UNet (leco.network.text_encoder_lora).
    training_method: Literal[
        "full", "xattn", "xattn-strict", "xattn-values", "noxattn", "selfattn", "innoxattn", "text-encoder"
    ] = "full"
    # type: embedding only: the new word users write in the negative prompt, its number of vectors,
    # and the text whose token vectors it starts from (default: the vocabulary's mean vector).
    token: str | None = None
    vectors: int = Field(1, ge=1)
    init_text: str | None = None

    @model_validator(mode="after")
    def _embedding_needs_a_token(self) -> NetworkConfig:
        if self.type == "embedding" and not (self.token or "").strip():
            raise ValueError("network.token: type embedding needs the new word, e.g. token: <no-seven>")
        if self.init_text is not None and not self.init_text.strip():
            raise ValueError(
                "network.init_text: empty; give the text whose vectors the token starts from (e.g. seven), "
                "or leave it out to start from the vocabulary's mean vector"
            )
        if self.token is not None and any(c.isspace() for c in self.token):
            raise ValueError(
                f"network.token: {self.token!r} must be one word without spaces, e.g. <no-seven>"
            )
        if self.token is not None and self.token != self.token.lower():  # CLIP lowercases prompts
            raise ValueError(
                f"network.token: {self.token!r} has capital letters, and prompts are read in lower case, "
                f"so diffusers would not find it in a prompt; use {self.token.lower()!r}"
            )
        return self


class TeacherConfig(PretrainedModelConfig):
    """Another model whose knowledge of the concept is transplanted (same latent space and schedule)."""

    # Keep its UNet on the CPU between its calls: the student's training pass then runs without the
    # teacher's weights beside it (its own calls still hold both UNets); slower a step.
    offload: bool = False
    # The share of rollouts the teacher samples (its guided prediction, on its own way to the
    # image); the others as train.rollout_model says. 0: the student samples them all.
    rollout_share: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)


class ClosedFormConfig(_Section):
    """`train.method: closed_form`: one least-squares solve on the cross-attention key/value layers."""

    # Weight of the kept prompts' text states against the erased ones (UCE's preserve_scale).
    preserve_scale: float = Field(0.1, ge=0, allow_inf_nan=False)
    # Pull towards the original weights (UCE's lambda); keeps the solve well posed.
    regularization: float = Field(0.1, gt=0, allow_inf_nan=False)


class TrainConfig(_Section):
    # leco: the LECO/ESD loss trained by gradient steps; closed_form: a closed-form cross-attention edit.
    method: Literal["leco", "closed_form"] = "leco"
    precision: Precision = "bf16"
    noise_scheduler: Annotated[Literal["ddim", "ddpm", "lms", "euler_a"], BeforeValidator(_lower)] = "ddim"
    iterations: int = Field(500, ge=1)
    lr: float = Field(1e-4, gt=0, allow_inf_nan=False)
    optimizer: Annotated[Literal[OPTIMIZERS], BeforeValidator(_lower)] = "adamw"  # type: ignore[valid-type]
    # Reference form "weight_decay=0.01 betas=(0.9,0.99)" or a mapping.
    optimizer_args: dict[str, Any] = Field(default_factory=dict)
    lr_scheduler: Annotated[Literal[LR_SCHEDULERS], BeforeValidator(_lower)] = "constant"  # type: ignore[valid-type]
    # e.g. {num_cycles: 3} for cosine_with_restarts, {step_size: 100, gamma: 0.5} for step.
    lr_scheduler_args: dict[str, Any] = Field(default_factory=dict)
    lr_warmup_steps: int = Field(0, ge=0)
    max_denoising_steps: int = Field(50, ge=2, le=1000)  # at most one per training timestep
    samples_per_rollout: int = Field(DEFAULT_SAMPLES_PER_ROLLOUT, ge=1)
    # Rollout samples per optimizer step, batched into one teacher and one student UNet call.
    samples_per_step: int = Field(1, ge=1)
    # Trajectories sampled side by side in one rollout (one batched UNet call per denoising step),
    # each giving samples_per_rollout latents of the same entry and target.
    parallel_rollouts: int = Field(1, ge=1)
    # Up to this many steps of one rollout take their gradients from one batched student forward and
    # backward (each its own, at the weights before the first; leco.step_gradients). Faster where a
    # UNet call's fixed cost dominates (small models, the CPU); the batch's activations cost memory.
    steps_per_forward: int = Field(1, ge=1)
    # Which entry each rollout trains: "shuffled" deals every entry once, in a random order, before
    # any repeats (each of several concepts gets its share of rollouts); "random": drawn independently.
    entry_order: Literal["shuffled", "random"] = "shuffled"
    rollout_guidance_scale: float = Field(3.0, ge=0, le=100, allow_inf_nan=False)
    # Who samples the rollouts: "edited", the model with the trained part applied at the entry's
    # strength (LECO, ESD, kohya: the latents follow what training has done so far), or "frozen",
    # the model as it is (ai-toolkit's slider process). A transplant's teacher may sample a share
    # of them (teacher.rollout_share).
    rollout_model: Literal["edited", "frozen"] = "edited"
    # Spread each sample uniformly inside its sampling step's timestep interval (False: on the grid).
    timestep_offset: bool = True
    seed: int | None = Field(None, ge=-1, lt=2**63)  # unset or -1 (as A1111 and kohya_ss): random, saved
    device: str = "auto"
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = Field(None, gt=0, allow_inf_nan=False)
    # Min-SNR-gamma loss weighting (kohya's and ai-toolkit's min_snr_gamma): low-noise timesteps,
    # whose errors are tiny but many, stop dominating. null: every timestep weighs the same.
    min_snr_gamma: float | None = Field(None, gt=0, allow_inf_nan=False)
    # Defaults for prompts that name none (the reference example files carry these keys).
    resolution: int | None = Field(None, ge=8, le=MAX_SIDE)
    batch_size: int | None = Field(None, ge=1)

    @field_validator("lr_scheduler_args", mode="before")
    @classmethod
    def _read_schedule_numbers(cls, value: Any) -> Any:
        return numbers_as_written(value)

    @field_validator("lr_warmup_steps", mode="before")
    @classmethod
    def _steps_not_a_share(cls, value: Any) -> Any:
        if isinstance(value, float) and 0 < value < 1:  # kohya's form: a share of the run's steps
            raise ValueError(
                f"{value:g} is a share of the run, as kohya reads it; leco counts steps (a kohya file's "
                "share is converted when leco reads the file): give a whole number of steps"
            )
        return value

    @field_validator("optimizer_args", mode="before")
    @classmethod
    def _parse_optimizer_args(cls, value: Any) -> Any:
        value = numbers_as_written(parse_optimizer_args(value) if isinstance(value, str) else value)
        if isinstance(value, dict) and {"lr", "params"} & set(value):
            key = "lr" if "lr" in value else "params"
            fix = "set train.lr instead" if key == "lr" else "remove it (leco passes the trained parameters)"
            raise ValueError(f"{key} is not an optimizer argument here; {fix}")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, mps, cuda or cuda:N")
        return value


class SaveConfig(_Section):
    name: str = "untitled"
    path: str = "./output"
    per_steps: int = Field(200, ge=1)
    precision: Precision = "fp32"
    # Keep only the newest N `{name}_{N}steps` files (ai-toolkit's max_step_saves_to_keep); null: all.
    max_step_files: int | None = Field(None, ge=0)
    # SD2 only: proj_in/proj_out as 1x1-conv tensors, the form kohya's scripts load (diffusers needs
    # the default 2-D form; A1111 and ComfyUI read both).
    sd2_proj_4d: bool = False

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or value.startswith(".") or any(c in value for c in '/\\:*?"<>|'):
            raise ValueError('must be a plain file name, not starting with ".", without / \\ : * ? " < > |')
        if any(unicodedata.category(c) == "Cc" for c in value):  # a NUL cannot be in a path at all
            raise ValueError("must be a plain file name, without control characters (tabs, line breaks, NUL)")
        if value != value.strip():  # " " or "fox " names files no one finds (Windows drops the end)
            raise ValueError(f"{value!r} starts or ends with spaces; write the name without them")
        if len(value.encode()) > MAX_NAME_BYTES:  # checked now, not when the first save fails
            raise ValueError(
                f"is {len(value.encode())} bytes long; use at most {MAX_NAME_BYTES} (file names add a suffix "
                "such as _1000steps.safetensors, and file systems stop at 255)"
            )
        return value


class LoggingConfig(_Section):
    use_wandb: bool = False
    wandb_project: str = "leco"
    use_tensorboard: bool = False
    tensorboard_dir: str | None = None
    verbose: bool = False


class OtherConfig(_Section):
    use_xformers: bool = False


class PreviewConfig(_Section):
    """Grids rendered while training (strengths x prompts x seeds), so users watch the concept fade."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    prompts: list[str] = Field(default_factory=list)  # none: no previews
    # At least one of each: an empty list would leave the grid with no row or column to draw.
    strengths: list[Annotated[float, Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False)]] = Field(
        default_factory=lambda: [-1.0, 0.0, 1.0], min_length=1
    )
    seeds: list[Annotated[int, Field(ge=0, lt=2**64)]] = Field(default_factory=lambda: [0], min_length=1)
    # Unset: what the model recommends (its card; 25 steps at guidance 3 on ink-digits, else 30 at
    # 7), as leco generate and eval sample; guidance 1 for a CFG-distilled LoRA.
    steps: int | None = Field(None, ge=1, le=1000)  # at most one per training timestep
    guidance: float | None = Field(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)
    every: int | None = Field(None, ge=1)  # default: save.per_steps

    def sampling(self, recommended: tuple[int, float], distilled: bool) -> tuple[int, float]:
        """(steps, guidance) of the grids: as set, else the model's `recommended` ones."""
        guidance = self.guidance if self.guidance is not None else 1.0 if distilled else recommended[1]
        return self.steps or recommended[0], guidance

    @field_validator("prompts", "strengths", "seeds")
    @classmethod
    def _each_once(cls, values: list[Any]) -> list[Any]:
        # The grid has one row or column per value: a repeat would be drawn once, silently.
        repeated = first_repeated(values)
        if repeated is not None:
            raise ValueError(f"{repeated!r} is listed twice; list each once")
        return values


class AnchorConfig(_Section):
    """Preservation: prompts whose predictions must stay those of the original model."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    # A list, or `auto`: prompts the model knows without the edited concept's words (leco.preservation).
    prompts: list[str] | Literal["auto"] = Field(default_factory=list)
    weight: float = Field(1.0, ge=0, allow_inf_nan=False)
    # Anchors trained next to each sample (batched with the LECO prompts: no extra UNet call), each
    # adding `weight` times its own error; 0 with text_weight keeps them through their text states alone.
    per_step: int = Field(1, ge=0)
    # Keep what the anchors' text makes of the cross-attention keys and values: each step adds this
    # weight times the LoRA's relative change of them, over every token of every anchor (no UNet call;
    # with training_method xattn-strict the anchors' predictions then stay exactly the model's). With
    # training_method text-encoder: the relative change of the anchors' text states themselves.
    text_weight: float = Field(0.0, ge=0, allow_inf_nan=False)
    # auto only: more words whose prompts are left out (synonyms of the concept, e.g. "7" for seven),
    # and how many prompts to draw (all by default).
    exclude: list[str] = Field(default_factory=list)
    count: int | None = Field(None, ge=1)

    @field_validator("exclude")
    @classmethod
    def _no_empty_exclude(cls, value: list[str]) -> list[str]:
        if any(not text.strip() for text in value):  # "" is in every prompt: nothing would be left
            raise ValueError('an empty entry would leave out every prompt; remove it (e.g. exclude: ["7"])')
        return value

    @field_validator("prompts", mode="before")
    @classmethod
    def _auto_or_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.strip().lower() == "auto":
                return "auto"
            raise ValueError(
                f'{value!r}: give a list of prompts (prompts: ["{value}"]) or auto (every prompt the '
                "model knows without the edited concept)"
            )
        return value

    # true: the anchors are an entry of their own (action: preserve, own rollouts, drawn like any
    # entry) instead of riding along at the latents of the edited prompts. Always so for a
    # negative embedding, whose prediction must stay the empty prompt's wherever anchors are drawn.
    rollouts: bool = False


# Layer presets that train no cross-attention key or value (leco.network.layers.PRESETS).
PRESETS_WITHOUT_KEYS_VALUES = ("noxattn", "innoxattn", "selfattn")
# ... and those that train no UNet convolution: with them c3lier's convolutions are never chosen.
PRESETS_WITHOUT_CONVS = ("xattn", "xattn-strict", "xattn-values", "selfattn", "text-encoder")

ACTIONS = ("erase", "enhance", "distill", "preserve", "imitate")
# Keys of a prompt entry its action never reads (leco.objectives: the roles each target reads;
# `unconditional` is read by every action, as the rollout's negative prompt).
UNREAD_BY_ACTION = {
    "distill": {"neutral", "rescale_target"},
    "imitate": {"guidance_scale", "neutral", "rescale_target"},
    "preserve": {"guidance_scale", "positive", "neutral", "rescale_target"},
}


class PromptSettings(_Section):
    """One entry of prompts.yaml (the reference tool's keys and defaults, plus ours).

    `target` may be one prompt or a list (or `target_file`, one prompt a line): an entry names a
    distribution of prompts, drawn uniformly when the entry is trained; entries are drawn uniformly.
    With a list, `positive` unset means "each target itself", and `positive`, `unconditional` and
    `neutral` may be lists of the same length, paired with the targets one by one.
    """

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    # Where the entry was written when that is not "prompts entry N" of the config: a prompt file's
    # entry, or one that a kohya target or sliders attributes expanded into several (`named`).
    _origin: str | None = PrivateAttr(default=None)
    # Keys read into the entry's fields on loading, named where an unknown key lists what is allowed.
    READ_ON_LOADING: ClassVar[tuple[str, ...]] = ("target_file", "attributes")

    target: str | list[str]  # `target_file: F` (one prompt a line) is read into this list on loading
    positive: str | list[str] | None = None
    unconditional: str | list[str] = ""
    neutral: str | list[str] | None = None
    action: Literal[ACTIONS] = "erase"  # type: ignore[valid-type]
    # Bounded: far beyond any useful scale the loss overflows at the first step.
    guidance_scale: float = Field(1.0, ge=-100, le=100, allow_inf_nan=False)
    # One side (square) or [height, width] in pixels.
    resolution: int | tuple[int, int] | None = None
    dynamic_resolution: bool = False
    batch_size: int | None = Field(None, ge=1)
    dynamic_crops: bool = False
    # The LoRA strength this entry is trained at (rollout and student). A two-sided slider pairs an
    # entry at 1 with one at -1 whose poles are swapped, so both ends of the slider are trained.
    multiplier: float = Field(1.0, ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False)
    # Loss factor of this entry (kohya's `weight`).
    weight: float = Field(1.0, ge=0, le=1e4, allow_inf_nan=False)
    # Erase/enhance: move the target to the neutral prediction's mean and standard deviation, as
    # ai-toolkit's Concept Slider does, so the LoRA learns a direction and not a change of scale.
    rescale_target: bool = False

    def named(self, number: int) -> str:
        """The entry as messages name it: where it was written (`number`: its place in the run)."""
        return self._origin or f"prompts entry {number}"

    def written_at(self, origin: str) -> PromptSettings:
        self._origin = origin
        return self

    def __eq__(self, other: object) -> bool:  # the same entry wherever it was written
        if not isinstance(other, PromptSettings):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  # mutable, as every pydantic model

    @field_validator("multiplier")
    @classmethod
    def _nonzero(cls, value: float) -> float:
        if value == 0:
            raise ValueError("must not be 0 (at strength 0 the LoRA does nothing to train); use 1 or -1")
        return value

    @field_validator("resolution")
    @classmethod
    def _positive_size(cls, value: Any) -> Any:
        sides = value if isinstance(value, tuple) else (value,)
        if value is not None and any(side < 8 for side in sides):
            raise ValueError("must be at least 8 pixels (one side, or [height, width])")
        if value is not None and any(side > MAX_SIDE for side in sides):
            raise ValueError(f"must be at most {MAX_SIDE} pixels a side")
        return value

    @field_validator("target")
    @classmethod
    def _some_target(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("is an empty list; name at least one prompt")
        return value

    @model_validator(mode="before")
    @classmethod
    def _bucketing_is_dynamic_resolution(cls, data: Any) -> Any:
        # The reference tool's first releases (and its example prompts.yaml of then) named
        # dynamic_resolution `bucketing`; its files still load.
        if isinstance(data, dict) and "bucketing" in data:
            data = dict(data)
            bucketing = data.pop("bucketing")
            if not isinstance(bucketing, bool):
                raise ValueError(
                    f"bucketing: {bucketing!r}; give true or false (the reference tool's old name for "
                    "dynamic_resolution)"
                )
            if not _same_bool(data.setdefault("dynamic_resolution", bucketing), bucketing):
                raise ValueError(
                    "bucketing: the reference tool's old name for dynamic_resolution, which the entry "
                    "also sets to another value; keep one of them"
                )
        return data

    @model_validator(mode="after")
    def _fill_defaults(self) -> PromptSettings:
        # Written past pydantic's __setattr__: a default filled in is not a key the file set, and
        # model_fields_set is how unused_settings() tells the two apart.
        if self.positive is None and isinstance(self.target, str):
            self.__dict__["positive"] = self.target
        if self.neutral is None:
            self.__dict__["neutral"] = self.unconditional
        for role in ("positive", "unconditional", "neutral"):
            value = getattr(self, role)
            if isinstance(value, list) and len(value) != len(self.targets):
                raise ValueError(
                    f"{role}: a list of {len(value)} prompts, but target has {len(self.targets)}; a list "
                    "pairs one prompt with each target"
                )
        idle = [  # prompts whose target is the prediction they already make
            i
            for i, target in enumerate(self.targets)
            if as_read(self.role_text("positive", i)) == as_read(self.role_text("unconditional", i))
            and as_read(self.role_text("neutral", i)) == as_read(target)
        ]
        if self.action in ("erase", "enhance") and idle:
            which = "" if isinstance(self.target, str) else f" (prompt {idle[0] + 1} of the list)"
            raise ValueError(
                f"target: {self.targets[idle[0]]!r}{which}: positive reads as unconditional and neutral as "
                f"target (the model reads prompts in lower case), which leaves {self.action} nothing to "
                "learn; name the concept in positive (or target)"
            )
        if self.action == "distill" and self.guidance_scale <= 1:
            given = f"got {self.guidance_scale:g}"
            if "guidance_scale" not in self.model_fields_set:
                given = "not set, so 1"
            raise ValueError(
                f"guidance_scale: distill needs the CFG scale to distill, above 1 ({given}); e.g. "
                "guidance_scale: 3"
            )
        if self.action == "distill" and self.multiplier != 1:
            # generate, eval and merge read a distilled LoRA as made for strength 1 (and guidance 1)
            raise ValueError(
                f"multiplier: {self.multiplier:g}, but a distilled LoRA is used at strength 1, where "
                "it is trained; leave multiplier out of distill entries"
            )
        return self

    def changed_keys(self, keys: set[str]) -> list[str]:
        """Which of `keys` the file set to something other than the default (a shared prompts file
        that spells out `guidance_scale: 1.0` changes nothing where guidance is not read)."""
        fields = type(self).model_fields
        return sorted(k for k in keys & self.model_fields_set if getattr(self, k) != fields[k].default)

    @property
    def targets(self) -> list[str]:
        """Every prompt this entry trains on (the entry's own list: read it, do not change it).

        Not a copy: role_text() indexes it once per prompt, and copying a 100,000-line target_file
        each time made loading quadratic."""
        return [self.target] if isinstance(self.target, str) else self.target

    def role_text(self, role: str, index: int) -> str:
        """The prompt of `role` (positive, unconditional, neutral) for the entry's target `index`."""
        value = getattr(self, role)
        if value is None:  # positive defaults to the target itself
            return self.targets[index]
        return value[index] if isinstance(value, list) else value

    @property
    def size(self) -> tuple[int, int] | None:
        """(height, width) in pixels, or None for the model's default."""
        if self.resolution is None:
            return None
        return self.resolution if isinstance(self.resolution, tuple) else (self.resolution, self.resolution)


# How an entry read from a kohya prompt file is named: "p.toml: prompts 2", "p.toml: slider.targets 1"
_KOHYA_ENTRY = re.compile(r": (slider\.)?(prompts|targets) \d")

_SECTIONS = (
    "pretrained_model",
    "network",
    "train",
    "save",
    "logging",
    "other",
    "anchors",
    "preview",
    "closed_form",
)


class LecoConfig(_Section):
    prompts_file: str | None = None
    prompts: list[PromptSettings] = Field(default_factory=list)
    pretrained_model: PretrainedModelConfig
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    save: SaveConfig = Field(default_factory=SaveConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    other: OtherConfig = Field(default_factory=OtherConfig)
    anchors: AnchorConfig = Field(default_factory=AnchorConfig)
    preview: PreviewConfig = Field(default_factory=PreviewConfig)
    teacher: TeacherConfig | None = None
    closed_form: ClosedFormConfig = Field(default_factory=ClosedFormConfig)

    @model_validator(mode="before")
    @classmethod
    def _sections_may_be_empty(cls, data: Any) -> Any:
        # `train:` with nothing under it is YAML null; the reference tool treats it as defaults.
        if isinstance(data, dict):
            return {k: ({} if v is None and k in _SECTIONS else v) for k, v in data.items()}
        return data

    def to_json(self) -> str:
        return self.model_dump_json()

    @property
    def distills_only(self) -> bool:
        """Every entry distills CFG (or keeps a prompt): the LoRA is used at guidance 1."""
        return bool(self.prompts) and {entry.action for entry in self.prompts} <= {"distill", "preserve"}

    def unused_settings(self) -> list[str]:
        """Keys set in the file that the rest of the config leaves without effect, one line each."""
        notes = []

        def unused(section: BaseModel, name: str, keys: set[str], reason: str) -> None:
            chosen = sorted(keys & section.model_fields_set)
            if chosen:
                listed = ", ".join(f"{name}.{key}" for key in chosen)
                notes.append(f"{listed}: {reason}; ignored")

        network, anchors, preview, logging = self.network, self.anchors, self.preview, self.logging
        if network.type == "embedding":
            lora_keys = {"rank", "alpha", "conv_rank", "conv_alpha", "training_method"}
            unused(
                network, "network", lora_keys, "a LoRA's settings, and network.type embedding trains a token"
            )
        else:
            unused(network, "network", {"token", "vectors", "init_text"}, "only for network.type: embedding")
            if network.type in ("lierla", "all-linear"):
                unused(
                    network,
                    "network",
                    {"conv_rank", "conv_alpha"},
                    f"only for c3lier and all ({network.type} has no 3x3 convs)",
                )
            elif network.training_method in PRESETS_WITHOUT_CONVS:
                notes.append(
                    f"network.type: {network.type} adds the convolutions, which training_method "
                    f"{network.training_method} never chooses: the file is what lierla makes"
                    + (
                        ", and conv_rank / conv_alpha are ignored"
                        if {"conv_rank", "conv_alpha"} & network.model_fields_set
                        else ""
                    )
                )
        for number, entry in enumerate(self.prompts, start=1):
            if network.type == "embedding" and entry.changed_keys({"multiplier"}):
                notes.append(
                    f"{entry.named(number)}: multiplier: an embedding has no strength (its token is in the "
                    "negative prompt or not); ignored"
                )
            if entry.weight == 0 and self.train.method != "closed_form":
                there = "training only the anchors there" if self.anchors.prompts else "training nothing"
                notes.append(
                    f"{entry.named(number)}: weight 0 adds nothing to the loss, yet the entry still takes "
                    f"its share of the steps ({there}); remove it to give them to the others"
                )
            unread = entry.changed_keys(UNREAD_BY_ACTION.get(entry.action, set()))
            if unread:
                notes.append(
                    f"{entry.named(number)}: {', '.join(unread)}: action {entry.action} does not use "
                    f"{'it' if len(unread) == 1 else 'them'}; ignored"
                )
        for key in ("resolution", "batch_size"):  # the defaults for entries that name none
            if self.prompts and all(getattr(entry, key) is not None for entry in self.prompts):
                why = "every prompts entry sets its own"
                if any(_KOHYA_ENTRY.search(entry._origin or "") for entry in self.prompts):
                    why += " (a kohya prompt file's do: 512 and 1 unless set)"
                unused(self.train, "train", {key}, why)
        guidance_set = preview.prompts and preview.guidance is not None
        if guidance_set and preview.guidance <= 1 and network.type == "embedding":
            notes.append(
                f"preview.guidance: {preview.guidance:g} never reads the negative prompt, where the "
                "embedding is previewed, so its grids cannot change; set it above 1 (e.g. 3)"
            )
        if guidance_set and preview.guidance < 1:
            notes.append(
                f"preview.guidance: {preview.guidance:g} samples as guidance 1 (diffusers reads the prompt "
                "alone at 1 or below); set 1, or above 1 for CFG"
            )
        if guidance_set and self.distills_only and preview.guidance != 1:
            notes.append(
                f"preview.guidance: {preview.guidance:g}, but a CFG-distilled LoRA is made for guidance 1; "
                "set preview.guidance: 1 to preview it as it is used"
            )
        if "teacher" in self.model_fields_set and self.teacher is None:  # `teacher:` with nothing under it
            notes.append("teacher: empty, so the model teaches itself; give teacher.name_or_path for another")
        if self.train.method != "closed_form" and self.closed_form.model_fields_set:
            notes.append("closed_form: only for train.method: closed_form; ignored")
        if anchors.prompts != "auto":
            unused(anchors, "anchors", {"exclude", "count"}, "only for anchors.prompts: auto")
        if self.train.method == "closed_form":  # reads no step setting at all: named once, not twice
            self._closed_form_unused(unused, notes)
            return notes
        if not anchors.prompts:
            why = "anchors.prompts is empty, so there are no anchors (prompts: auto, or a list, adds them)"
            unused(anchors, "anchors", {"weight", "text_weight", "per_step", "rollouts"}, why)
        elif anchors.rollouts or network.type == "embedding":
            why = "anchors.rollouts: true" if anchors.rollouts else "a negative embedding"
            unused(anchors, "anchors", {"per_step"}, f"with {why} the anchors have rollouts of their own")
        elif anchors.per_step == 0:  # only text_weight keeps them: no anchor prompt's prediction is trained
            why = "anchors.per_step is 0, so no anchor prompt rides along (anchors.text_weight keeps them)"
            unused(anchors, "anchors", {"weight"}, why)
        if self.prompts and all(entry.action == "distill" for entry in self.prompts) and not anchors.rollouts:
            why = "every entry is distill, whose rollouts run at guidance 1 (as the LoRA is used)"
            unused(self.train, "train", {"rollout_guidance_scale"}, why)
        if not preview.prompts:
            keys = {"strengths", "seeds", "steps", "guidance", "every"}
            unused(preview, "preview", keys, "preview.prompts is empty, so no preview is drawn")
        if not logging.use_tensorboard:
            unused(logging, "logging", {"tensorboard_dir"}, "only with logging.use_tensorboard: true")
        if not logging.use_wandb:
            unused(logging, "logging", {"wandb_project"}, "only with logging.use_wandb: true")
        if self.train.lr_scheduler not in LR_SCHEDULER_ARGS and self.train.lr_scheduler_args:
            notes.append(
                f"train.lr_scheduler_args: the {self.train.lr_scheduler} schedule takes none; ignored"
            )
        if self.train.lr_scheduler in ("constant", "step") and self.train.lr_warmup_steps:
            notes.append(
                f"train.lr_warmup_steps: the {self.train.lr_scheduler} schedule has no warmup; ignored "
                "(constant_with_warmup, linear, cosine, cosine_with_restarts and polynomial warm up)"
            )
        elif self.train.method != "closed_form" and self.train.lr_warmup_steps >= self.train.iterations:
            notes.append(
                f"train.lr_warmup_steps: {self.train.lr_warmup_steps} is not below train.iterations "
                f"({self.train.iterations}), so the lr never reaches train.lr"
            )
        return notes

    def _closed_form_unused(self, unused: Callable[..., None], notes: list[str]) -> None:
        """What a closed-form edit (one solve of the key/value layers, no steps) never reads."""
        why = "not used by train.method: closed_form (one solve on the CPU, no steps)"
        unused(self.train, "train", set(self.train.model_fields_set) - {"method"}, why)
        unused(self.anchors, "anchors", {"per_step", "weight", "text_weight", "rollouts"}, why)
        unused(self.preview, "preview", set(PreviewConfig.model_fields), why)
        unused(
            self.logging, "logging", {"use_tensorboard", "use_wandb", "tensorboard_dir", "wandb_project"}, why
        )
        unused(self.save, "save", {"per_steps", "max_step_files"}, why)
        unused(self.network, "network", {"alpha"}, "a closed-form edit is solved at scale 1 (alpha = rank)")
        if (
            self.network.training_method != "xattn-strict"
            and "training_method" in self.network.model_fields_set
        ):
            notes.append(
                "network.training_method: a closed-form edit solves the cross-attention keys and values "
                "(xattn-strict); ignored"
            )
        # (kohya files spell out sizes: not named)
        entry_keys = {"guidance_scale", "weight", "multiplier", "rescale_target"}
        for number, entry in enumerate(self.prompts, start=1):
            chosen = entry.changed_keys(entry_keys)
            if chosen:
                notes.append(f"{entry.named(number)}: {', '.join(chosen)}: {why}; ignored")
            # The solve maps each target's text onto its neutral's (erase) or keeps it (preserve):
            # a direction between two other prompts is not something it can take.
            texts = {"unconditional", "positive"} | ({"neutral"} if entry.action == "preserve" else set())
            if entry.action == "erase" and not entry.changed_keys({"neutral"}):
                texts.discard("unconditional")  # it stands in for the neutral, which the solve reads
            unread = [key for key in entry.changed_keys(texts) if getattr(entry, key) != entry.target]
            if unread:
                notes.append(
                    f"{entry.named(number)}: {', '.join(unread)}: a closed-form {entry.action} maps the "
                    f"target's text {'onto neutral' if entry.action == 'erase' else 'onto itself'} and "
                    "reads no other prompt; ignored"
                    + (" (train.method: leco reads them)" if entry.action == "erase" else "")
                )

    def check_combination(self) -> None:
        """Settings that are valid alone but not together; one line naming the keys."""
        if not self.prompts:
            raise ConfigError(
                "prompts: no entries to train; give prompts, or a prompts_file read with "
                "leco.config.load_config / leco.config.ready_config"
            )
        if self.prompts and all(entry.weight == 0 for entry in self.prompts):
            written = dict.fromkeys(e._origin for e in self.prompts if e._origin)  # a foreign file's
            where = f" ({', '.join(written)})" if written else ""
            raise ConfigError(
                f"prompts: every entry has weight 0{where}, so the loss is 0 and nothing would be "
                "trained; give at least one entry a weight above 0 (1 is the default)"
            )
        if all(entry.action == "preserve" for entry in self.prompts):
            raise ConfigError(
                "prompts: every entry is action preserve, which keeps things as they are: nothing would "
                "change; add an entry that "
                + ("erases" if self.network.type == "embedding" else "erases, enhances, imitates or distills")
            )
        if self.network.type == "embedding" and self.teacher is not None:
            raise ConfigError(
                "teacher: transplants train a LoRA; use network.type lierla, c3lier, all-linear or all"
            )
        _check_schedule_args(self.train.lr_scheduler, self.train.lr_scheduler_args, self.train.lr)
        per_rollout = self.train.samples_per_rollout * self.train.parallel_rollouts
        if self.train.samples_per_step > per_rollout:  # a step takes its latents from one rollout
            raise ConfigError(
                f"train.samples_per_step: {self.train.samples_per_step}, but a rollout gives "
                f"{per_rollout} latents (samples_per_rollout x parallel_rollouts) and a step takes them "
                f"from one rollout; raise samples_per_rollout to {self.train.samples_per_step}, or set "
                f"samples_per_step {per_rollout}"
            )
        if self.train.method == "closed_form":
            solved = self.network.training_method not in (*PRESETS_WITHOUT_KEYS_VALUES, "text-encoder")
            if self.network.type != "lierla" or not solved:
                raise ConfigError(
                    "train.method: closed_form edits the cross-attention key/value layers; use network.type "
                    "lierla with training_method xattn-strict (or leave them unset)"
                )
            if self.teacher is not None:
                raise ConfigError("train.method: closed_form reads the model's own text; remove teacher:")
            for number, entry in enumerate(self.prompts, start=1):
                if entry.action not in ("erase", "preserve"):
                    raise ConfigError(
                        f"{entry.named(number)}: action {entry.action} has no closed form; use erase or "
                        "preserve (or train.method: leco)"
                    )
        if self.teacher is None:
            for number, entry in enumerate(self.prompts, start=1):
                if entry.action == "imitate":
                    empty = "teacher" in self.model_fields_set  # `teacher:` with nothing under it
                    raise ConfigError(
                        f"{entry.named(number)}: action imitate copies a teacher model's prediction; "
                        + (
                            "teacher: is empty; give teacher.name_or_path"
                            if empty
                            else "add a teacher: section"
                        )
                        + " (or use enhance)"
                    )
                if entry.action == "distill":
                    _refuse_unguided(entry, number)
        anchors = self.anchors
        rides_along = not anchors.rollouts and self.network.type != "embedding"
        if anchors.per_step == 0 and anchors.text_weight == 0 and rides_along:
            raise ConfigError(
                "anchors.per_step: 0 keeps no anchor at all; set anchors.text_weight above 0 or per_step >= 1"
            )
        if anchors.text_weight > 0 and self.network.training_method in PRESETS_WITHOUT_KEYS_VALUES:
            raise ConfigError(
                "anchors.text_weight: keeps the cross-attention keys and values, which training_method "
                f"{self.network.training_method} does not train; use xattn-strict, xattn or full, "
                "or remove it"
            )
        if anchors.text_weight > 0 and self.network.type == "embedding":
            raise ConfigError(
                "anchors.text_weight: a negative embedding leaves every other prompt's text states as they "
                "are; remove it"
            )
        network = self.network
        text_encoder_lora = network.training_method == "text-encoder" and network.type != "embedding"
        if self.save.sd2_proj_4d and (text_encoder_lora or network.type == "embedding"):
            trained = "a negative embedding" if network.type == "embedding" else "a text-encoder LoRA"
            raise ConfigError(
                f"save.sd2_proj_4d: {trained} has no UNet proj_in/proj_out to write as 4-D; remove it"
            )
        if text_encoder_lora and self.train.steps_per_forward > 1:
            raise ConfigError(
                "train.steps_per_forward: a text-encoder LoRA reads every step's prompts through the "
                "same trained encoders, so its gradients cannot be split by step; set 1"
            )
        if self.network.type == "embedding":
            if self.train.steps_per_forward > 1:
                raise ConfigError(
                    "train.steps_per_forward: a negative embedding trains one step per forward; set 1"
                )
            if self.train.rollout_guidance_scale <= 1:
                raise ConfigError(
                    "train.rollout_guidance_scale: a negative embedding acts through guidance; set the "
                    "scale it will be used at, above 1 (e.g. 3)"
                )
            for number, entry in enumerate(self.prompts, start=1):
                if entry.action in ("distill", "enhance"):
                    raise ConfigError(
                        f"{entry.named(number)}: action {entry.action} cannot be trained into a negative "
                        "embedding; use erase (and preserve for what must stay)"
                    )
            if self.preview.prompts and any(strength not in (0, 1) for strength in self.preview.strengths):
                if "strengths" in self.preview.model_fields_set:
                    raise ConfigError(
                        "preview.strengths: a negative embedding is previewed without (0) and with (1) its "
                        "token in the negative prompt; use [0, 1]"
                    )
                self.preview.strengths = [0.0, 1.0]  # the default's -1 would draw 1 again, labelled -1
            self._refuse_token_in_prompts(self.network.token or "")

    def _refuse_token_in_prompts(self, token: str) -> None:
        """Tokenizers match an added token inside words too ("igi" in "digit"): the run's own prompts
        would change with it, and so would every user prompt with that word. Nor may the run's
        prompts hold the token itself, which does not exist while they are read."""
        texts = [
            (entry.named(number), text)
            for number, entry in enumerate(self.prompts, start=1)
            for value in (entry.target, entry.positive, entry.unconditional, entry.neutral)
            for text in ([value] if isinstance(value, str) else value or [])
        ]
        texts += [("anchors.prompts", t) for t in self.anchors.prompts if self.anchors.prompts != "auto"]
        texts += [("preview.prompts", t) for t in self.preview.prompts]
        for where, text in texts:
            word = word_around(text.lower(), token)
            if word is not None:
                raise ConfigError(
                    f"network.token: {token!r} is inside the word {word!r} of {where}, where a "
                    f"tokenizer reads it too; choose a token no word contains, e.g. '<{token}>'"
                )
            # The run's prompts are read before the token exists (it is what is trained), so there
            # it would be the pieces of its spelling; a preview draws after training and knows it.
            if token in text.lower() and where != "preview.prompts":
                raise ConfigError(
                    f"{where}: {text!r} holds {token!r}, the token this run trains; write the run's "
                    "prompts without it (the token learns to stand for them in a negative prompt)"
                )


def word_around(text: str, token: str, longer_tokens: Sequence[str] = ()) -> str | None:
    """The word `token` sits inside in `text` ("igi" in "digit"), if any: a tokenizer matches an
    added token anywhere, so that word would be read as pieces and the token. Inside a longer
    added token it is no word (the tokenizer takes the longest: easynegativev2, not easynegative)."""
    for longer in longer_tokens:
        if token in longer and longer != token:
            text = text.replace(longer, " " * len(longer))
    for match in re.finditer(re.escape(token), text):
        start, end = match.span()
        joined_before = start > 0 and text[start - 1].isalnum() and token[0].isalnum()
        joined_after = end < len(text) and text[end].isalnum() and token[-1].isalnum()
        if joined_before or joined_after:
            return re.search(r"\w*$", text[:start]).group() + token + re.match(r"\w*", text[end:]).group()
    return None


def _check_schedule_args(name: str, args: dict[str, Any], lr: float) -> None:
    """A key the schedule does not read (a typo such as `gama`), or a value that breaks it, is one
    line; diffusers' own schedules would drop the first silently."""
    allowed = LR_SCHEDULER_ARGS.get(name)
    if allowed is None:
        return  # unused_settings names them
    for key, value in args.items():
        if key not in allowed:
            raise ConfigError(
                f"train.lr_scheduler_args: {key!r} is not read by the {name} schedule; it takes "
                f"{', '.join(allowed)}"
            )
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"train.lr_scheduler_args: {key}={value!r} is not a number")
    step_size = args.get("step_size", 1)
    if step_size < 1 or step_size != int(step_size):
        raise ConfigError("train.lr_scheduler_args: step_size must be a whole number of steps >= 1")
    if name == "step" and args.get("gamma", 0.5) <= 0:
        raise ConfigError("train.lr_scheduler_args: gamma must be above 0 (the lr is multiplied by it)")
    if args.get("num_cycles", 1) <= 0 or args.get("power", 1) <= 0 or args.get("lr_end", 0) < 0:
        raise ConfigError("train.lr_scheduler_args: num_cycles and power must be above 0, lr_end 0 or more")
    if name == "polynomial" and lr <= args.get("lr_end", 1e-7):  # diffusers' default end
        raise ConfigError(
            f"train.lr: {lr:g} is not above the polynomial schedule's lr_end ({args.get('lr_end', 1e-7):g}), "
            "where it decays to; raise train.lr or set a lower lr_scheduler_args.lr_end"
        )


def first_repeated(values: list[Any]) -> Any | None:
    """The first value listed a second time (prompts compared as CLIP reads them), if any."""
    seen = [as_read(v) if isinstance(v, str) else v for v in values]
    return next((values[n] for n, v in enumerate(seen) if v in seen[:n]), None)


def as_read(text: str) -> str:
    """A prompt as CLIP's tokenizer reads it: lower case, spaces collapsed."""
    return " ".join(text.lower().split())


def _refuse_unguided(entry: PromptSettings, number: int) -> None:
    """Distilling guidance between two equal prompts of the model itself leaves nothing to learn
    (with a teacher they are the teacher's prediction: that is learnt)."""
    for i, target in enumerate(entry.targets):
        unconditional = entry.role_text("unconditional", i)
        if as_read(entry.role_text("positive", i)) == as_read(unconditional):
            which = "" if isinstance(entry.target, str) else f" (prompt {i + 1} of the list)"
            raise ConfigError(
                f"{entry.named(number)}: target {target!r}{which}: its prompt and unconditional are the "
                f"same ({unconditional!r}), so guidance changes nothing and distill has nothing to learn; "
                "name the prompt in target, set another unconditional, or keep the prompt as it is with "
                "anchors.prompts"
            )


def typed_float(text: str) -> float:
    """A number as a user types it (a strength, a scale). ValueError otherwise, including Python's
    digit separator: float() reads "1_0" as 10, which no one means."""
    if "_" in text:
        raise ValueError(f"{text!r} is not a number")
    return float(text)


def numbers_as_written(args: Any) -> Any:
    """A dict of arguments with the numbers YAML reads as text (1e-8, which has no decimal point,
    and (0.9, 0.99)) read as the numbers and lists of numbers they are."""
    if not isinstance(args, dict):
        return args

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def read(key: str, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("(") and ")" not in value:  # {betas: (0.9, 0.99)}: cut at its comma
            raise ValueError(
                f"{key}: {value!r} is half a list (in {{...}} YAML splits (0.9, 0.99) at its comma); "
                f"write {key}: [0.9, 0.99]"
            )
        try:
            literal = ast.literal_eval(value.strip())
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return value
        if number(literal):
            return literal
        if isinstance(literal, (tuple, list)) and literal and all(number(item) for item in literal):
            return list(literal)
        return value

    return {key: read(key, value) for key, value in args.items()}


def parse_optimizer_args(text: str) -> dict[str, Any]:
    """Parse the reference tool's `key=value key2=value2` string; values are Python literals."""
    pairs = re.split(r"\s*(\w+)\s*=\s*", " " + text.strip())
    if pairs[0].strip():
        raise ValueError(
            f"cannot read {text!r}: write key=value pairs, e.g. 'weight_decay=0.01 betas=(0.9,0.99)'"
        )
    args: dict[str, Any] = {}
    for key, raw in zip(pairs[1::2], pairs[2::2], strict=True):
        try:
            args[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            args[key] = raw.strip()
    return args


# Top-level keys of the other YAML files leco reads, which users hand to `leco train` by mistake.
_KOHYA_PROMPTS_KEYS = {"targets", "slider", "neutrals", "neutral_prompt_file", "target_class"}
_EVAL_SPEC_KEYS = {"erase", "keep", "enhance", "detector", "images_per_prompt", "strengths", "clip_model"}


def _refuse_other_kinds_of_file(path: Path, document: dict) -> None:
    keys = {str(k) for k in document}
    kohya_keys = sorted(keys & _KOHYA_PROMPTS_KEYS)
    if kohya_keys and not keys & set(LecoConfig.model_fields):
        raise ConfigError(
            f"{path}: this is a kohya train_leco prompts file ({', '.join(kohya_keys)}), not a training "
            f"config; name it in a config YAML: prompts_file: {path.name}"
        )
    if keys & _EVAL_SPEC_KEYS and not keys & set(LecoConfig.model_fields):
        raise ConfigError(
            f"{path}: this is an eval spec ({', '.join(sorted(keys & _EVAL_SPEC_KEYS))}), not a training "
            f"config; judge a LoRA with it: leco eval --model MODEL --lora FILE --spec {path}"
        )


def apply_overrides(config: LecoConfig, changes: Sequence[str]) -> LecoConfig:
    """`leco train --set SECTION.KEY=VALUE`: each value read as YAML (`anchors.prompts=[""]`), the
    changes to one section checked together by its own model (`network.type=embedding` needs
    `network.token` too), then every setting together, as a file's are. `config` is changed in
    place, and returned."""
    check_list("changes", changes, "SECTION.KEY=VALUE changes")
    by_section: dict[str, dict[str, tuple[str, Any]]] = {}  # section -> key -> (change, value)
    for change in changes:
        name, field, value = _override(config, change)
        by_section.setdefault(name, {})[field] = (change, value)
    for name, fields in by_section.items():
        section = getattr(config, name)
        # Only the keys set so far: the others stay defaults, not keys the config "set".
        given = section.model_dump(exclude_unset=True)
        try:
            updated = type(section).model_validate({**given, **{k: v for k, (_, v) in fields.items()}})
        except ValidationError as error:  # leco's own words: the key, what is wrong, what is allowed
            reason = describe_validation_error(error, Path("--set"), type(section), prefix=f"{name}.")
            first = reason.splitlines()[0].removeprefix("--set: ")
            named = [change for key, (change, _) in fields.items() if first.startswith(f"{name}.{key}")]
            raise ConfigError(f"--set {_quoted(named or [c for c, _ in fields.values()])}: {first}") from None
        setattr(config, name, updated)
    if changes:  # settings fine alone but not together
        try:
            config.check_combination()
        except LecoError as error:
            raise ConfigError(f"--set {_quoted(changes)}: {error}") from None
    return config


def _override(config: LecoConfig, change: str) -> tuple[str, str, Any]:
    """One `--set` change as (section, key, value read as YAML), or one line saying what to write."""
    key, equals, text = change.partition("=")
    name, dot, field = key.strip().partition(".")
    where = f"--set {_quoted([change])}"
    sections = [n for n in LecoConfig.model_fields if isinstance(getattr(config, n, None), BaseModel)]
    if name == "prompts_file":
        file = shlex.quote(text.strip()) if text.strip() and not dot else "FILE"
        raise ConfigError(f"{where}: the prompts file is an option of its own; give --prompts_file {file}")
    if name == "prompts":
        raise ConfigError(
            f"{where}: prompts are a list; change them in the prompts file, or give --prompts_file"
        )
    if name in LecoConfig.model_fields and name not in sections:
        raise ConfigError(f"{where}: this config has no {name}: section to change; add it to the file")
    if not (equals and dot and field and "." not in field):
        raise ConfigError(f"{where}: give SECTION.KEY=VALUE, e.g. train.seed=1")
    if name not in sections:
        close = difflib.get_close_matches(name, sections, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"{where}: {name} is not a section of a leco config; {hint}sections: {', '.join(sections)}"
        )
    if not text.strip():
        raise ConfigError(f"{where}: no value; give one (null where the key may be unset)")
    if re.search(r"\s#", text) and text.strip()[:1] not in "'\"[{":
        raise ConfigError(f"{where}: ' #' starts a YAML comment, which would cut the value; quote it")
    if re.fullmatch(r"\s*[-+]?0\d+\s*", text):  # YAML 1.1 reads 0123 as octal (83): a number as written
        return name, field, int(text, 10)
    try:
        return name, field, yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{where}: the value is not valid YAML; quote it") from None


def with_nearest(key: str, options: Sequence[str], shown: str | None = None) -> str:
    """`shown` (default: the key) with the option nearest the key, if one is near: "x (did you mean 'y'?)"."""
    close = difflib.get_close_matches(key, options, n=1)
    shown = key if shown is None else shown
    return f"{shown} (did you mean {close[0]!r}?)" if close else shown


def _quoted(changes: Sequence[str]) -> str:
    return " ".join(shlex.quote(change) for change in changes)


def load_config(path: str | Path, prompts_file: str | Path | None = None) -> LecoConfig:
    """Read a config YAML (and its prompts file) into a validated `LecoConfig`.

    An ai-toolkit job config (top-level `job:` / `config:`) is read as the leco config it stands for.
    `prompts_file` (from the working directory, as `leco train --prompts_file` gives it) replaces the
    config's prompts, as kohya's train_leco takes its prompt file on the command line.
    """
    path = Path(path)
    refuse_special_file(path, "config YAML")
    from leco.formats import foreign_config  # leco.formats builds on this module

    foreign = foreign_config(path, None if prompts_file is None else str(prompts_file))
    if foreign is not None:
        return foreign
    document = read_yaml(path)
    if isinstance(document, list) and document and all(isinstance(item, dict) for item in document):
        raise ConfigError(
            f"{path}: a list of prompt entries is a prompts file, not a training config; name it in a "
            f"config YAML: prompts_file: {path.name}"
        )
    if not isinstance(document, dict):
        raise ConfigError(
            f"{path}: the file must be a YAML mapping of sections (pretrained_model:, train:, ...)"
        )
    _refuse_other_kinds_of_file(path, document)
    if prompts_file is not None:
        document = {key: value for key, value in document.items() if key != "prompts"}
        document["prompts_file"] = given_prompts_file(prompts_file)
    return config_from_document(document, path)


def given_prompts_file(name: str | Path) -> str:
    """`--prompts_file`, from the working directory as a command line gives it."""
    path = Path.cwd() / Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"--prompts_file: {name} is {'a folder' if path.is_dir() else 'not found'}; name the prompts "
            "YAML or TOML file (from the working directory)"
        )
    return str(path)


def config_from_document(document: dict[str, Any], path: Path) -> LecoConfig:
    """A config file's sections, read as `leco train` reads them (inline target files and sliders
    attributes expanded, the prompts file read); relative files are looked up beside `path`."""
    prompts_in_config = "prompts" in document
    written_as: list[int] = []  # each entry's number as written, before sliders attributes expanded it
    if isinstance(document.get("prompts"), list):
        from leco.formats.sliders import expand_attributes

        entries = read_target_files(document["prompts"], path, "prompts.")
        _refuse_kohya_targets(entries, path, "prompts.")
        expanded = expand_attributes(entries, path, "prompts.")
        written_as = [number for number, _ in expanded]
        if written_as != list(range(1, len(expanded) + 1)):  # attributes made several of one entry
            _check_entries_as_written(expanded, path)
        document = {**document, "prompts": [entry for _, entry in expanded]}
    try:
        config = LecoConfig.model_validate(document)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, path, LecoConfig)) from None
    for entry, number in zip(config.prompts, written_as, strict=False):
        entry.written_at(f"prompts entry {number}")
    if config.prompts_file is not None:
        if prompts_in_config:
            raise ConfigError(f"{path}: both prompts_file and prompts are set; keep one of them")
        config.prompts = load_prompts(_resolve_prompts_file(config.prompts_file, path))
    elif not config.prompts and prompts_in_config:
        raise ConfigError(f"{path}: prompts: an empty list; give at least one entry (e.g. - target: a cat)")
    elif not config.prompts:
        raise ConfigError(
            f"{path}: prompts_file: missing; name the prompts YAML (e.g. prompts_file: prompts.yaml)"
        )
    try:
        config.check_combination()
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return config


def _check_entries_as_written(expanded: list[tuple[int, Any]], path: Path) -> None:
    """An entry's problem named by the number it was written as, not its place after expansion."""
    for number, entry in expanded:
        if isinstance(entry, dict):
            try:
                PromptSettings.model_validate(entry)
            except ValidationError as error:
                raise ConfigError(
                    describe_validation_error(error, path, PromptSettings, prefix=f"prompts.{number}.")
                ) from None


def ready_config(
    config: LecoConfig | dict[str, Any] | str | Path, prompts_file: str | Path | None = None
) -> LecoConfig:
    """What the Python API accepts as a config: a file (as `leco train` reads it, `prompts_file` as
    its --prompts_file), a dict of its sections, or a LecoConfig; a `prompts_file` of the last two is
    read from the working directory."""
    if isinstance(config, (str, Path)):
        return load_config(config, prompts_file)
    if prompts_file is not None:
        raise ConfigError(
            "prompts_file: replaces a config file's prompts; in a dict or LecoConfig set its own prompts_file"
        )
    if isinstance(config, dict):  # as a file in the working directory would be read
        return config_from_document(config, Path("config"))  # messages name it so; files are cwd's
    if not isinstance(config, LecoConfig):
        raise ConfigError(
            f"config: a {type(config).__name__}; give a config file's path, a dict of its sections or a "
            "LecoConfig"
        )
    config = config.model_copy(deep=True)  # the caller's own object stays as written: it may train again
    if config.prompts_file is not None and not config.prompts:
        config.prompts = load_prompts(_resolve_prompts_file(config.prompts_file, Path("config")))
    config.check_combination()
    return config


# Top-level keys of a kohya train_leco prompt file (its [[prompts]] or slider form).
KOHYA_TOP_KEYS = {"prompts", "targets", "target_class", "slider"}


def load_prompts(path: str | Path) -> list[PromptSettings]:
    """Read a prompts YAML: a list of {target, positive, unconditional, neutral, action, ...}.

    A `.toml` file is a kohya sd-scripts train_leco prompt file (leco.formats.kohya_leco), and so is
    a YAML mapping with its tables (`prompts:` or slider `targets:`).
    """
    from leco.formats.ai_toolkit import is_ai_toolkit_config
    from leco.formats.kohya_leco import load_kohya_prompts
    from leco.formats.sliders import expand_attributes

    path = Path(path)
    if path.suffix.lower() == ".toml":
        return load_kohya_prompts(path)
    document = read_yaml(path)
    if isinstance(document, dict) and (set(LecoConfig.model_fields) - KOHYA_TOP_KEYS) & set(document):
        raise ConfigError(
            f"{path}: is a leco config, not a prompts file; run it as `leco train {path}`, or give "
            "prompts_file a list of prompt entries (- target: ...)"
        )
    if isinstance(document, dict) and KOHYA_TOP_KEYS & set(document):
        return load_kohya_prompts(path, document)  # kohya's tables written as YAML
    if is_ai_toolkit_config(document):
        raise ConfigError(
            f"{path}: is an ai-toolkit job config, not a prompts file; run it as `leco train {path}`"
        )
    if isinstance(document, list) and document and all(isinstance(item, str) for item in document):
        raise ConfigError(
            f"{path}: a list of texts, not of entries; write each as an entry (- target: {document[0]}) "
            "or the list as one entry's target (- target: [...])"
        )
    if isinstance(document, str):  # prompts one a line: what an entry's target_file takes
        raise ConfigError(
            f"{path}: holds prompts but no entries; a file of prompts, one a line, is an entry's target: "
            f"write prompts_file: prompts.yaml with `- target_file: {path.name}` (and its action: erase, "
            "enhance, ...) in it, or the entry inline in the config under prompts:"
        )
    if not isinstance(document, list) or not document:
        raise ConfigError(
            f"{path}: the file must be a non-empty YAML list of prompt entries (- target: ...), or "
            "kohya train_leco's prompts / targets tables"
        )
    prompts = []
    entries = read_target_files(document, path, "entry ")
    _refuse_kohya_targets(entries, path, "entry ")
    for number, entry in expand_attributes(entries, path, "entry "):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: entry {number}: must be a mapping with at least `target:`")
        try:
            prompts.append(PromptSettings.model_validate(entry).written_at(f"{path.name}: entry {number}"))
        except ValidationError as error:
            raise ConfigError(
                describe_validation_error(error, path, PromptSettings, prefix=f"entry {number}.")
            ) from None
    return prompts


def _refuse_kohya_targets(entries: list[Any], path: Path, where: str) -> None:
    """A kohya slider target (target_class with its poles) written where leco entries go: say where
    it belongs instead of listing the keys an entry lacks."""
    for number, entry in enumerate(entries, start=1):
        if isinstance(entry, dict) and "target_class" in entry and "target" not in entry:
            raise ConfigError(
                f"{path}: {where}{number}.target_class: a kohya slider target, not a leco entry; list "
                "such targets under a top-level `targets:` of a prompts file (prompts_file: slider.toml "
                "or .yaml), which leco expands as kohya does, or write the entry with target:"
            )


def read_target_files(entries: list[Any], path: Path, where: str) -> list[Any]:
    """Replace each entry's `target_file: F` (one prompt a line, relative to `path`) by `target: [...]`."""
    result = []
    for index, entry in enumerate(entries):
        if isinstance(entry, dict) and "target_file" in entry:
            key = f"{where}{index + 1}.target_file"
            if "target" in entry:
                raise ConfigError(f"{path}: {key}: target is set too; keep one of them")
            value = entry["target_file"]
            if isinstance(value, bool) or not isinstance(value, str | int | float | None):
                raise ConfigError(
                    f"{path}: {key}: must be one file name (got {_short(value)}); give each file an entry "
                    "of its own"
                )
            name = "" if value is None else str(value)
            if not name.strip():  # else the config's own folder: ". is a folder"
                raise ConfigError(f"{path}: {key}: empty; name the text file with one prompt a line")
            file = path.parent / Path(name).expanduser()
            entry = {k: v for k, v in entry.items() if k != "target_file"}
            entry["target"] = read_prompt_lines(file, f"{path}: {key}")
        result.append(entry)
    return result


# Files a prompt list is never in: a config (a prompt file naming itself) or a model.
_NOT_PROMPT_LISTS = (".yaml", ".yml", ".toml", ".json", ".safetensors", ".ckpt", ".pt", ".pth", ".bin")


NUL_BYTES = "holds NUL bytes: UTF-16 or UTF-32 text, or not a text file"


def refuse_non_text_prompts(file: Path, where: str, text: str | None = None) -> None:
    """One line for a prompt list that is a config or model file (by name, or by its NUL bytes), or
    no file at all."""
    if text is None:
        refuse_special_file(file, "text", f"{where}: ")
    if file.suffix.lower() in _NOT_PROMPT_LISTS:
        raise ConfigError(
            f"{where}: {file} is a {file.suffix[1:]} file; name a text file with one prompt a line"
        )
    if text is not None and "\x00" in text:  # UTF-16/32 without a byte-order mark decodes so too
        raise ConfigError(f"{where}: {file} {NUL_BYTES}; save it as UTF-8 text with one prompt a line")


def text_lines(text: str) -> list[str]:
    """A text file's lines as Python's readlines() (kohya's reading) gives them: split at line
    breaks alone, not at the form feeds and Unicode separators str.splitlines() also breaks at."""
    return re.split(r"\r\n|\r|\n", text)


def read_prompt_text(file: Path, where: str, relative_to: str = "the file that names them") -> str:
    """A text file of prompts (UTF-8, a BOM dropped); a folder, a missing file, a binary or a wide
    encoding is one line naming `where` and the fix."""
    if file.is_dir():
        raise ConfigError(f"{where}: {file} is a folder; name the text file with one prompt a line")
    refuse_non_text_prompts(file, where)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"{where}: {file} not found; paths are relative to {relative_to}") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"{where}: {file} cannot be read {_why_unreadable(error, file)}") from None
    refuse_non_text_prompts(file, where, text)
    return text


def read_prompt_lines(file: Path, where: str) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped (a UTF-8 BOM too)."""
    text = read_prompt_text(file, where)
    lines = [line.strip() for line in text_lines(text)]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ConfigError(f"{where}: {file} holds no prompt; write one prompt a line")
    return prompts


def _resolve_prompts_file(name: str, config_path: Path) -> Path:
    # Relative to the config file; the reference tool resolved it against the working directory,
    # so its example configs (prompts_file: ./examples/prompts.yaml) are found there as a fallback.
    if not name.strip():
        raise ConfigError(f"{config_path}: prompts_file: empty; name the prompts YAML or TOML file")
    candidate = Path(name).expanduser()
    tried = [candidate if candidate.is_absolute() else config_path.parent / candidate]
    if Path.cwd() / candidate != tried[0].absolute():  # a config in the working folder: looked at once
        tried.append(Path.cwd() / candidate)
    for option in tried:
        try:
            if option.is_file():
                _warn_of_a_second_prompts_file(option, tried, config_path)
                return option
            if option.is_dir():
                raise ConfigError(
                    f"{config_path}: prompts_file: {option} is a folder; name the prompts YAML or TOML file"
                )
        except (OSError, ValueError):  # e.g. a NUL byte or an over-long name
            break
    for option in tried:  # found nowhere as a file: one that is a FIFO or device is named as such
        refuse_special_file(option, "prompts YAML or TOML", f"{config_path}: prompts_file: ")
    where = " or ".join(str(p) for p in tried)
    raise ConfigError(f"{config_path}: prompts_file: {name!r} not found (looked at {where}); fix the path")


def _warn_of_a_second_prompts_file(chosen: Path, tried: list[Path], config_path: Path) -> None:
    """Both places hold a prompts file of that name: the reference tool (and sliders) would read the
    one in the working directory, leco reads the one beside the config; say which."""
    other = tried[-1]
    if chosen == other or not other.is_file() or _same_text(chosen, other):
        return
    warn(
        f"{config_path}: prompts_file: reading {chosen} (beside the config); {other}, in the working "
        "directory, is another file of that name, which the reference LECO tool would read instead"
    )


def _same_text(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b) or a.read_bytes() == b.read_bytes()
    except OSError:
        return False


def refuse_special_file(path: Path, kind: str, where: str = "") -> None:
    """A FIFO or a device where a file is read: reading would block for ever, or fill the memory."""
    special = False
    with contextlib.suppress(OSError, ValueError):  # a NUL byte or an over-long name: read, and said, later
        special = path.exists() and not path.is_file() and not path.is_dir()
    if special:
        raise ConfigError(f"{where}{path}: is not a regular file; name a {kind} file")


def _same_bool(value: Any, flag: bool) -> bool:
    """Whether `value` reads as `flag` the way a bool field reads it ("on", "yes", 1...); a value
    that is no bool at all is left to the field's own check."""
    try:
        return TypeAdapter(bool).validate_python(value) == flag
    except ValidationError:
        return True


def read_config_text(path: Path, kind: str) -> str:
    """A config or prompt file's text; a missing, folder or unreadable path is one line naming it."""
    refuse_special_file(path, kind)
    try:
        text = path.read_text(encoding="utf-8")
        if "\x00" in text:  # UTF-16 or UTF-32 without a byte-order mark decodes as UTF-8 with NULs
            raise ConfigError(f"{path}: {NUL_BYTES}; save it as UTF-8")
        return text
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found; check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a {kind} file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read {_why_unreadable(error, path)}") from None


def _why_unreadable(error: Exception, path: Path) -> str:
    if isinstance(error, PermissionError):
        return "(permission denied); make it readable (chmod) or copy it somewhere you can read"
    encoding = _wide_encoding(path) if isinstance(error, UnicodeDecodeError) else None
    if encoding:  # Windows editors' "Unicode"
        return f"as UTF-8 text: it is {encoding}; save it again as UTF-8"
    return f"as UTF-8 text ({type(error).__name__})"


def _wide_encoding(path: Path) -> str | None:
    """ "UTF-16" or "UTF-32" for a file that starts with their byte-order mark, None otherwise."""
    try:
        with path.open("rb") as file:
            start = file.read(4)
    except OSError:
        return None
    if start.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # before UTF-16: FF FE 00 00
        return "UTF-32"
    return "UTF-16" if start.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a config's second `train:` would silently replace
    the first, so leco's own files refuse it (keys merged in with `<<:` may still be overridden).

    Each mapping is checked once, as written: PyYAML rewrites a mapping that uses `<<:` in place
    when it is merged, so a later look would see merged keys next to their overrides."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        if id(node) not in self._checked:
            self._checked.add(id(node))
            self._refuse_repeated_keys(node)
        super().flatten_mapping(node)

    def _refuse_repeated_keys(self, node: yaml.MappingNode) -> None:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                repeated = key in seen
            except TypeError:
                continue  # an unhashable key: the base constructor refuses it
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} appears twice in one mapping; keep one", key_node.start_mark
                )
            seen.add(key)


def read_yaml(path: Path) -> Any:
    text = read_config_text(path, "YAML")
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or first_line(error, None)
        raise ConfigError(f"{path}: {where}invalid YAML ({problem})") from None


def describe_validation_error(
    error: ValidationError, path: Path, model: type[BaseModel], prefix: str = ""
) -> str:
    """One line per problem: file, dotted key, what is wrong and what is allowed.

    A key that takes one of several forms (`resolution`: a number or [height, width]) fails once per
    form, each error tagged with the form; those become one line about the key."""
    by_key: dict[tuple, dict] = {}
    for item in error.errors():
        loc = list(item["loc"])
        # the form's tag may be followed by where inside that form it failed (list[str].1)
        form = next(
            (i for i, part in enumerate(loc) if i and isinstance(part, str) and _UNION_MEMBER.match(part)), 0
        )
        if not form:
            by_key[("#", len(by_key))] = item  # a key with one form: every error is its own line
            continue
        key = tuple(loc[:form])
        # a list given for a key that takes a list: the list form's error says which item is wrong
        inside_list = str(loc[form]).startswith("list[") and len(loc) > form + 1
        kept = by_key.get(key)
        if kept is None or (inside_list and len(kept["loc"]) == len(key)):  # kept names no item yet
            by_key[key] = {**item, "loc": (*key, *loc[form + 1 :]) if inside_list else key}
    items = _without_misspelt_missing(list(by_key.values()))
    outer = [part for part in prefix.rstrip(".").split(".") if part]  # where `model` sits in the config
    problems = [_problem(item, model, outer) for item in items]  # a check across keys may name the full key
    return "\n".join(f"{path}: {'' if p.startswith(prefix) else prefix}{p}" for p in problems)


def _without_misspelt_missing(items: list[Any]) -> list[Any]:
    # `targets:` for `target:` fails twice (target missing, targets unknown); the unknown key's line
    # says "did you mean 'target'?", the whole fix, so the missing key's line goes.
    misspelt = {
        (tuple(item["loc"][:-1]), close)
        for item in items
        if item["type"] == "extra_forbidden"
        for close in difflib.get_close_matches(str(item["loc"][-1]), [str(m["loc"][-1]) for m in items], n=3)
    }
    return [
        item
        for item in items
        if not (item["type"] == "missing" and (tuple(item["loc"][:-1]), str(item["loc"][-1])) in misspelt)
    ]


def dotted_key(loc: tuple[Any, ...] | list[Any]) -> str:
    """A pydantic error location as the key users read: list items counted from 1, as every other
    message counts entries ("prompts entry 2"), not from pydantic's 0."""
    return ".".join(str(part + 1) if isinstance(part, int) else str(part) for part in loc)


_SECTION_EXAMPLES = {
    "pretrained_model": "{name_or_path: ink-digits}",
    "teacher": "{name_or_path: ink-digits-2}",
    "network": "{type: lierla, rank: 4}",
}

# A list entry written as its text alone (`- a digit seven`): the entry that text may stand for.
_ENTRY_EXAMPLES = {
    "prompts.N": "{{target: {}}}",
    "erase.N": "{{prompt: {}, concept: WHAT_THE_DETECTOR_LOOKS_FOR}}",
    "keep.N": "{{prompt: {}, concept: WHAT_THE_DETECTOR_LOOKS_FOR}}",
    "enhance.N": "{{prompt: {}, concept: WHAT_THE_DETECTOR_LOOKS_FOR, end: 1}}",
}

# How pydantic tags the form of a union an error belongs to: int, list[str], literal['auto'], ...
_UNION_MEMBER = re.compile(r"^(int|float|str|bool|none|(list|tuple|dict|set|literal)\[.*\])$")


def _problem(item: Any, model: type[BaseModel], outer: list[str] | None = None) -> str:
    loc = [str(part) for part in item["loc"]]
    key = dotted_key(item["loc"]) or "(top level)"
    kind = item["type"]
    message = item["msg"].replace("Value error, ", "")
    if kind == "value_error" and re.match(r"[\w.]+: ", message):  # a check across keys names its key
        where = dotted_key(item["loc"])  # a check inside a list item ("prompts.2") or section
        return f"{where}.{message}" if where and not message.startswith(f"{where}.") else message
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1) or [k for k in allowed if loc[-1] in k][:1]
        whole = [*(outer or []), *loc]  # a --set section checked alone is still a section of the config
        top = LecoConfig if outer and outer[0] in LecoConfig.model_fields and len(outer) == 1 else model
        foreign = _foreign_name(whole) if top is LecoConfig else None  # not in prompt files' entries
        home = _home_of(top, whole if top is not model else loc)
        if len(whole) > 1 and close:  # a key like one of its own section's is a slip of that one first
            home = None  # (train.guidance: rollout_guidance_scale, not preview.guidance)
        hint = f"leco calls it {foreign}; " if foreign else f"it belongs {home}; " if home else ""
        hint = hint or (f"did you mean {close[0]!r}? " if close else "")
        return f"{key}: unknown key; {hint}allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{key}: required key is missing; add it"
    given = _short(item.get("input"))
    if kind == "literal_error":
        expected = item.get("ctx", {}).get("expected", "")
        return f"{key}: {given} is not allowed; use one of {expected}"
    if kind in ("model_type", "dict_type"):  # `teacher: ink-digits-2` for teacher: {name_or_path: ...}
        example = _SECTION_EXAMPLES.get(key, "{key: value, ...}")
        entry = _ENTRY_EXAMPLES.get(re.sub(r"\.\d+$", ".N", key))
        if entry and isinstance(item.get("input"), str):  # the entry's text alone: show it in its keys
            example = entry.format(json.dumps(item["input"], ensure_ascii=False))
        return f"{key}: a section of keys, not {given}; write e.g. {key}: {example}"
    message = item["msg"].replace("Value error, ", "")
    return f"{key}: {message} (got {given})"


# What kohya's and ai-toolkit's users write for a key leco names otherwise: (section or "*", their
# name) -> ours. A near spelling of another key would mislead ("steps" is not "lr_warmup_steps").
_FOREIGN_NAMES = {
    ("train", "steps"): "train.iterations",
    ("*", "max_train_steps"): "train.iterations",
    ("*", "learning_rate"): "train.lr",
    ("*", "optimizer_type"): "train.optimizer",
    ("*", "mixed_precision"): "train.precision",
    ("*", "sample_every"): "preview.every",
    ("*", "sample_every_n_steps"): "preview.every",
    ("*", "save_every"): "save.per_steps",
    ("*", "save_every_n_steps"): "save.per_steps",
    ("*", "output_dir"): "save.path",
    ("*", "output_name"): "save.name",
    ("*", "log_dir"): "logging.tensorboard_dir",
    ("*", "logging_dir"): "logging.tensorboard_dir",
    ("*", "log_with"): "logging.use_tensorboard or logging.use_wandb",
    ("*", "network_dim"): "network.rank",
    ("*", "network_alpha"): "network.alpha",
    ("*", "pretrained_model_name_or_path"): "pretrained_model.name_or_path",
}


def _foreign_name(loc: list[str]) -> str | None:
    """leco's name for a key another trainer's users write (`train.steps` -> train.iterations)."""
    if not loc or loc[0] in ("prompts", "erase", "keep", "enhance"):  # entries have their own keys
        return None
    ours = _FOREIGN_NAMES.get((loc[0] if len(loc) > 1 else "", loc[-1])) or _FOREIGN_NAMES.get(("*", loc[-1]))
    return ours


def _home_of(model: type[BaseModel], loc: list[str]) -> str | None:
    """Where a key put in the wrong place belongs: `iterations` at the top -> under train:, and
    `train.use_tensorboard` -> under logging:."""
    name, sections = loc[-1], _sections(model)
    if len(loc) > 1 and name in sections:
        return "at the top level, as a section of its own"
    in_a_section = (
        len(loc) == 2 and loc[0] in sections and get_origin(model.model_fields[loc[0]].annotation) is not list
    )
    homes = [section for section, fields in sections.items() if name in fields and section != loc[0]]
    if len(homes) != 1 or not (len(loc) == 1 or in_a_section):
        return None
    if get_origin(model.model_fields[homes[0]].annotation) is list:
        return f"in an entry of {homes[0]}: (- {name}: ...)"
    return f"under {homes[0]}: ({homes[0]}.{name})"


def _sections(model: type[BaseModel]) -> dict[str, list[str]]:
    sections = {}
    for name, field in model.model_fields.items():
        for kind in (field.annotation, *get_args(field.annotation)):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                sections[name] = list(kind.model_fields)
    return sections


def _allowed_keys(model: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:  # a list index
            continue
        candidates = (field.annotation, *get_args(field.annotation))
        model = next((t for t in candidates if isinstance(t, type) and issubclass(t, BaseModel)), model)
    return [*model.model_fields, *getattr(model, "READ_ON_LOADING", ())]


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    text = text.replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."
