"""Optimizers and learning-rate schedules by the names the reference tool's configs use."""

from __future__ import annotations

import importlib
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LRScheduler

from leco.errors import LecoError

# name -> (module, class, pip package that provides it)
_OPTIMIZERS = {
    "adamw": ("torch.optim", "AdamW", None),
    "adam": ("torch.optim", "Adam", None),
    "sgd": ("torch.optim", "SGD", None),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "adam8bit": ("bitsandbytes.optim", "Adam8bit", "bitsandbytes"),
    "lion8bit": ("bitsandbytes.optim", "Lion8bit", "bitsandbytes"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "dadaptadam": ("dadaptation", "DAdaptAdam", "dadaptation"),
    "dadaptlion": ("dadaptation", "DAdaptLion", "dadaptation"),
}


def build_optimizer(
    name: str, params: list[torch.nn.Parameter], lr: float, args: dict[str, Any]
) -> torch.optim.Optimizer:
    module_name, class_name, package = _OPTIMIZERS[name]
    try:
        optimizer_class = getattr(importlib.import_module(module_name), class_name)
    except ImportError:
        raise LecoError(
            f"train.optimizer: {name} needs the {package} package; pip install {package}"
        ) from None
    try:
        return optimizer_class(params, lr=lr, **args)
    except TypeError as error:
        raise LecoError(f"train.optimizer_args: {error} (for {class_name})") from None


def build_lr_scheduler(
    name: str, optimizer: torch.optim.Optimizer, iterations: int, warmup_steps: int, args: dict[str, Any]
) -> LRScheduler:
    """diffusers' schedules by name; `step` is torch's StepLR (decay by gamma every step_size)."""
    if name == "step":
        step_size = int(args.get("step_size", max(1, iterations // 4)))
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=step_size, gamma=float(args.get("gamma", 0.5))
        )
    try:
        return get_scheduler(
            name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=iterations, **args
        )
    except TypeError as error:
        raise LecoError(f"train.lr_scheduler_args: {error} (for {name})") from None
