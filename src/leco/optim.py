"""Optimizers and learning-rate schedules by the names the reference tool's configs use."""

from __future__ import annotations

import importlib

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LRScheduler

from leco.config import TrainConfig
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


def build_optimizer(train: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """train.optimizer over the trained parameters, with train.lr and train.optimizer_args."""
    name, lr, args = train.optimizer, train.lr, train.optimizer_args
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


def build_lr_scheduler(train: TrainConfig, optimizer: torch.optim.Optimizer) -> LRScheduler:
    """diffusers' schedules by name; `step` is torch's StepLR (decay by gamma every step_size)."""
    name, iterations, args = train.lr_scheduler, train.iterations, train.lr_scheduler_args
    warmup_steps = train.lr_warmup_steps
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
