"""kohya sd-scripts' train_leco.py / sdxl_train_leco.py arguments file (`--config_file args.toml`).

The TOML holds the script's command-line options by their argparse names, flat or in tables (kohya
flattens one level of tables). `leco train args.toml` runs it: each option with a leco equivalent is
mapped, at kohya's default where the file leaves it out (kohya's defaults differ from leco's: lr
2e-6, 1600 steps, gradient clipping at 1.0, fp32 math, DDPM rollouts); options that change only
speed, memory or logs, and those train_leco itself never reads, are passed over; options it reads
that leco lacks are accepted at the values where they do nothing and refused at any other, in one
line naming the option. The prompt file it names is read as every kohya prompt TOML is.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from typing import Any

from leco.config import (
    LR_SCHEDULERS,
    ConfigError,
    LecoConfig,
    config_from_document,
    given_prompts_file,
    parse_optimizer_args,
    with_nearest,
)
from leco.errors import first_line, warn
from leco.formats.origins import remember, with_origin

# kohya's defaults (train_util / train_leco argparse) for options leco maps.
KOHYA_DEFAULTS = {
    "max_train_steps": 1600,
    "learning_rate": 2e-6,
    "network_dim": 4,
    "network_alpha": 1.0,
    "max_denoising_steps": 40,
    "leco_denoise_guidance_scale": 3.0,
    "max_grad_norm": 1.0,
    "mixed_precision": "no",
    "lr_scheduler": "constant",
    "lr_scheduler_num_cycles": 1,
    "lr_scheduler_power": 1.0,
}
_PRECISIONS = {"no": "fp32", "float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
# kohya's optimizer_type -> leco's optimizer and the arguments kohya gives it (names in any case).
_OPTIMIZERS = {
    "AdamW": ("adamw", {}),
    "AdamW8bit": ("adamw8bit", {}),
    "Lion": ("lion", {}),
    "Lion8bit": ("lion8bit", {}),
    "Prodigy": ("prodigy", {}),
    "DAdaptAdam": ("dadaptadam", {}),
    "DAdaptLion": ("dadaptlion", {}),
    "SGDNesterov": ("sgd", {"momentum": 0.9, "nesterov": True}),
}
_OPTIMIZERS_BY_LOWER = {name.lower(): settings for name, settings in _OPTIMIZERS.items()}
# Options that change only speed, memory, logs or metadata.
_PASSED_OVER = {
    "sdpa", "mem_eff_attn", "lowram", "highvram", "vae", "vae_batch_size", "no_half_vae", "cache_latents",
    "cache_latents_to_disk", "deepspeed", "max_data_loader_n_workers", "persistent_data_loader_workers",
    "tokenizer_cache_dir", "training_comment", "no_metadata", "output_config", "config_file",
    "console_log_level", "console_log_file", "console_log_simple", "network_train_unet_only", "full_fp16",
    "full_bf16", "fp8_base", "wandb_run_name", "wandb_api_key", "log_prefix", "log_tracker_config",
    "ddp_timeout", "ddp_gradient_as_bucket_view", "ddp_static_graph", "dynamo_backend", "torch_compile",
    "save_state", "save_state_on_train_end", "train_batch_size", "log_config", "cache_text_encoder_outputs",
    "cache_text_encoder_outputs_to_disk", "text_encoder_batch_size", "disable_mmap_load_safetensors",
    "blocks_to_swap", "fused_backward_pass", "async_upload",
}  # fmt: skip
# Options of kohya's shared parser that train_leco never reads (its loop has its own loss, timesteps,
# saving and no samples): ignored there, so here too; said when set to something.
_NOT_READ_BY_TRAIN_LECO = {
    "loss_type": "l2", "huber_schedule": "snr", "huber_c": 0.1, "huber_scale": 1.0, "min_timestep": 0,
    "max_timestep": 1000, "max_train_epochs": 0, "save_every_n_epochs": 0, "save_n_epoch_ratio": 0,
    "save_last_n_epochs": 0, "save_last_n_epochs_state": 0, "save_last_n_steps": 0,
    "save_last_n_steps_state": 0, "sample_every_n_steps": 0, "sample_every_n_epochs": 0,
    "sample_at_first": False, "sample_prompts": "", "sample_sampler": "ddim", "resume": "",
    "scale_weight_norms": 0, "ip_noise_gamma": 0, "ip_noise_gamma_random_strength": False,
    "multires_noise_iterations": 0, "multires_noise_discount": 0.3, "noise_offset_random_strength": False,
    "adaptive_noise_scale": 0, "debiased_estimation_loss": False, "scale_v_pred_loss_like_noise_pred": False,
    "v_pred_like_loss": 0, "masked_loss": False, "weighting_scheme": "uniform", "logit_mean": 0.0,
    "logit_std": 1.0, "mode_scale": 1.29, "conditioning_data_dir": "", "prior_loss_weight": 1.0,
}  # fmt: skip
_NO_EQUIVALENT = "has no leco equivalent; remove it"
# Options train_leco reads that leco lacks: the values at which they do nothing, and what to say.
_REFUSED_UNLESS = {
    "noise_offset": ((0,), _NO_EQUIVALENT),
    "zero_terminal_snr": ((False,), _NO_EQUIVALENT),
    "network_dropout": ((0,), _NO_EQUIVALENT),
    "dim_from_weights": ((False,), _NO_EQUIVALENT),
    "lr_scheduler_type": (("",), _NO_EQUIVALENT + " (use one of lr_scheduler's names)"),
    "lr_decay_steps": ((0,), _NO_EQUIVALENT),
    "lr_scheduler_timescale": ((0,), _NO_EQUIVALENT),
    "lr_scheduler_min_lr_ratio": ((0,), _NO_EQUIVALENT),
    "max_token_length": ((75,), "has no leco equivalent (leco reads the model's 75 tokens); remove it"),
    "huggingface_repo_id": (("",), "has no leco equivalent (leco uploads nothing); remove it"),
    "save_state_to_huggingface": ((False,), "has no leco equivalent (leco uploads nothing); remove it"),
    "resume_from_huggingface": ((False,), "has no leco equivalent; continue a leco run with --resume"),
    "network_weights": (("",), "has no leco equivalent (a leco LoRA starts at zero); continue a leco "
                        "run with --resume, or remove it"),
    "network_train_text_encoder_only": ((False,), "is refused by train_leco too (LECO trains the UNet); "
                                        "a leco config trains the text encoder with network.training_method: "
                                        "text-encoder"),
    "gradient_accumulation_steps": ((1,), "has no leco equivalent; raise train.samples_per_step in a "
                                    "leco config instead, or remove it"),
}  # fmt: skip


def load_kohya_arguments(
    path: Path, arguments: dict[str, Any], prompts_file: str | None = None
) -> LecoConfig:
    """The leco config a kohya train_leco arguments TOML stands for (`arguments`: its options, flat;
    `prompts_file`: the one given on the command line, as kohya takes it, over the file's)."""
    options = _Options(path, arguments)
    options.refuse_what_leco_lacks()
    document = {
        "prompts_file": options.prompts_file(prompts_file),
        "pretrained_model": options.model(),
        "network": options.network(),
        "train": options.train(),
        "save": options.save(),
        "logging": options.logging(),
        "other": {"use_xformers": options.get("xformers", "other.use_xformers") is True},
    }
    options.finish()
    remember(path, options.origin)
    try:
        return config_from_document(document, path)
    except ConfigError as error:  # the first problem, told with the option it came from
        raise ConfigError(options.in_kohya_keys(first_line(error, None))) from None


class _Options:
    def __init__(self, path: Path, arguments: dict[str, Any]) -> None:
        self.path, self.arguments = path, arguments
        self.read: set[str] = set(_PASSED_OVER) | set(_NOT_READ_BY_TRAIN_LECO) | set(_REFUSED_UNLESS)
        self.origin: dict[str, str] = {}  # leco key -> the kohya option it came from, where given

    def get(self, name: str, leco_key: str | None = None) -> Any:
        """An option's value, kohya's default where the file leaves it out."""
        self.read.add(name)
        value = self.arguments.get(name)
        if leco_key and value is not None:
            self.origin[leco_key] = name
        return KOHYA_DEFAULTS.get(name) if value is None else value

    def items(self, name: str, leco_key: str) -> str:
        """A list option of `key=value` strings (one string: one item), as one text."""
        value = self.get(name, leco_key) or []
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ConfigError(f'{self.path}: {name}: give a list of "key=value" strings (got {value!r})')
        return " ".join(items)

    def parsed(self, name: str, leco_key: str) -> dict[str, Any]:
        """kohya's `key=value` items, values as Python literals."""
        text = self.items(name, leco_key)
        try:
            return parse_optimizer_args(text) if text else {}
        except ValueError as error:
            raise ConfigError(f"{self.path}: {name}: {error}") from None

    def refuse_what_leco_lacks(self) -> None:
        for name, (inert, why) in _REFUSED_UNLESS.items():
            value = self.arguments.get(name)
            if value is not None and value not in inert:
                raise ConfigError(f"{self.path}: {name}: {value!r} {why}")

    def prompts_file(self, from_command_line: str | None) -> str:
        named = self.get("prompts_file", "prompts_file")
        if from_command_line is not None:
            return given_prompts_file(from_command_line)
        if not isinstance(named, str) or not named.strip():
            raise ConfigError(
                f"{self.path}: prompts_file: required (train_leco's prompt TOML); kohya takes it on its "
                "command line: leco train ARGS.toml --prompts_file PROMPTS.toml (or add it to the file)"
            )
        # kohya opens it from the working directory, as the command line gave it; beside the TOML
        # where it is not there (a run started from another folder)
        from_cwd = Path.cwd() / Path(named).expanduser()
        beside = self.path.parent / Path(named).expanduser()
        return str(beside if not from_cwd.exists() and beside.exists() else from_cwd)

    def model(self) -> dict[str, Any]:
        name = self.get("pretrained_model_name_or_path", "pretrained_model.name_or_path")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{self.path}: pretrained_model_name_or_path: required; add it")
        model: dict[str, Any] = {"name_or_path": name}
        for kohya_key, leco_key in (
            ("v2", "v2"),
            ("v_parameterization", "v_pred"),
            ("clip_skip", "clip_skip"),
        ):
            if self.arguments.get(kohya_key) is not None:
                model[leco_key] = self.get(kohya_key, f"pretrained_model.{leco_key}")
        return model

    def network(self) -> dict[str, Any]:
        module = self.get("network_module")
        if module not in (None, "networks.lora"):
            raise ConfigError(
                f"{self.path}: network_module: {module!r}: leco trains kohya's LoRA (networks.lora) only"
            )
        network = {
            "rank": self.get("network_dim", "network.rank"),
            "alpha": self.get("network_alpha", "network.alpha"),
        }
        settings = self.parsed("network_args", "network.type")
        unknown = sorted(set(settings) - {"conv_dim", "conv_alpha"})
        if unknown:
            raise ConfigError(
                f"{self.path}: network_args: {unknown[0]}: leco reads conv_dim and conv_alpha here; remove it"
            )
        if "conv_dim" in settings:  # kohya: the 3x3 convolutions too, at conv_alpha (1 unless given)
            network |= {"type": "c3lier", "conv_rank": settings["conv_dim"]}
            network["conv_alpha"] = settings.get("conv_alpha", 1.0)
            self.origin |= {"network.conv_rank": "network_args", "network.conv_alpha": "network_args"}
        return network  # conv_alpha alone trains no convolution in kohya either

    def train(self) -> dict[str, Any]:
        steps = self.get("max_train_steps", "train.iterations")
        train: dict[str, Any] = {
            "iterations": steps,
            "max_denoising_steps": self.get("max_denoising_steps", "train.max_denoising_steps"),
            "rollout_guidance_scale": self.get("leco_denoise_guidance_scale", "train.rollout_guidance_scale"),
            "noise_scheduler": "ddpm",  # train_leco's rollouts step a DDPMScheduler
            "gradient_checkpointing": self.get("gradient_checkpointing") is True,
        }
        learning_rate = self.get("learning_rate", "train.lr")
        unet_lr = self.get("unet_lr", "train.lr")  # kohya trains the UNet at unet_lr when set
        train["lr"] = learning_rate if unet_lr is None else unet_lr
        clip = self.get("max_grad_norm", "train.max_grad_norm")
        train["max_grad_norm"] = None if clip == 0 else clip  # kohya: 0 turns clipping off
        precision = str(self.get("mixed_precision", "train.precision")).lower()
        if precision not in _PRECISIONS:  # said in kohya's values, not leco's
            raise ConfigError(
                f"{self.path}: mixed_precision: {precision!r} is not one leco trains in; "
                "use 'no' (full precision), 'fp16' or 'bf16'"
            )
        train["precision"] = _PRECISIONS[precision]
        if self.arguments.get("seed") is not None:
            train["seed"] = self.get("seed", "train.seed")
        gamma = self.get("min_snr_gamma", "train.min_snr_gamma")
        train["min_snr_gamma"] = gamma or None  # kohya: 0 (or unset) weighs nothing
        return train | self.optimizer() | self.schedule(steps)

    def optimizer(self) -> dict[str, Any]:
        name = str(self.get("optimizer_type", "train.optimizer") or "")
        flags = [flag for flag in ("use_8bit_adam", "use_lion_optimizer") if self.get(flag) is True]
        if len(flags) > 1 or (flags and name):  # kohya asserts the same
            given = [*flags, *(["optimizer_type"] if name else [])]
            raise ConfigError(f"{self.path}: {', '.join(given)}: give one of them (kohya refuses both too)")
        name = {"use_8bit_adam": "AdamW8bit", "use_lion_optimizer": "Lion"}.get(flags[0]) if flags else name
        name = name or "AdamW"  # kohya's default
        if name.lower() in ("dadaptation", "dadaptadampreprint"):
            raise ConfigError(
                f"{self.path}: optimizer_type: {name!r} is D-Adaptation's AdamPreprint in kohya, which leco "
                "lacks; the nearest is DAdaptAdam"
            )
        if name.lower() not in _OPTIMIZERS_BY_LOWER:
            known = ", ".join(_OPTIMIZERS)
            raise ConfigError(
                f"{self.path}: optimizer_type: {name!r} has no leco equivalent; use one of {known}"
            )
        optimizer, implied = _OPTIMIZERS_BY_LOWER[name.lower()]
        return {
            "optimizer": optimizer,
            "optimizer_args": implied | self.parsed("optimizer_args", "train.optimizer_args"),
        }

    def schedule(self, steps: Any) -> dict[str, Any]:
        name = str(self.get("lr_scheduler", "train.lr_scheduler")).lower()
        if name not in LR_SCHEDULERS:
            raise ConfigError(
                f"{self.path}: lr_scheduler: {name!r} has no leco equivalent; use one of "
                + ", ".join(LR_SCHEDULERS)
            )
        arguments: dict[str, Any] = {}
        if name == "cosine_with_restarts":
            arguments["num_cycles"] = self.get("lr_scheduler_num_cycles", "train.lr_scheduler_args")
        if name == "polynomial":
            arguments["power"] = self.get("lr_scheduler_power", "train.lr_scheduler_args")
        self.read.update(("lr_scheduler_num_cycles", "lr_scheduler_power"))
        arguments |= self.parsed("lr_scheduler_args", "train.lr_scheduler_args")
        schedule: dict[str, Any] = {"lr_scheduler": name, "lr_scheduler_args": arguments}
        warmup = given = self.get("lr_warmup_steps", "train.lr_warmup_steps")
        whole_steps = isinstance(steps, (int, float)) and float(steps).is_integer()  # 1600.0 too
        if isinstance(warmup, float) and warmup >= 0 and whole_steps:
            warmup = int(warmup * steps)  # kohya (get_scheduler_fix): a float is a share of the steps
        if name == "constant" and warmup:  # kohya (get_scheduler_fix) refuses it rather than ignore it
            raise ConfigError(
                f"{self.path}: lr_warmup_steps: {given!r} with lr_scheduler constant, "
                "which kohya refuses: the constant schedule has no warmup; use constant_with_warmup, or "
                "set it to 0"
            )
        if warmup is not None:
            schedule["lr_warmup_steps"] = warmup
        return schedule

    def save(self) -> dict[str, Any]:
        folder = self.get("output_dir", "save.path")
        if not isinstance(folder, str) or not folder.strip():
            raise ConfigError(
                f"{self.path}: output_dir: required (train_leco refuses to run without it); add it"
            )
        # leco names its files NAME_last / NAME_Nsteps: without output_name, the arguments file's name
        name = self.get("output_name", "save.name") or self.path.stem
        save: dict[str, Any] = {"path": str(Path.cwd() / Path(folder).expanduser()), "name": name}
        every = self.get("save_every_n_steps", "save.per_steps")
        save["per_steps"] = every or self.get("max_train_steps")  # kohya: none between when unset
        if self.arguments.get("save_precision") is not None:
            save["precision"] = self.get("save_precision", "save.precision")
        if self.get("save_model_as") not in (None, "safetensors"):
            raise ConfigError(
                f"{self.path}: save_model_as: leco writes .safetensors only; set it to safetensors"
            )
        return save

    def logging(self) -> dict[str, Any]:
        trackers = str(self.get("log_with") or "").lower()
        folder = self.get("logging_dir", "logging.tensorboard_dir")
        logging: dict[str, Any] = {}
        asked_by = "log_with" if trackers else "logging_dir"
        if trackers in ("wandb", "all") and self._installed("wandb", "log_with"):
            logging["use_wandb"] = True
        # kohya: a folder alone asks for TensorBoard
        wants_tensorboard = trackers in ("tensorboard", "all") or (not trackers and folder)
        if wants_tensorboard and self._installed("tensorboard", asked_by):
            logging["use_tensorboard"] = True
            if folder:
                logging["tensorboard_dir"] = folder
        project = self.get("log_tracker_name", "logging.wandb_project")
        if project:
            logging["wandb_project"] = project
        return logging

    def _installed(self, tracker: str, key: str) -> bool:
        """Whether a logger the file asks for can run. kohya's accelerate skips a missing one and
        trains unlogged, and so does leco, saying so (GUI-written files always hold logging_dir)."""
        if importlib.util.find_spec(tracker) is not None:
            return True
        warn(f"{self.path}: {key}: {tracker} is not installed, so no logs are written; pip install {tracker}")
        return False

    def finish(self) -> None:
        unknown = [name for name in self.arguments if name not in self.read]
        # Options of kohya's other scripts (a GUI's file holds train_network's dataset and bucket
        # settings) train_leco skips: said, and skipped too. Any other name is a typo, which kohya
        # would skip without a word: refused, every one at once.
        others = [name for name in unknown if name in _kohya_script_options()]
        typos = [name for name in unknown if name not in others]
        if typos:
            fixes = ", ".join(with_nearest(name, sorted(self.read)) for name in typos)
            many = len(typos) > 1
            raise ConfigError(
                f"{self.path}: {fixes}: {'not options' if many else 'not an option'} of any kohya script "
                f"(kohya would skip {'them' if many else 'it'} without a word); fix or remove "
                f"{'them' if many else 'it'}"
            )
        if others:
            what = f"{len(others)} options" if len(others) > 1 else "an option"
            warn(
                f"{self.path}: {what} of kohya's other scripts, which train_leco skips too; "
                f"ignored: {', '.join(others)}"
            )
        ignored = [
            name
            for name, default in _NOT_READ_BY_TRAIN_LECO.items()
            if self.arguments.get(name) not in (None, default)
        ]
        if ignored:
            warn(f"{self.path}: {', '.join(ignored)}: not read by train_leco either; ignored")

    def in_kohya_keys(self, message: str) -> str:
        """A message about a leco key set from an option, told with the option's name."""
        opening = f"{self.path}: "
        if not message.startswith(opening):
            return message
        return opening + with_origin(message[len(opening) :], self.origin)


@cache
def _kohya_script_options() -> frozenset[str]:
    text = (Path(__file__).parents[1] / "data" / "kohya_script_options.txt").read_text(encoding="utf-8")
    return frozenset(line for line in text.splitlines() if line and not line.startswith("#"))
