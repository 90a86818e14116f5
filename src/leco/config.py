"""Training configuration: the reference LECO `config.yaml` + `prompts.yaml`, validated strictly.

Every key of the reference tool's files keeps its meaning; keys we add have defaults, so old files
load unchanged. Unknown keys and wrong values are errors that name the file and the key: a typo
such as `guidance: 4` must never be dropped silently.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from leco.errors import LecoError

# Samples taken from one partial rollout (see leco.rollout). benchmarks/step_speed.py: 2.2x the
# reference's steps/s at 4 (3.4x at 8); benchmarks/rollout_reuse.py: erasure and preservation on
# ink-digits unchanged from 1 to 8. 4 keeps each step's latents from at most 4 steps of one trajectory.
DEFAULT_SAMPLES_PER_ROLLOUT = 4

_PRECISION_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}
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


class PretrainedModelConfig(_Section):
    name_or_path: str
    # None = detect from the weights; an explicit value that contradicts them is an error.
    v2: bool | None = None
    v_pred: bool | None = None
    clip_skip: int | None = Field(None, ge=1)
    # `.ckpt` files are pickles that can run code when loaded: the user must opt in.
    allow_pickle: bool = False
    # A diffusers folder whose configs describe a single-file checkpoint of a non-standard shape.
    config: str | None = None
    revision: str | None = None


class NetworkConfig(_Section):
    type: Literal["lierla", "c3lier"] = "lierla"
    rank: int = Field(4, ge=1)
    # kohya semantics: scale = alpha / rank; alpha 0 means alpha = rank (scale 1).
    alpha: float = Field(1.0, ge=0)
    conv_rank: int | None = Field(None, ge=1)
    conv_alpha: float | None = Field(None, ge=0)
    # The reference tool's key for the layer preset (its filters selected nothing for xattn).
    training_method: Literal["full", "xattn", "xattn-strict", "noxattn", "selfattn", "innoxattn"] = "full"


class TrainConfig(_Section):
    precision: Precision = "bf16"
    noise_scheduler: Annotated[Literal["ddim", "ddpm", "lms", "euler_a"], BeforeValidator(_lower)] = "ddim"
    iterations: int = Field(500, ge=1)
    lr: float = Field(1e-4, gt=0)
    optimizer: Annotated[Literal[OPTIMIZERS], BeforeValidator(_lower)] = "adamw"  # type: ignore[valid-type]
    # Reference form "weight_decay=0.01 betas=(0.9,0.99)" or a mapping.
    optimizer_args: dict[str, Any] = Field(default_factory=dict)
    lr_scheduler: Annotated[Literal[LR_SCHEDULERS], BeforeValidator(_lower)] = "constant"  # type: ignore[valid-type]
    # e.g. {num_cycles: 3} for cosine_with_restarts, {step_size: 100, gamma: 0.5} for step.
    lr_scheduler_args: dict[str, Any] = Field(default_factory=dict)
    lr_warmup_steps: int = Field(0, ge=0)
    max_denoising_steps: int = Field(50, ge=2)
    samples_per_rollout: int = Field(DEFAULT_SAMPLES_PER_ROLLOUT, ge=1)
    rollout_guidance_scale: float = 3.0
    # Spread each sample uniformly inside its sampling step's timestep interval (False: on the grid).
    timestep_offset: bool = True
    seed: int | None = None
    device: str = "auto"
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = Field(None, gt=0)
    # Defaults for prompts that name none (the reference example files carry these keys).
    resolution: int | None = Field(None, ge=8)
    batch_size: int | None = Field(None, ge=1)

    @field_validator("optimizer_args", mode="before")
    @classmethod
    def _parse_optimizer_args(cls, value: Any) -> Any:
        return parse_optimizer_args(value) if isinstance(value, str) else value

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

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or any(c in value for c in '/\\:*?"<>|'):
            raise ValueError('must be a plain file name without / \\ : * ? " < > |')
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
    strengths: list[float] = Field(default_factory=lambda: [-1.0, 0.0, 1.0])
    seeds: list[int] = Field(default_factory=lambda: [0])
    steps: int = Field(20, ge=1)
    guidance: float = 7.0
    every: int | None = Field(None, ge=1)  # default: save.per_steps


class AnchorConfig(_Section):
    """Preservation: prompts whose predictions must stay those of the original model."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    prompts: list[str] = Field(default_factory=list)
    weight: float = Field(1.0, ge=0)
    # Anchors trained next to each sample (batched with the LECO prompts: no extra UNet call).
    per_step: int = Field(1, ge=1)


