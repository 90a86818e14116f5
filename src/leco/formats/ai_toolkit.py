"""ostris/ai-toolkit slider configs (`job: train`, one `config.process` of `type: slider`), run as leco.

The reference is ai-toolkit's own code: `toolkit/config.py` (reading, `${ENV}` and `[name]`
substitution), `toolkit/config_modules.py` (every section's keys and defaults) and
`jobs/process/TrainSliderProcess.py` (what a slider step trains). What it trains maps onto leco
exactly: each target's four pairs are kohya's slider entries (`kohya_leco.slider_pairs`), guidance
1, the rollout sampled by the frozen model (the network is asserted inactive there) from the target
class alone, one entry per step as with `batch_full_slide: false` (true, the default, sums a
target's pairs in one step: leco gives a one-pole target's two pairs twice the draws, so every
target trains as often), on the layers its network adapts (every Linear and 1x1 conv of the UNet:
leco's all-linear; with `conv`, all). `slider.prompt_file` is read and changes nothing, as there
(the loss reads ""). leco differs where the README says: anchors are trained.

Keys are handled in three ways, so that nothing is dropped without a word:
- mapped to the leco key that does the same (the table in the README);
- accepted because they change nothing here either (e.g. `model.dtype`, which ai-toolkit replaces
  by `train.dtype`; `train.max_grad_norm` in a `type: slider` job, whose loop never clips), or
  because their value is ai-toolkit's no-op default (`train.noise_offset: 0`);
- anything else that changes what is trained is an error naming the key. Keys that only change
  sample images, logs or file metadata and have no leco equivalent are listed in one warning.
"""

from __future__ import annotations

import difflib
import importlib.util
import itertools
import json
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from leco.config import MAX_SIDE, ConfigError, LecoConfig, dotted_key, refuse_non_text_prompts
from leco.errors import warn
from leco.formats.kohya_leco import same_poles, slider_pairs
from leco.formats.origins import remember, with_origin

# ai-toolkit's defaults (toolkit/config_modules.py) where they differ from leco's.
AI_TOOLKIT_TRAIN_DEFAULTS = {
    "steps": 1000,
    "lr": 1e-6,
    "max_denoising_steps": 999,
    "batch_size": 1,
    "dtype": "fp32",
    "gradient_checkpointing": True,
    "noise_scheduler": "ddpm",
    "optimizer": "adamw",
    "lr_scheduler": "constant",
}
AI_TOOLKIT_SAVE_DEFAULTS = {"save_every": 1000, "dtype": "float16", "max_step_saves_to_keep": 5}
# TrainSliderProcess denoises the partial rollout with the network off, and passes one text
# embedding per latent, so its `guidance_scale=3` does no guidance (since May 2025; CFG 3 before).
# Its UI's Concept Slider (`job: extension`, `type: concept_slider`, extensions_built_in/concept_slider)
# noises the images of a dataset, the same ones for both ends; leco draws them the same way: the
# frozen model's own images of the target class, unguided (guided, each end's rollout would be
# steered away from the entry's unconditional, which is the other pole).
ROLLOUT = {"rollout_model": "frozen", "rollout_guidance_scale": 1.0}
# Which process type each job runs (TrainJob runs `slider`; ExtensionJob runs extensions by uid).
_PROCESS_OF_JOB = {"train": "slider", "extension": "concept_slider"}

# ai-toolkit optimizer name -> (leco optimizer, eps ai-toolkit passes, lr below 0.1 becomes 1.0)
_OPTIMIZERS = {
    "adamw": ("adamw", 1e-6, False),
    "adam": ("adam", 1e-6, False),
    "adamw8bit": ("adamw8bit", 1e-6, False),
    "adam8bit": ("adam8bit", 1e-6, False),
    "lion": ("lion", None, False),
    "lion8bit": ("lion8bit", None, False),
    "prodigy": ("prodigy", 1e-6, True),
    "dadaptation": ("dadaptadam", 1e-6, True),
    "dadaptationlion": ("dadaptlion", 1e-6, True),
}
_SCHEDULERS = ("ddpm", "ddim", "lms", "euler_a")
# ai-toolkit's kinds of plain LoRA; whether the 3x3 convs are trained depends on `conv` alone.
_NETWORK_TYPES = ("lora", "lierla", "locon", "c3lier")
_OTHER_ARCHS = (
    "is_v3",
    "is_flux",
    "is_pixart",
    "is_pixart_sigma",
    "is_auraflow",
    "is_lumina2",
    "is_ssd",
    "is_vega",
)
_FLOAT = re.compile(r"^[-+]?(?:\d[\d_]*)?\.?\d[\d_]*(?:[eE][-+]?\d+)?$")


class _YamlLoader(yaml.SafeLoader):
    """PyYAML reads `2e-4` (no dot) as text; ai-toolkit's loader, like YAML 1.2, reads a number."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d[\d_]*\.?[\d_]*[eE][-+]?\d+)$"), list("-+0123456789")
)


def is_ai_toolkit_config(document: Any) -> bool:
    """ai-toolkit job files have top-level `job:` and `config:`; leco configs have neither."""
    return isinstance(document, dict) and ("job" in document or "config" in document)


def read_document(path: Path, quiet: bool = False) -> Any:
    """The parsed file (JSON for .json, else YAML), `${VAR}` replaced; None if `quiet` and unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
        if quiet:
            return _parse(path, text)
        return _parse(path, _substitute_environment(path, text))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        if quiet:
            return None
        raise ConfigError(
            f"{path}: cannot be read ({type(error).__name__}: {(str(error).splitlines() or [''])[0]})"
        ) from None
    except ConfigError:
        if quiet:
            return None
        raise


# leco key -> the job's own key, per job file read: checks that run after conversion (the device,
# the model's family, an optimizer's package) name the key the user wrote.
def load_ai_toolkit_config(path: Path) -> LecoConfig:
    """Read an ai-toolkit slider job config into a leco config (its prompts expanded)."""
    document = read_document(path)
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: must be a mapping with job: and config:")
    converter = _Converter(path)
    config = converter.convert(document)
    remember(path, converter.origin)
    return config


