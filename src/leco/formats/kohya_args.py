"""kohya sd-scripts' train_leco.py / sdxl_train_leco.py arguments file (`--config_file args.toml`).

The TOML holds the script's command-line options by their argparse names, flat or in tables (kohya
flattens one level of tables and reads every key as an option). `leco train args.toml` runs it: each
option with a leco equivalent is mapped, at kohya's default where the file leaves it out (kohya's
defaults differ from leco's: lr 2e-6, 1600 steps, gradient clipping at 1.0, fp32 math); options that
only change speed, memory or logs are passed over; the rest is one line naming the key. The prompt
file it names (`prompts_file`) is read as `leco train` reads every kohya prompt TOML.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from leco.config import LR_SCHEDULERS, ConfigError, LecoConfig, config_from_document, parse_optimizer_args

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
    "output_name": "last",
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
    "DAdaptation": ("dadaptadam", {}),
    "DAdaptAdam": ("dadaptadam", {}),
    "DAdaptLion": ("dadaptlion", {}),
    "SGDNesterov": ("sgd", {"momentum": 0.9, "nesterov": True}),
}
_OPTIMIZERS_BY_LOWER = {name.lower(): settings for name, settings in _OPTIMIZERS.items()}
# Options that change speed, memory, logs or metadata only, or that every run of these scripts has.
_PASSED_OVER = {
    "sdpa", "mem_eff_attn", "lowram", "highvram", "vae", "vae_batch_size", "no_half_vae", "cache_latents",
    "cache_latents_to_disk", "deepspeed", "max_data_loader_n_workers", "persistent_data_loader_workers",
    "tokenizer_cache_dir", "max_token_length", "training_comment", "no_metadata", "output_config",
    "config_file", "console_log_level", "console_log_file", "console_log_simple", "save_model_as",
    "network_train_unet_only", "sdxl", "full_fp16", "full_bf16", "fp8_base", "lr_warmup_steps_ratio",
    "wandb_run_name", "wandb_api_key", "log_prefix", "log_tracker_config", "ddp_timeout",
    "ddp_gradient_as_bucket_view", "ddp_static_graph", "dynamo_backend", "torch_compile",
    "save_state", "save_state_on_train_end", "train_batch_size", "sample_sampler", "log_config",
    "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "text_encoder_batch_size",
    "disable_mmap_load_safetensors", "blocks_to_swap", "fused_backward_pass", "prior_loss_weight",
    "async_upload",
}  # fmt: skip
# Options leco has no equivalent for, with the values at which they do nothing (kohya's defaults, as
# GUIs write them into every file): any other value is refused, naming the option.
_INERT_ONLY_AT = {
    "noise_offset": (0,), "noise_offset_random_strength": (False,), "multires_noise_iterations": (0,),
    "multires_noise_discount": (0.3,), "ip_noise_gamma": (0,), "ip_noise_gamma_random_strength": (False,),
    "adaptive_noise_scale": (0,), "zero_terminal_snr": (False,), "min_timestep": (0,),
    "max_timestep": (1000,), "loss_type": ("l2",), "huber_schedule": ("snr",), "huber_c": (0.1,),
    "huber_scale": (1.0,), "scale_v_pred_loss_like_noise_pred": (False,), "v_pred_like_loss": (0,),
    "debiased_estimation_loss": (False,), "masked_loss": (False,), "weighting_scheme": ("uniform",),
    "sample_every_n_steps": (0,), "sample_every_n_epochs": (0,), "sample_at_first": (False,),
    "sample_prompts": ("",), "max_train_epochs": (0,), "save_every_n_epochs": (0,),
    "save_n_epoch_ratio": (0,), "save_last_n_epochs": (0,), "save_last_n_epochs_state": (0,),
    "save_last_n_steps": (0,), "save_last_n_steps_state": (0,), "resume": ("",),
    "lr_scheduler_type": ("",), "lr_decay_steps": (0,), "lr_scheduler_timescale": (0,),
    "lr_scheduler_min_lr_ratio": (0,), "network_dropout": (0,), "scale_weight_norms": (0,),
    "dim_from_weights": (False,), "conditioning_data_dir": ("",), "huggingface_repo_id": ("",),
    "save_state_to_huggingface": (False,), "resume_from_huggingface": (False,),
}  # fmt: skip


def load_kohya_arguments(path: Path, arguments: dict[str, Any]) -> LecoConfig:
    """The leco config a kohya train_leco arguments TOML stands for (`arguments`: its options, flat)."""
    options = _Options(path, arguments)
    document = {
        "prompts_file": options.prompts_file(),
        "pretrained_model": options.model(),
        "network": options.network(),
        "train": options.train(),
        "save": options.save(),
        "logging": options.logging(),
        "other": {"use_xformers": bool(options.get("xformers", "other.use_xformers"))},
    }
    options.finish()
    try:
        return config_from_document(document, path)
    except ConfigError as error:
        raise ConfigError(options.in_kohya_keys(str(error))) from None


class _Options:
    def __init__(self, path: Path, arguments: dict[str, Any]) -> None:
        self.path, self.arguments = path, arguments
        self.read: set[str] = set(_PASSED_OVER)
        self.origin: dict[str, str] = {}  # leco key -> the kohya option it came from

    def get(self, name: str, leco_key: str | None = None) -> Any:
        self.read.add(name)
        if leco_key:
            self.origin[leco_key] = name
        value = self.arguments.get(name)
        return KOHYA_DEFAULTS.get(name) if value is None else value

    def refuse_unless(self, name: str, inert: bool, why: str) -> None:
        self.read.add(name)
        if name in self.arguments and not inert:
            raise ConfigError(f"{self.path}: {name}: {self.arguments[name]!r} {why}")

    def prompts_file(self) -> str:
        named = self.get("prompts_file", "prompts_file")
        if not isinstance(named, str) or not named.strip():
            raise ConfigError(f"{self.path}: prompts_file: required (train_leco's prompt TOML); add it")
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
        items = self.get("network_args") or []
        for item in [items] if isinstance(items, str) else items:  # one string: one key=value
            key, _, value = str(item).partition("=")
            key = key.strip()
            if key in ("conv_dim", "conv_alpha"):
                network["type"] = "c3lier"
                leco_key = "conv_rank" if key == "conv_dim" else "conv_alpha"
                network[leco_key] = value.strip()
                self.origin[f"network.{leco_key}"] = f"network_args {key}"
            else:
                raise ConfigError(
                    f"{self.path}: network_args: {item!r}: leco reads conv_dim and conv_alpha here; remove it"
                )
        self.refuse_unless(
            "network_weights",
            not self.arguments.get("network_weights"),
            "has no leco equivalent (a leco LoRA starts at zero; --resume continues a leco run); remove it",
        )
        self.refuse_unless(
            "network_train_text_encoder_only",
            not self.arguments.get("network_train_text_encoder_only"),
            "is refused by train_leco too (LECO trains the UNet); remove it",
        )
        return network

    def train(self) -> dict[str, Any]:
        train: dict[str, Any] = {
            "iterations": self.get("max_train_steps", "train.iterations"),
            "max_denoising_steps": self.get("max_denoising_steps", "train.max_denoising_steps"),
            "rollout_guidance_scale": self.get("leco_denoise_guidance_scale", "train.rollout_guidance_scale"),
            "gradient_checkpointing": bool(self.get("gradient_checkpointing")),
        }
        lr = self.get("learning_rate", "train.lr")
        unet_lr = self.get("unet_lr")
        train["lr"] = lr if unet_lr is None else unet_lr  # kohya trains the UNet at unet_lr when set
        if unet_lr is not None:
            self.origin["train.lr"] = "unet_lr"
        clip = self.get("max_grad_norm", "train.max_grad_norm")
        train["max_grad_norm"] = None if clip == 0 else clip  # kohya: 0 turns clipping off
        precision = str(self.get("mixed_precision", "train.precision")).lower()
        train["precision"] = _PRECISIONS.get(precision, precision)
        for name, leco_key in (("seed", "seed"), ("min_snr_gamma", "min_snr_gamma")):
            if self.arguments.get(name) is not None:
                train[leco_key] = self.get(name, f"train.{leco_key}")
        train.update(self.optimizer())
        train.update(self.schedule())
        self.refuse_unless(
            "gradient_accumulation_steps",
            self.arguments.get("gradient_accumulation_steps") in (None, 1),
            "has no leco equivalent; raise train.samples_per_step in a leco config instead, or remove it",
        )
        return train

    def optimizer(self) -> dict[str, Any]:
        name = str(self.get("optimizer_type", "train.optimizer") or "")
        if self.arguments.get("use_8bit_adam"):
            name = "AdamW8bit"
        elif self.arguments.get("use_lion_optimizer"):
            name = "Lion"
        self.read.update(("use_8bit_adam", "use_lion_optimizer"))
        name = name or "AdamW"  # kohya's default
        if name.lower() not in _OPTIMIZERS_BY_LOWER:
            known = ", ".join(_OPTIMIZERS)
            raise ConfigError(
                f"{self.path}: optimizer_type: {name!r} has no leco equivalent; use one of {known}"
            )
        optimizer, implied = _OPTIMIZERS_BY_LOWER[name.lower()]
        arguments = self.get("optimizer_args", "train.optimizer_args") or []
        if isinstance(arguments, str):
            arguments = [arguments]
        given = " ".join(str(item) for item in arguments)  # kohya's key=value items
        return {
            "optimizer": optimizer,
            "optimizer_args": {**implied, **self.parsed(given)} if given else implied,
        }

    def parsed(self, text: str, name: str = "optimizer_args") -> dict[str, Any]:
        """kohya's `key=value` items, values as Python literals."""
        try:
            return parse_optimizer_args(text)
        except ValueError as error:
            raise ConfigError(f"{self.path}: {name}: {error}") from None

    def schedule(self) -> dict[str, Any]:
        name = str(self.get("lr_scheduler", "train.lr_scheduler")).lower()
        if name not in LR_SCHEDULERS:
            raise ConfigError(
                f"{self.path}: lr_scheduler: {name!r} has no leco equivalent; use one of "
                + ", ".join(LR_SCHEDULERS)
            )
        schedule: dict[str, Any] = {"lr_scheduler": name, "lr_scheduler_args": {}}
        if name == "cosine_with_restarts":
            schedule["lr_scheduler_args"]["num_cycles"] = self.get("lr_scheduler_num_cycles")
        if name == "polynomial":
            schedule["lr_scheduler_args"]["power"] = self.get("lr_scheduler_power")
        self.read.update(("lr_scheduler_num_cycles", "lr_scheduler_power"))
        if self.arguments.get("lr_warmup_steps") is not None:
            schedule["lr_warmup_steps"] = self.get("lr_warmup_steps", "train.lr_warmup_steps")
        given = self.get("lr_scheduler_args", "train.lr_scheduler_args") or []
        text = " ".join(str(item) for item in ([given] if isinstance(given, str) else given))
        schedule["lr_scheduler_args"].update(self.parsed(text, "lr_scheduler_args") if text else {})
        return schedule

    def save(self) -> dict[str, Any]:
        folder = self.get("output_dir", "save.path")
        if not isinstance(folder, str) or not folder.strip():
            raise ConfigError(
                f"{self.path}: output_dir: required (train_leco refuses to run without it); add it"
            )
        save: dict[str, Any] = {
            "path": str(Path.cwd() / Path(folder).expanduser()),
            "name": self.get("output_name", "save.name"),
        }
        every = self.get("save_every_n_steps", "save.per_steps")
        save["per_steps"] = every if every else self.get("max_train_steps")  # kohya: none between
        if self.arguments.get("save_precision") is not None:
            save["precision"] = self.get("save_precision", "save.precision")
        if self.arguments.get("save_model_as") not in (None, "safetensors"):
            raise ConfigError(
                f"{self.path}: save_model_as: leco writes .safetensors only; set it to safetensors"
            )
        return save

    def logging(self) -> dict[str, Any]:
        trackers = str(self.get("log_with") or "").lower()
        logging: dict[str, Any] = {}
        if trackers in ("wandb", "all"):
            logging["use_wandb"] = True
        if trackers in ("tensorboard", "all") or (not trackers and self.arguments.get("logging_dir")):
            logging["use_tensorboard"] = True
            if self.arguments.get("logging_dir"):
                logging["tensorboard_dir"] = self.get("logging_dir", "logging.tensorboard_dir")
        if self.arguments.get("log_tracker_name"):
            logging["wandb_project"] = self.get("log_tracker_name", "logging.wandb_project")
        self.read.update(("logging_dir", "log_tracker_name"))
        return logging

    def finish(self) -> None:
        for name, value in self.arguments.items():
            if name in _INERT_ONLY_AT and name not in self.read:
                if value not in (None, *_INERT_ONLY_AT[name]):
                    raise ConfigError(f"{self.path}: {name}: {value!r} has no leco equivalent; remove it")
                continue
            if name not in self.read:
                close = difflib.get_close_matches(name, sorted(self.read), n=1)
                fix = (
                    f"did you mean {close[0]!r}?"
                    if close
                    else "remove it, or write the run as a leco config YAML"
                )
                raise ConfigError(
                    f"{self.path}: {name}: a train_leco option leco has no equivalent for; {fix}"
                )

    def in_kohya_keys(self, message: str) -> str:
        """A message about a leco key set from an option, told with the option's name."""
        for ours, theirs in sorted(self.origin.items(), key=lambda item: -len(item[0])):
            opening = f"{self.path}: {ours}"
            if message.startswith((f"{opening}:", f"{opening} ")):
                return f"{self.path}: {theirs} (leco: {ours}){message[len(opening) :]}"
        return message