class PromptSettings(_Section):
    """One entry of prompts.yaml (the reference tool's keys and defaults)."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    target: str
    positive: str | None = None
    unconditional: str = ""
    neutral: str | None = None
    action: Literal["erase", "enhance"] = "erase"
    guidance_scale: float = 1.0
    resolution: int | None = Field(None, ge=8)
    dynamic_resolution: bool = False
    batch_size: int | None = Field(None, ge=1)
    dynamic_crops: bool = False
    # The LoRA strength this entry is trained at (rollout and student). A two-sided slider pairs an
    # entry at 1 with one at -1 whose poles are swapped, so both ends of the slider are trained.
    multiplier: float = 1.0

    @field_validator("multiplier")
    @classmethod
    def _nonzero(cls, value: float) -> float:
        if value == 0:
            raise ValueError("must not be 0 (at strength 0 the LoRA does nothing to train); use 1 or -1")
        return value

    @model_validator(mode="after")
    def _fill_defaults(self) -> PromptSettings:
        if self.positive is None:
            self.positive = self.target
        if self.neutral is None:
            self.neutral = self.unconditional
        return self


_SECTIONS = ("pretrained_model", "network", "train", "save", "logging", "other", "anchors", "preview")


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

    @model_validator(mode="before")
    @classmethod
    def _sections_may_be_empty(cls, data: Any) -> Any:
        # `train:` with nothing under it is YAML null; the reference tool treats it as defaults.
        if isinstance(data, dict):
            return {k: ({} if v is None and k in _SECTIONS else v) for k, v in data.items()}
        return data

    def to_json(self) -> str:
        return self.model_dump_json()


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


def load_config(path: str | Path) -> LecoConfig:
    """Read a config YAML (and its prompts file) into a validated `LecoConfig`."""
    path = Path(path)
    document = read_yaml(path)
    if not isinstance(document, dict):
        raise ConfigError(
            f"{path}: the file must be a YAML mapping of sections (pretrained_model:, train:, ...)"
        )
    prompts_in_config = "prompts" in document
    try:
        config = LecoConfig.model_validate(document)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, path, LecoConfig)) from None
    if config.prompts_file is not None:
        if prompts_in_config:
            raise ConfigError(f"{path}: both prompts_file and prompts are set; keep one of them")
        config.prompts = load_prompts(_resolve_prompts_file(config.prompts_file, path))
    elif not config.prompts:
        raise ConfigError(
            f"{path}: prompts_file: missing; name the prompts YAML (e.g. prompts_file: prompts.yaml)"
        )
    return config


def load_prompts(path: str | Path) -> list[PromptSettings]:
    """Read a prompts YAML: a list of {target, positive, unconditional, neutral, action, ...}."""
    path = Path(path)
    document = read_yaml(path)
    if not isinstance(document, list) or not document:
        raise ConfigError(f"{path}: the file must be a non-empty YAML list of prompt entries (- target: ...)")
    prompts = []
    for index, entry in enumerate(document):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: entry {index + 1}: must be a mapping with at least `target:`")
        try:
            prompts.append(PromptSettings.model_validate(entry))
        except ValidationError as error:
            raise ConfigError(
                describe_validation_error(error, path, PromptSettings, prefix=f"entry {index + 1}.")
            ) from None
    return prompts


def _resolve_prompts_file(name: str, config_path: Path) -> Path:
    # Relative to the config file; the reference tool resolved it against the working directory,
    # so its example configs (prompts_file: ./examples/prompts.yaml) are found there as a fallback.
    candidate = Path(name).expanduser()
    tried = (
        [candidate] if candidate.is_absolute() else [config_path.parent / candidate, Path.cwd() / candidate]
    )
    for option in tried:
        try:
            if option.is_file():
                return option
        except (OSError, ValueError):  # e.g. a NUL byte or an over-long name
            break
    where = " or ".join(str(p) for p in tried)
    raise ConfigError(f"{config_path}: prompts_file: {name!r} not found (looked at {where}); fix the path")


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found; check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a YAML file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read as UTF-8 text ({type(error).__name__})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}: {where}invalid YAML ({problem})") from None


def describe_validation_error(
    error: ValidationError, path: Path, model: type[BaseModel], prefix: str = ""
) -> str:
    """One line per problem: file, dotted key, what is wrong and what is allowed."""
    lines = [f"{path}: {prefix}{_problem(item, model)}" for item in error.errors()]
    return "\n".join(lines)


def _problem(item: Any, model: type[BaseModel]) -> str:
    loc = [str(part) for part in item["loc"]]
    key = ".".join(loc) or "(top level)"
    kind = item["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        close = difflib.get_close_matches(loc[-1], allowed, n=1) or [k for k in allowed if loc[-1] in k][:1]
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{key}: unknown key; {hint}allowed here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{key}: required key is missing; add it"
    given = _short(item.get("input"))
    if kind == "literal_error":
        expected = item.get("ctx", {}).get("expected", "")
        return f"{key}: {given} is not allowed; use one of {expected}"
    message = item["msg"].replace("Value error, ", "")
    return f"{key}: {message} (got {given})"


def _allowed_keys(model: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:  # a list index
            continue
        candidates = (field.annotation, *get_args(field.annotation))
        model = next((t for t in candidates if isinstance(t, type) and issubclass(t, BaseModel)), model)
    return list(model.model_fields)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    text = text.replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."