def _parse(path: Path, text: str) -> Any:
    if path.suffix.lower() in (".json", ".jsonc"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: line {error.lineno}: invalid JSON ({error.msg})") from None
    return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader: no Python objects


def _substitute_environment(path: Path, text: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(
                f"{path}: ${{{name}}}: environment variable {name} is not set; set it or write the value"
            )
        return os.environ[name]

    return re.sub(r"\$\{([^}]+)\}", value, text)


def _replace_name(value: Any, name: str) -> Any:
    """ai-toolkit replaces the text [name] anywhere in the config by config.name."""
    if isinstance(value, str):
        return value.replace("[name]", name)
    if isinstance(value, list):
        return [_replace_name(v, name) for v in value]
    if isinstance(value, dict):
        return {k: _replace_name(v, name) for k, v in value.items()}
    return value


class _Section:
    """One mapping of the file; remembers which keys were read so every other key can be reported."""

    def __init__(
        self, data: Any, where: str, path: Path, unknown: list[tuple[str, str]] | None = None
    ) -> None:
        """`unknown`: where every section of one file notes the keys leco has no equivalent for, so
        that they are refused all at once (see `refuse_unknown`)."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: {where}: must be a mapping (got {_short(data)})")
        self.data, self.where, self.path = data, where, path
        self.used: set[str] = set()
        self.unknown = [] if unknown is None else unknown

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def has(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str, default: Any = None) -> Any:
        self.used.add(name)
        value = self.data.get(name, default)
        return default if value is None else value

    def require(self, name: str) -> Any:
        if self.data.get(name) is None:
            raise ConfigError(f"{self.path}: {self.key(name)}: required key is missing; add it")
        return self.get(name)

    def section(self, name: str) -> _Section:
        return _Section(self.get(name), self.key(name), self.path, self.unknown)

    def item(self, data: Any, where: str) -> _Section:
        """An element of one of this section's lists (a process, target, dataset or anchor)."""
        return _Section(data, where, self.path, self.unknown)

    def accept(self, *names: str) -> None:
        """Keys whose value changes nothing in leco or in ai-toolkit's slider process."""
        self.used.update(names)

    def only(self, name: str, allowed: Callable[[Any], bool], why: str) -> None:
        """A key leco can honour only at values that do nothing (ai-toolkit's defaults)."""
        self.used.add(name)
        if name in self.data and self.data[name] is not None and not allowed(self.data[name]):
            raise ConfigError(f"{self.path}: {self.key(name)}: {_short(self.data[name])} {why}")

    def cosmetic(
        self, warnings: list[str], name: str, inert: Callable[[Any], bool] = lambda v: False
    ) -> None:
        """A key that only changes samples, logs or metadata: noted when it would do something."""
        self.used.add(name)
        if name in self.data and self.data[name] is not None and not inert(self.data[name]):
            warnings.append(self.key(name))

    def finish(self) -> None:
        """Note every key of this section that was not read."""
        for name in self.data:
            if name not in self.used:
                known = sorted(self.used)
                close = difflib.get_close_matches(name, known, n=1)
                fix = f"did you mean {close[0]!r}?" if close else "remove it"
                self.unknown.append((self.key(name), f"{fix}; read there: {', '.join(known)}"))

    def refuse_unknown(self) -> None:
        if len(self.unknown) == 1:
            ((key, fix),) = self.unknown
            raise ConfigError(f"{self.path}: {key}: leco has no equivalent for this key; {fix}")
        if self.unknown:
            keys = "; ".join(f"{key} ({fix})" for key, fix in self.unknown)
            raise ConfigError(f"{self.path}: leco has no equivalent for these keys: {keys}")


class _Converter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.warnings: list[str] = []
        self.origin: dict[str, str] = {}  # leco key -> the ai-toolkit key it came from (for errors)
        self.config: dict[str, Any] = {}
        self.entry_origins: list[str] = []  # per leco prompts entry: the target it was expanded from
        self.concept = False  # the UI's Concept Slider (type concept_slider), not a `type: slider` job

    def convert(self, document: dict[str, Any]) -> LecoConfig:
        root = _Section(document, "", self.path)
        job = root.require("job")
        if job not in _PROCESS_OF_JOB:
            raise ConfigError(
                f"{self.path}: job: {_short(job)}: leco runs ai-toolkit's slider jobs (`job: train` with a "
                "`type: slider` process, or its UI's `job: extension` with `type: concept_slider`)"
            )
        name = str(root.section("config").require("name"))
        root.data = _replace_name(document, name)
        config = root.section("config")
        config.accept("name")
        root.cosmetic(self.warnings, "meta")
        root.finish()
        process = self.slider_process(config, _PROCESS_OF_JOB[job])
        self.concept = _PROCESS_OF_JOB[job] == "concept_slider"
        self.read_job(config, process, name)
        steps = self.read_train(process.section("train"))
        self.read_model(process.section("model"))
        self.read_network(process)
        self.read_save(process.section("save"), steps)
        self.read_logging(process.section("logging"))
        if self.concept:
            self.read_concept_slider(process.section("slider"), self.dataset_resolutions(process))
        else:
            self.read_slider(process.section("slider"), steps)
        self.read_sample(process.section("sample"))
        for section in (config, process):
            section.finish()
        root.refuse_unknown()  # every section's, at once
        if self.warnings:
            warn(
                f"{self.path}: not honoured (they change only samples, logs or metadata): "
                + ", ".join(self.warnings)
            )
        return self.validate()

    # -- sections ---------------------------------------------------------------------------------

    def slider_process(self, config: _Section, expected: str) -> _Section:
        processes = config.require("process")
        if isinstance(processes, list) and not processes:
            raise ConfigError(
                f"{self.path}: config.process: is empty; add the slider process (- type: slider)"
            )
        if not isinstance(processes, list):
            raise ConfigError(
                f"{self.path}: config.process: must be a list of processes; make the slider process a list "
                "item (`- type: slider` under process:)"
            )
        index = 0
        if len(processes) > 1:  # ai-toolkit runs them in turn; leco runs the slider among them
            sliders = [
                i for i, p in enumerate(processes) if isinstance(p, dict) and p.get("type") == expected
            ]
            if len(sliders) > 1:
                found = ", ".join(f"config.process[{i}]" for i in sliders)
                raise ConfigError(
                    f"{self.path}: config.process: leco runs one slider process per file (found {found}); "
                    "split the file"
                )
            if sliders:
                index = sliders[0]
                others = [
                    f"config.process[{i}] ({_short(p.get('type') if isinstance(p, dict) else p)})"
                    for i, p in enumerate(processes)
                    if i != index
                ]
                warn(
                    f"{self.path}: {', '.join(others)}: not a slider, skipped; leco runs "
                    f"config.process[{index}] (ai-toolkit would run every process in turn)"
                )
        process = config.item(processes[index], f"config.process[{index}]")
        kind = process.require("type")
        if kind != expected:
            job = next(job for job, process in _PROCESS_OF_JOB.items() if process == expected)
            raise ConfigError(
                f"{self.path}: config.process[{index}].type: {_short(kind)}: leco runs ai-toolkit's "
                f"sliders, which in a `job: {job}` are `type: {expected}`"
            )
        return process

    def read_job(self, config: _Section, process: _Section, name: str) -> None:
        """Job-level keys; ai-toolkit lets the process override name, folder, device and log_dir."""

        def setting(key: str) -> tuple[Any, str]:
            config.accept(key)
            chosen = process if process.has(key) else config
            return chosen.get(key), chosen.key(key)

        folder, folder_key = setting("training_folder")
        if folder is None:
            raise ConfigError(f"{self.path}: config.training_folder: required key is missing; add it")
        # Files are named after the job; a process `name` only names their folder.
        subfolder = str(process.get("name", name))
        subfolder_key = process.key("name") if process.has("name") else "config.name"
        if not subfolder.strip() or subfolder in (".", "..") or any(c in subfolder for c in "/\\"):
            raise ConfigError(
                f"{self.path}: {subfolder_key}: {subfolder!r} must name one folder inside "
                "training_folder (no / or \\, not . or ..)"
            )
        self.put("save.name", name, "config.name")
        self.put("save.path", str(Path(str(folder)) / subfolder), folder_key)
        device, device_key = setting("device")
        if device is not None:
            self.put("train.device", str(device), device_key)
        log_dir, log_key = setting("log_dir")
        if log_dir is not None and importlib.util.find_spec("tensorboard") is None:
            warn(
                f"{self.path}: {log_key}: tensorboard is not installed, so no logs are written; "
                "pip install tensorboard"
            )
        elif log_dir is not None:
            self.put("logging.use_tensorboard", True, log_key)
            self.put("logging.tensorboard_dir", str(log_dir), log_key)  # leco adds save.name: log_dir/name
        config.only("is_v2", lambda v: v is False, "is not read by the slider process; set model.is_v2")
        seed = process.get("training_seed")
        if seed is not None:
            self.put("train.seed", seed, process.key("training_seed"))
        process.accept("performance_log_every", "sqlite_db_path")  # the UI's job database
        # trigger_word fills [trigger] in sample prompts; a slider's targets name their words themselves.
        process.cosmetic(self.warnings, "trigger_word")

    def read_concept_timesteps(self, train: _Section) -> None:
        """The Concept Slider draws each step's timestep index (into the scheduler's 1000, noisiest
        first) between min_ and max_denoising_steps, cubed towards the noisy end for `content` and
        the clean end for `style`, or from a fixed set for the *_step types (BaseSDTrainProcess);
        leco's rollouts spread their latents over every timestep, which is ai-toolkit's default."""
        every = "leco trains every timestep, as ai-toolkit's default does"
        train.only("min_denoising_steps", lambda v: v == 0, f"narrows the timesteps: {every}; set 0")
        train.only(
            "max_denoising_steps",
            lambda v: isinstance(v, int | float) and v >= 999,
            f"narrows the timesteps: {every}; set 999 (or 1000)",
        )
        train.only(
            "content_or_style",
            lambda v: str(v).lower() == "balanced",
            "(the UI's Timestep Bias) biases the timesteps: leco trains every timestep alike, as "
            "ai-toolkit's default (balanced) does; set balanced",
        )
        train.only(
            "timestep_type",
            lambda v: v not in ("one_step", "two_step", "four_step", "eight_step", "next_sample"),
            f"draws a few fixed timesteps: {every}; remove it",
        )

    def read_train(self, train: _Section) -> int:
        defaults = AI_TOOLKIT_TRAIN_DEFAULTS
        steps = self.integer(train, "steps", defaults["steps"])
        self.put("train.iterations", steps, train.key("steps"))
        lr = self.number(train, "lr", defaults["lr"])
        self.read_optimizer(train, lr)
        self.ignore_unet_lr(train, lr)
        self.read_lr_scheduler(train, steps)
        if self.concept:
            self.read_concept_timesteps(train)
            # Its trainer runs ai-toolkit's image-trainer step, which clips the gradient norm every
            # step (1.0 unless set; every optimizer read here); the `type: slider` loop never does.
            clip = self.number(train, "max_grad_norm", 1.0)
            if clip <= 0:  # its clip_grad_norm_ scales every gradient by clip / norm: 0 trains nothing
                raise ConfigError(
                    f"{self.path}: {train.key('max_grad_norm')}: {clip:g} would scale every gradient to "
                    f"{'zero' if clip == 0 else 'its opposite'} in ai-toolkit (it clips every step); "
                    "give a positive norm or leave it out (1.0)"
                )
            self.put("train.max_grad_norm", clip, train.key("max_grad_norm"))
        for key in ("max_denoising_steps", "batch_size"):
            # The concept slider noises dataset images at one timestep and has no rollout to size (its
            # max_denoising_steps bounds that timestep): the rollout leco draws instead takes leco's
            # number of steps.
            if not (self.concept and key == "max_denoising_steps"):
                self.put(f"train.{key}", train.get(key, defaults[key]), train.key(key))
        self.put("train.precision", train.get("dtype", defaults["dtype"]), train.key("dtype"))
        self.put(
            "train.gradient_checkpointing",
            train.get("gradient_checkpointing", defaults["gradient_checkpointing"]),
            train.key("gradient_checkpointing"),
        )
        scheduler = str(train.get("noise_scheduler", defaults["noise_scheduler"])).lower()
        if scheduler not in _SCHEDULERS:
            raise ConfigError(
                f"{self.path}: {train.key('noise_scheduler')}: {scheduler!r} has no leco equivalent; "
                f"use one of {', '.join(_SCHEDULERS)}"
            )
        self.put("train.noise_scheduler", scheduler, train.key("noise_scheduler"))
        for key, value in ROLLOUT.items():
            self.put(f"train.{key}", value, train.where)
        self.put("other.use_xformers", train.get("xformers", False), train.key("xformers"))
        # Read by ai-toolkit but without effect on a slider (or on a LoRA that trains the UNet only).
        train.accept("sdp", "text_encoder_lr", "refiner_lr", "embedding_lr", "adapter_lr")
        train.accept(
            "min_denoising_steps", "snr_gamma", "max_grad_norm", "attention_backend", "weight_jitter"
        )
        # The slider loop draws its own timesteps (timestep_type is read by flow-matching models'
        # trainers); leco caches the prompts' text embeddings itself.
        train.accept("timestep_type", "cache_text_embeddings")
        # Flux's guidance embedding and Wan 2.2's two experts: not in an SD model.
        train.accept("bypass_guidance_embedding", "switch_boundary_every")
        # Read only by ai-toolkit's image trainers (their dataset loop, loss and memory handling),
        # never by the slider loop; its UI writes them into every job.
        train.accept(
            "loss_type",
            "content_or_style",
            "content_or_style_reg",
            "unload_text_encoder",
            "diff_output_preservation",
            "diff_output_preservation_multiplier",
            "diff_output_preservation_class",
            "do_cfg",
            "noise_multiplier",
            "linear_timesteps",
            "linear_timesteps2",
        )
        # ai-toolkit's slider process caches the prompts' text states and trains the UNet alone;
        # leco's own configs can train the text encoder instead.
        text_encoder_hint = (
            "a leco config trains the text encoder instead of the UNet with network.training_method: "
            "text-encoder"
        )
        train.only(
            "train_unet",
            lambda v: v is True,
            f"is not what ai-toolkit's slider process trains; {text_encoder_hint}",
        )
        train.only(
            "train_text_encoder",
            lambda v: v is False,
            f"is not what ai-toolkit's slider process trains (it caches the prompts); {text_encoder_hint}",
        )
        # The concept slider's guided loss is its own and never weighs by SNR.
        if train.get("min_snr_gamma", 0) and not self.concept:
            self.put("train.min_snr_gamma", train.get("min_snr_gamma"), train.key("min_snr_gamma"))
        train.only("noise_offset", lambda v: v == 0, "has no leco equivalent; remove it (or set it to 0)")
        train.only("learnable_snr_gos", lambda v: v is False, "has no leco equivalent; remove it")
        for key in ("gradient_accumulation_steps", "gradient_accumulation"):
            train.only(key, lambda v: v == 1, "has no leco equivalent; remove it (or set it to 1)")
        train.only(
            "ema_config", lambda v: isinstance(v, dict) and not v.get("use_ema"), "has no leco equivalent"
        )
        if train.get("disable_sampling", False):
            self.config.setdefault("preview", {})["disabled"] = True
        train.accept("skip_first_sample", "force_first_sample")  # leco previews no step 0
        train.finish()
        return steps

    def read_optimizer(self, train: _Section, lr: float) -> None:
        name = str(train.get("optimizer", AI_TOOLKIT_TRAIN_DEFAULTS["optimizer"])).lower()
        if name not in _OPTIMIZERS:
            raise ConfigError(
                f"{self.path}: {train.key('optimizer')}: {name!r} has no leco equivalent; "
                f"use one of {', '.join(_OPTIMIZERS)}"
            )
        optimizer, eps, adaptive = _OPTIMIZERS[name]
        params = train.get("optimizer_params", {})
        if not isinstance(params, dict):
            raise ConfigError(
                f"{self.path}: {train.key('optimizer_params')}: must be a mapping of optimizer args"
            )
        self.put("train.optimizer", optimizer, train.key("optimizer"))
        self.put(
            "train.optimizer_args", ({"eps": eps} if eps else {}) | params, train.key("optimizer_params")
        )
        # ai-toolkit gives adaptive optimizers lr 1.0 when the config's lr looks like an Adam lr.
        self.put("train.lr", 1.0 if adaptive and lr < 0.1 else lr, train.key("lr"))

    def ignore_unet_lr(self, train: _Section, lr: float) -> None:
        """ai-toolkit stores `unet_lr` but gives the network and the optimizer `lr`
        (BaseSDTrainProcess), so a job trains at `lr` whatever `unet_lr` says; so does leco."""
        if not train.has("unet_lr"):
            return
        unet_lr = self.number(train, "unet_lr", lr)
        if unet_lr != lr:
            warn(
                f"{self.path}: {train.key('unet_lr')}: {unet_lr:g} is not read by ai-toolkit, which "
                f"trains at {train.key('lr')} ({lr:g}); leco trains at {lr:g} too. Set lr to change it"
            )

    def read_lr_scheduler(self, train: _Section, steps: int) -> None:
        """ai-toolkit builds torch schedulers over all steps; the leco schedule that draws the same curve."""
        name = str(train.get("lr_scheduler", AI_TOOLKIT_TRAIN_DEFAULTS["lr_scheduler"])).lower()
        key = train.key("lr_scheduler_params")
        params = train.get("lr_scheduler_params", {})
        if not isinstance(params, dict):
            raise ConfigError(f"{self.path}: {key}: must be a mapping of scheduler args")
        params = dict(params)
        # BaseSDTrainProcess sets total_iters to train.steps whatever the file says, and its cosine
        # schedules take their length from it (toolkit/scheduler.py): T_max and T_0 are replaced too.
        # (max_iterations stops that, and has no leco equivalent: refused below)
        replaced = {"cosine": "T_max", "cosine_with_restarts": "T_0"}.get(name)
        for length in ("total_iters", replaced) if "max_iterations" not in params else ():
            if length in params and params.pop(length) != steps:
                warn(
                    f"{self.path}: {key}.{length}: ai-toolkit replaces it with train.steps ({steps}), "
                    "and so does leco; remove it"
                )
        if name.startswith("cosine") and params.get("eta_min", 0) == 0:
            params.pop("eta_min", None)  # torch's default; leco's cosine falls to 0 too
        args: dict[str, Any] = {}
        if name == "constant_with_warmup":
            self.put("train.lr_warmup_steps", params.pop("num_warmup_steps", 1000), f"{key}.num_warmup_steps")
        elif name == "step":  # torch StepLR: gamma 0.1 unless given
            step_size, gamma = params.pop("step_size", None), params.pop("gamma", 0.1)
            if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size < 1:
                raise ConfigError(
                    f"{self.path}: {key}.step_size: lr_scheduler step needs a whole number >= 1"
                )
            if isinstance(gamma, bool) or not isinstance(gamma, int | float):
                raise ConfigError(f"{self.path}: {key}.gamma: must be a number (got {_short(gamma)})")
            args = {"step_size": step_size, "gamma": float(gamma)}
        elif name not in ("constant", "cosine", "cosine_with_restarts"):
            raise ConfigError(
                f"{self.path}: {train.key('lr_scheduler')}: {name!r} has no leco equivalent (ai-toolkit's "
                "linear rises from lr/3 to lr); use constant, constant_with_warmup, cosine, "
                "cosine_with_restarts or step"
            )
        if params:
            raise ConfigError(
                f"{self.path}: {key}.{next(iter(params))}: has no leco equivalent for "
                f"lr_scheduler {name}; remove it"
            )
        self.put("train.lr_scheduler", name, train.key("lr_scheduler"))
        self.put("train.lr_scheduler_args", args, key)

    def read_model(self, model: _Section) -> None:
        self.put("pretrained_model.name_or_path", model.require("name_or_path"), model.key("name_or_path"))
        for ours, theirs in (("v2", "is_v2"), ("v_pred", "is_v_pred")):
            if model.has(theirs):
                self.put(f"pretrained_model.{ours}", model.get(theirs), model.key(theirs))
        arch = model.get("arch")
        # "sd15" is its UI's name for SD 1.5, which it loads as the sd1 default (no model class of that arch)
        if arch is not None and str(arch).split(":")[0] not in ("sd1", "sd15", "sd2", "sdxl"):
            raise ConfigError(
                f"{self.path}: {model.key('arch')}: {_short(arch)}: leco trains sd1, sd2 and sdxl"
            )
        if arch is not None and str(arch).startswith("sd2"):
            self.put("pretrained_model.v2", True, model.key("arch"))
        if model.get("is_xl", False) and model.get("is_v2", False):
            raise ConfigError(f"{self.path}: {model.key('is_xl')}: is_xl and is_v2 are both true; keep one")
        # ai-toolkit builds the pipeline these name, which weights of another family do not fit: leco
        # detects the family from the weights and refuses one that contradicts them.
        if model.has("is_xl"):
            self.put("pretrained_model.sdxl", model.get("is_xl"), model.key("is_xl"))
        if arch is not None:
            # arch sdxl makes ai-toolkit set is_xl itself (an is_xl: false beside it is moot); is_xl
            # true beside another arch names two families
            if model.get("is_xl") is True and not str(arch).startswith("sdxl"):
                raise ConfigError(
                    f"{self.path}: {model.key('is_xl')}: is true but arch is {_short(arch)}; keep one of them"
                )
            self.put("pretrained_model.sdxl", str(arch).startswith("sdxl"), model.key("arch"))
        # dtype: ai-toolkit replaces it by train.dtype.
        model.accept("dtype", "low_vram")
        for key in _OTHER_ARCHS:
            model.only(key, lambda v: v is False, "is not supported: leco trains SD1, SD2 and SDXL UNets")
        for key in ("quantize", "quantize_te"):
            model.only(
                key,
                lambda v: v is False,
                "has no leco equivalent (leco trains unquantized weights); remove it",
            )
        for key in ("use_text_encoder_1", "use_text_encoder_2"):
            model.only(key, lambda v: v is True, "has no leco equivalent; remove it")
        model.cosmetic(self.warnings, "vae_path")  # the VAE draws previews only; training needs none
        # Arguments for other architectures' model classes (Wan, Flux...); the UI writes {} into every
        # job. compile: torch.compile, speed only.
        model.only("model_kwargs", lambda v: v == {}, "has no leco equivalent for SD models; remove it")
        model.accept("compile", "qtype", "qtype_te")
        model.finish()

    def read_network(self, process: _Section) -> None:
        if process.data.get("network") is None:  # ai-toolkit reads `network:` left empty as no network
            raise ConfigError(
                f"{self.path}: {process.key('network')}: required key is missing or empty; leco trains a "
                "LoRA: e.g. network: {type: lora, linear: 4, linear_alpha: 1}"
            )
        network = process.section("network")
        kind = str(network.get("type", "lora")).lower()
        if kind not in _NETWORK_TYPES:
            raise ConfigError(
                f"{self.path}: {network.key('type')}: {kind!r} has no leco equivalent; "
                "use lora, lierla, locon or c3lier"
            )
        # NetworkConfig: `rank` (the older name) wins over `linear`; `linear_alpha` over `alpha`.
        rank_key = "linear" if network.get("rank") is None else "rank"
        network.accept("linear")
        rank = network.get(rank_key, 4)
        given = "linear_alpha" if "linear_alpha" in network.data else "alpha"
        alpha = _alpha_or_rank(network.data.get(given, 1.0), rank)
        network.accept("linear_alpha", "alpha")
        self.put("network.rank", rank, network.key(rank_key))
        self.put("network.alpha", alpha, network.key("linear_alpha"))
        # Its lora network adapts every Linear and 1x1 conv of the UNet (LoRASpecialNetwork targets the
        # whole UNet2DConditionModel), its locon the same but SDXL's size embedding; with `conv`,
        # whatever the type says, every 3x3 conv too: leco's all-linear and all.
        conv = network.get("conv")
        if conv:
            self.put("network.type", "all", network.key("conv"))
            self.put("network.conv_rank", conv, network.key("conv"))
            conv_alpha = _alpha_or_rank(network.data.get("conv_alpha", conv), conv)
            network.accept("conv_alpha")
            self.put("network.conv_alpha", conv_alpha, network.key("conv_alpha"))
        else:
            self.put("network.type", "all-linear", network.key("type"))
            network.accept("conv_alpha")
        network.only("dropout", lambda v: v == 0, "has no leco equivalent; remove it")
        network.only(
            "network_kwargs",
            lambda v: isinstance(v, dict) and not any(v.values()),  # the UI's {ignore_if_contains: []}
            "has no leco equivalent; remove it",
        )
        network.accept("lokr_full_rank", "lokr_factor")  # read for type lokr only
        network.accept("transformer_only")  # selects blocks of transformer models; an SD UNet keeps all
        network.finish()

    def read_save(self, save: _Section, steps: int) -> None:
        every = self.integer(save, "save_every", AI_TOOLKIT_SAVE_DEFAULTS["save_every"])
        self.put("save.per_steps", every, save.key("save_every"))
        self.put("save.precision", save.get("dtype", AI_TOOLKIT_SAVE_DEFAULTS["dtype"]), save.key("dtype"))
        keep_key = save.key("max_step_saves_to_keep")
        keep = save.get("max_step_saves_to_keep", AI_TOOLKIT_SAVE_DEFAULTS["max_step_saves_to_keep"])
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ConfigError(f"{self.path}: {keep_key}: must be a whole number >= 0 (got {_short(keep)})")
        if keep:  # ai-toolkit deletes nothing at 0
            self.put("save.max_step_files", keep, keep_key)
        # A LoRA is written as .safetensors whatever it says; it chooses a full model's folder layout.
        save.only(
            "save_format",
            lambda v: v in ("safetensors", "diffusers"),
            "is not one of ai-toolkit's (safetensors, diffusers)",
        )
        save.only("push_to_hub", lambda v: v is False, "has no leco equivalent; upload the file yourself")
        save.accept("hf_repo_id", "hf_private")
        save.finish()

    def read_logging(self, logging: _Section) -> None:
        self.put("logging.use_wandb", logging.get("use_wandb", False), logging.key("use_wandb"))
        self.put("logging.verbose", logging.get("verbose", False), logging.key("verbose"))
        if logging.has("project_name"):
            self.put("logging.wandb_project", logging.get("project_name"), logging.key("project_name"))
        logging.accept("log_every")  # leco logs every step
        logging.cosmetic(self.warnings, "use_ui_logger", lambda v: v is False)  # the UI's progress view
        logging.cosmetic(self.warnings, "run_name")
        logging.finish()

    def read_sample(self, sample: _Section) -> None:
        """ai-toolkit's sample images become leco's preview grids (prompts x strengths x seeds)."""
        if not sample.data or self.config.get("preview", {}).pop("disabled", False):
            sample.accept(*sample.data)
            self.config.pop("preview", None)
            return
        default_strength = self.number(sample, "network_multiplier", 1.0)
        items: list[Any] = [{"prompt": p} for p in self.string_list(sample, "prompts")]
        samples = sample.get("samples", [])
        if not isinstance(samples, list):
            raise ConfigError(f"{self.path}: {sample.key('samples')}: must be a list of {{prompt: ...}}")
        items += samples
        if not items:  # valid there (prompts default to []): no sample images, so no previews
            sample.accept(*sample.data)
            self.config.pop("preview", None)
            return
        prompts: list[str] = []
        strengths: list[float] = []
        for item in items:
            text, strength = self.sample_prompt(item, default_strength, sample.key("prompts"))
            prompts += [text] if text not in prompts else []
            strengths += [strength] if strength not in strengths else []
        where = sample.where
        self.put("preview.prompts", prompts, sample.key("prompts"))
        self.put("preview.strengths", sorted(strengths), f"{where} --m")
        self.put("preview.seeds", [sample.get("seed", 0)], sample.key("seed"))
        self.put("preview.steps", sample.get("sample_steps", 20), sample.key("sample_steps"))
        self.put("preview.guidance", sample.get("guidance_scale", 7), sample.key("guidance_scale"))
        self.put("preview.every", sample.get("sample_every", 100), sample.key("sample_every"))
        for key in ("walk_seed", "neg", "guidance_rescale", "sample_start_step"):
            sample.cosmetic(self.warnings, key, lambda v: not v)
        size = self.config["prompts"][0]["resolution"]  # leco previews at the first entry's size
        if size is None:  # the model's own: a size the sample names is not read
            side = {"height": None, "width": None}
        else:
            side = {"height": size if isinstance(size, int) else size[0]}
            side["width"] = size if isinstance(size, int) else size[1]
        for key in ("width", "height"):
            sample.cosmetic(self.warnings, key, lambda v, key=key: v == side[key])
        for key in ("sampler", "format", "ext", "refiner_start_at", "extra_values"):
            sample.cosmetic(self.warnings, key)
        sample.accept("num_frames", "fps", "adapter_conditioning_scale", "do_cfg_norm")
        sample.finish()

    def sample_prompt(self, item: Any, default: float, where: str) -> tuple[str, float]:
        """A sample prompt without its ` --flag value` parts; --m (--network_multiplier) is its strength."""
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ConfigError(f"{self.path}: {where}: each sample needs a prompt text (got {_short(item)})")
        text, *flags = item["prompt"].split("--")
        strength = item.get("network_multiplier", default)
        unread = [f"{where} {key}" for key in item if key not in ("prompt", "network_multiplier")]
        for flag in flags:
            name, _, value = flag.strip().partition(" ")
            if name in ("m", "network_multiplier"):
                strength = value.strip()
            else:
                unread.append(f"{where} --{name}")
        self.warnings += [note for note in unread if note not in self.warnings]
        try:
            return text.strip(), float(strength)
        except (TypeError, ValueError):
            raise ConfigError(f"{self.path}: {where}: --m {strength!r} is not a number") from None

    def read_slider(self, slider: _Section, steps: int) -> None:
        seed = self.config.get("train", {}).get("seed")
        rng = random.Random(seed if isinstance(seed, int) else 0)  # shuffles: fixed, reproducible
        targets = slider.get("targets", [])
        if isinstance(targets, dict):
            raise ConfigError(
                f"{self.path}: {slider.key('targets')}: is one target written as a mapping; make it a "
                "list: put '- ' before its first key (target_class: ...)"
            )
        misspelt = (
            [] if slider.has("targets") else difflib.get_close_matches("targets", map(str, slider.data), 1)
        )
        if misspelt:  # the misspelling is the news, not the missing list
            raise ConfigError(
                f"{self.path}: {slider.key(misspelt[0])}: leco has no equivalent for this key; did you mean "
                "'targets'?"
            )
        if not isinstance(targets, list) or not targets:
            raise ConfigError(f"{self.path}: {slider.key('targets')}: add at least one target (a list)")
        expanded = []
        for number, raw in enumerate(targets, start=1):
            target = slider.item(raw, f"{slider.key('targets')}[{number - 1}]")
            expanded += [(target.where, *pair) for pair in self.slider_target(target, rng)]
        if len(expanded) > steps:  # ai-toolkit trims targets (with permutations) to the step count
            shuffled = any(isinstance(raw, dict) and raw.get("shuffle") for raw in targets)
            counted = " (with shuffle, one per phrase order)" if shuffled else ""
            warn(
                f"{self.path}: {slider.key('targets')}: {len(expanded)} targets{counted} but train.steps "
                f"is {steps}; as ai-toolkit does, only the first {steps} are trained"
            )
            expanded = expanded[:steps]
        resolutions = self.resolutions(slider)
        self.check_prompt_file(slider)
        # ai-toolkit's default draws one target a step and averages its pairs (4 with both poles,
        # 2 with one), so every target gets as many steps; leco deals entries evenly, so a one-pole
        # target's two entries are listed twice.
        one_pole_repeats = 2 if slider.get("batch_full_slide", True) else 1
        entries = []  # batch_size: train.batch_size, the default of entries that name none
        for where, target_class, positive, negative, multiplier, weight in expanded:
            pairs = slider_pairs(positive, negative, multiplier)
            if len(pairs) == 2:
                pairs *= one_pole_repeats
            for resolution in resolutions:
                for pole, other, action, strength in pairs:
                    self.entry_origins.append(where)
                    entries.append(
                        {
                            "target": target_class,
                            "positive": pole,
                            "unconditional": other,
                            "neutral": "",  # ai-toolkit's loop predicts its neutral from ""
                            "action": action,
                            "guidance_scale": 1.0,
                            "resolution": resolution,
                            "multiplier": strength,
                            "weight": weight,
                        }
                    )
        self.config["prompts"] = entries
        self.origin["prompts"] = slider.key("targets")
        self.read_anchors(slider)
        slider.accept("batch_full_slide", "low_ram")
        for key in ("prompt_tensors", "use_adapter", "adapter_img_dir"):
            slider.only(key, lambda v: not v, "has no leco equivalent; remove it")
        slider.finish()

    def slider_target(self, target: _Section, rng: random.Random) -> list[tuple[str, str, str, float, float]]:
        """(target_class, positive, negative, multiplier, weight); `shuffle` adds phrase orders."""
        target_class, positive, negative = self.poles(target, "target_class", "positive", "negative")
        multiplier = self.number(target, "multiplier", 1.0)
        weight = self.number(target, "weight", 1.0)
        shuffle = target.get("shuffle", False)
        target.finish()
        if not shuffle:
            return [(target_class, positive, negative, multiplier, weight)]
        pairs = [(p, n) for p in _phrase_orders(positive, rng) for n in _phrase_orders(negative, rng)]
        rng.shuffle(pairs)
        return [(target_class, p, n, multiplier, weight) for p, n in pairs[:8]]

    def resolutions(self, slider: _Section) -> list[int | tuple[int, int]]:
        """[[height, width], ...]: TrainSliderProcess unpacks each as height, width."""
        value = slider.get("resolutions", [[512, 512]])
        if not isinstance(value, list) or not value or not all(_is_size(v) for v in value):
            raise ConfigError(
                f"{self.path}: {slider.key('resolutions')}: must be a list of [height, width] "
                f"(whole pixels, at most {MAX_SIDE}), e.g. [[512, 512]]"
            )
        return [int(h) if int(h) == int(w) else (int(h), int(w)) for h, w in value]

    def check_prompt_file(self, slider: _Section) -> None:
        """ai-toolkit's slider loop takes its neutral prediction from "" whatever `prompt_file` holds
        (its lines only multiply the list of prompt pairs, all alike); the file is still read, as
        ai-toolkit reads it, so a missing one is an error here too."""
        name = slider.get("prompt_file")
        if name is None:
            return
        key = slider.key("prompt_file")
        file = Path(str(name)).expanduser()
        # ai-toolkit opens it from the working directory; leco also looks next to the config file.
        tried = [file] if file.is_absolute() else [Path.cwd() / file, self.path.parent / file]
        found = next((option for option in tried if _is_file(option)), None)
        if found is None:
            where = " or ".join(str(option) for option in tried)
            raise ConfigError(f"{self.path}: {key}: {name!r} not found (looked at {where}); fix the path")
        refuse_non_text_prompts(found, f"{self.path}: {key}")
        try:
            text = found.read_text(encoding="utf-8-sig")  # a BOM is no part of the first prompt
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{self.path}: {key}: cannot read {found} ({type(error).__name__})") from None
        refuse_non_text_prompts(found, f"{self.path}: {key}", text)
        if not any(line.strip() for line in text.splitlines()):
            raise ConfigError(f"{self.path}: {key}: {found} holds no prompt; write one neutral prompt a line")
        warn(
            f"{self.path}: {key}: its lines change nothing in ai-toolkit's slider loop, whose neutral "
            'prediction is the empty prompt\'s; leco trains the same (neutral ""). For neutral prompts '
            "that count, use a kohya TOML prompts file (neutral_prompt_file)"
        )

    def read_concept_slider(self, slider: _Section, resolutions: list[int | None]) -> None:
        """ConceptSliderTrainer: the target class's prediction goes to neutral + g * (positive -
        negative) at +1 and to neutral + g * (negative - positive) at -1, neutral being the target
        class's own prediction; that is leco's enhance with the poles as positive and unconditional,
        the target rescaled to the neutral prediction's mean and spread (its `norm_like_tensor`).
        Its anchor class keeps its prediction at both strengths, at anchor_strength against the two
        (equal) losses of each end: leco's anchor weight anchor_strength / 2."""
        target_class, positive, negative = self.poles(
            slider, "target_class", "positive_prompt", "negative_prompt"
        )
        guidance = self.number(slider, "guidance_strength", 3.0)
        entries = [
            {
                "target": target_class,
                "positive": pole,
                "unconditional": other,
                "neutral": target_class,
                "action": "enhance",
                "guidance_scale": guidance,
                "resolution": resolution,
                "multiplier": strength,
                "rescale_target": True,
            }
            for resolution in resolutions
            for pole, other, strength in ((positive, negative, 1.0), (negative, positive, -1.0))
        ]
        self.config["prompts"] = entries
        self.entry_origins = [slider.where] * len(entries)
        self.origin["prompts"] = slider.where
        anchor_strength = self.number(slider, "anchor_strength", 1.0)
        slider.accept("anchor_class")  # null: no anchor, as ai-toolkit's default
        if slider.data.get("anchor_class") is not None:  # its UI writes "": the empty prompt, kept
            anchor = self.text(slider, "anchor_class")
            self.put("anchors.prompts", [anchor], slider.key("anchor_class"))
            self.put("anchors.weight", anchor_strength / 2, slider.key("anchor_strength"))
        slider.finish()

    def dataset_resolutions(self, process: _Section) -> list[int | None]:
        """The sizes its datasets train at (leco trains at each; the model's own size without
        datasets); their images are not read."""
        datasets = process.get("datasets", [])
        if not isinstance(datasets, list):
            raise ConfigError(f"{self.path}: {process.key('datasets')}: must be a list of datasets")
        sizes: list[int | None] = []
        for number, raw in enumerate(datasets):
            dataset = process.item(raw, f"{process.key('datasets')}[{number}]")
            value = dataset.get("resolution", 512)  # ai-toolkit's DatasetConfig default
            value = value if isinstance(value, list) else [value]
            if not value or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIDE for v in value
            ):
                raise ConfigError(
                    f"{self.path}: {dataset.key('resolution')}: must be whole pixels (or a list of them), "
                    f"at most {MAX_SIDE}"
                )
            sizes += [v for v in value if v not in sizes]
            dataset.accept(*dataset.data)  # the images and how they are captioned, cached, augmented
        if datasets:
            warn(
                f"{self.path}: {process.key('datasets')}: leco trains from the model's own images of the "
                "target class, not from image folders: only their resolutions are read"
            )
        return sizes or [None]

    def read_anchors(self, slider: _Section) -> None:
        """Anchors keep their prompt's prediction; ai-toolkit trained them at the pair's strength sign."""
        anchors = slider.get("anchors", [])
        if not isinstance(anchors, list):
            raise ConfigError(f"{self.path}: {slider.key('anchors')}: must be a list of {{prompt: ...}}")
        prompts = []
        for number, raw in enumerate(anchors):
            anchor = slider.item(raw, f"{slider.key('anchors')}[{number}]")
            prompts.append(str(anchor.get("prompt", "")))
            multiplier = anchor.get("multiplier", 1.0)
            anchor.accept("multiplier")
            if multiplier != 1:
                warn(
                    f"{self.path}: {anchor.key('multiplier')}: {_short(multiplier)} is not used: leco "
                    "keeps an anchor at the strength its step trains (+1 or -1)"
                )
            anchor.accept("neg_prompt")  # the unconditional half of a guidance-1 prediction: no effect
            anchor.finish()
        if prompts:
            self.put("anchors.prompts", prompts, slider.key("anchors"))
            warn(
                f"{self.path}: {slider.key('anchors')}: ai-toolkit's slider loop builds these anchors but "
                "never trains them; leco does (their prompts stay as the model draws them), so the "
                "LoRA differs from ai-toolkit's: remove the list to train what ai-toolkit trains"
            )

    # -- helpers ----------------------------------------------------------------------------------

    def put(self, dotted: str, value: Any, origin: str) -> None:
        section, _, key = dotted.partition(".")
        if key:
            self.config.setdefault(section, {})[key] = value
        else:
            self.config[section] = value
        self.origin[dotted] = origin

    def number(self, section: _Section, name: str, default: float) -> float:
        value = section.get(name, default)
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.path}: {section.key(name)}: must be a number (got {_short(value)})")
        return float(value)

    def poles(self, section: _Section, target: str, positive: str, negative: str) -> tuple[str, str, str]:
        """A slider's target class and its two ends (texts); at least one end must be named."""
        texts = tuple(self.text(section, key) for key in (target, positive, negative))
        if not texts[1].strip() and not texts[2].strip():
            raise ConfigError(
                f"{self.path}: {section.where}: needs {positive} or {negative} (its two ends); set one"
            )
        why = same_poles(texts[1], texts[2], (positive, negative))
        if why:
            raise ConfigError(f"{self.path}: {section.where}: {why}")
        return texts

    def text(self, section: _Section, name: str) -> str:
        """A prompt text ("" when unset); ai-toolkit strips it, so anything else fails there too."""
        value = section.get(name, "")
        if not isinstance(value, str):
            raise ConfigError(
                f"{self.path}: {section.key(name)}: must be one prompt text (got {_short(value)})"
            )
        return value

    def integer(self, section: _Section, name: str, default: int) -> int:
        value = section.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"{self.path}: {section.key(name)}: must be a whole number >= 1 (got {_short(value)})"
            )
        return value

    def string_list(self, section: _Section, name: str) -> list[str]:
        value = section.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.path}: {section.key(name)}: must be a list of prompt texts")
        return value

    def validate(self) -> LecoConfig:
        try:
            config = LecoConfig.model_validate(self.config)
        except ValidationError as error:
            item = error.errors()[0]
            loc = [str(part) for part in item["loc"]]
            ours = dotted_key(item["loc"])
            origin = self.origin.get(".".join(loc[:2])) or self.origin.get(loc[0]) if loc else None
            if loc[:1] == ["prompts"] and len(loc) > 2 and int(loc[1]) < len(self.entry_origins):
                origin = f"{self.entry_origins[int(loc[1])]}.{'.'.join(loc[2:])}"  # the target it came from
            where = f"{origin} (leco: {ours})" if origin else ours
            message = item["msg"].replace("Value error, ", "")
            raise ConfigError(f"{self.path}: {where}: {message} (got {_short(item.get('input'))})") from None
        for entry, origin in zip(config.prompts, self.entry_origins, strict=True):
            entry.written_at(f"{self.path.name}: {origin}")  # named so in problems found later too
        try:
            config.check_combination()
        except ConfigError as error:
            message = str(error).removeprefix(f"{self.path.name}: ")  # an entry's: the full path instead
            raise ConfigError(f"{self.path}: {with_origin(message, self.origin)}") from None
        return config


def _phrase_orders(text: str, rng: random.Random) -> list[str]:
    """ai-toolkit's shuffle: the comma-separated phrases in up to 8 orders, from a random start."""
    phrases = [p.strip() for p in text.split(",") if p.strip()]
    rng.shuffle(phrases)
    return [", ".join(order) for order in itertools.islice(itertools.permutations(phrases), 8)]


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # e.g. a NUL byte or an over-long name
        return False


def _is_size(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SIDE for v in value)
    )


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _alpha_or_rank(alpha: Any, rank: Any) -> Any:
    """ai-toolkit's LoRAModule reads an alpha of null or 0 as the rank (a scale of 1)."""
    return rank if alpha is None or alpha == 0 else alpha
