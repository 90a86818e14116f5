"""Optimizers and learning-rate schedules by the names the reference tool's configs use."""

from __future__ import annotations

import contextlib
import importlib
import io
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.optimization import (
    get_cosine_schedule_with_warmup,
    get_polynomial_decay_schedule_with_warmup,
    get_scheduler,
)
from torch.optim.lr_scheduler import LRScheduler

from leco.config import LR_SCHEDULER_ARGS, TrainConfig
from leco.errors import LecoError, is_main_process, warn

ADAPTIVE_STEP = ("prodigy", "dadaptadam", "dadaptlion")  # learning-rate-free: lr is a multiplier, ~1
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


def optimizer_class(train: TrainConfig) -> type[torch.optim.Optimizer]:
    """train.optimizer's class; a package that is not installed is one line."""
    module_name, class_name, package = _OPTIMIZERS[train.optimizer]
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except ImportError:
        raise LecoError(
            f"train.optimizer: {train.optimizer} needs the {package} package; pip install {package}"
        ) from None


def check_optimizer(train: TrainConfig) -> None:
    """train.optimizer and its arguments tried on a stand-in parameter, before any model loads: some
    arguments are read only when stepping (betas: [0.9, 0.99, 0.5] in AdamW), which would otherwise
    show as a traceback after minutes of loading and the first rollout."""
    lr, args = train.lr, train.optimizer_args
    chosen = optimizer_class(train)
    stand_in = torch.nn.Parameter(torch.zeros(2))
    stand_in.grad = torch.ones(2)
    # Not stepped: 8-bit optimizers and capturable ones (CUDA graphs) step only on a GPU tensor.
    steps = _OPTIMIZERS[train.optimizer][0] != "bitsandbytes.optim" and not args.get("capturable")
    # what an optimizer prints of its settings (prodigy) is said once, by the real one
    with _arguments_checked(args, chosen), contextlib.redirect_stdout(io.StringIO()):
        optimizer = chosen([stand_in], lr=lr, **args)
        if steps:
            optimizer.step()


def build_optimizer(train: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """train.optimizer over the trained parameters, with train.lr and train.optimizer_args (tried
    before loading: check_optimizer)."""
    chosen = optimizer_class(train)
    if train.optimizer in ADAPTIVE_STEP and train.lr < 0.1 and is_main_process():
        warn(
            f"train.lr: {train.lr:g} with {train.optimizer}, which finds its own step size and is meant "
            "to run at lr 1 (its lr scales that step): at this lr it barely trains; set train.lr: 1"
        )
    with _arguments_checked(train.optimizer_args, chosen):
        return chosen(params, lr=train.lr, **train.optimizer_args)


@contextlib.contextmanager
def _arguments_checked(args: dict[str, Any], chosen: type) -> Iterator[None]:
    try:
        yield
    # optimizers check their arguments in their own ways: betas: [0.9] is an IndexError in AdamW,
    # an AssertionError in Lion
    except (TypeError, ValueError, IndexError, KeyError, AssertionError, RuntimeError) as error:
        raise _arguments_error("train.optimizer_args", args, error, chosen.__name__) from None


def build_lr_scheduler(train: TrainConfig, optimizer: torch.optim.Optimizer) -> LRScheduler:
    """diffusers' schedules by name; `step` is torch's StepLR (decay by gamma every step_size)."""
    name, iterations, args = train.lr_scheduler, train.iterations, train.lr_scheduler_args
    if name not in LR_SCHEDULER_ARGS:  # reads none: the config's note says they are ignored
        args = {}
    warmup_steps = train.lr_warmup_steps
    try:
        if name == "step":
            step_size = int(args.get("step_size", max(1, iterations // 4)))
            return torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=step_size, gamma=float(args.get("gamma", 0.5))
            )
        if name in ("cosine", "polynomial"):  # get_scheduler passes these their arguments only in part
            make = (
                get_cosine_schedule_with_warmup
                if name == "cosine"
                else get_polynomial_decay_schedule_with_warmup
            )
            return make(optimizer, num_warmup_steps=warmup_steps, num_training_steps=iterations, **args)
        return get_scheduler(
            name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=iterations, **args
        )
    except (TypeError, ValueError) as error:
        raise _arguments_error("train.lr_scheduler_args", args, error, name) from None


def _arguments_error(key: str, args: dict[str, Any], error: Exception, owner: str) -> LecoError:
    """Name the value that is text where a number belongs, else pass on what `owner` said."""
    texts = [f"{name}={value!r}" for name, value in args.items() if isinstance(value, str)]
    if texts:
        return LecoError(f"{key}: {texts[0]} is not a number; give it a number")
    lists = {name: value for name, value in args.items() if isinstance(value, list | tuple)}
    unpacked = isinstance(error, ValueError) and "values to unpack" in str(error)
    if len(lists) == 1 and (unpacked or isinstance(error, IndexError)):  # read item by item
        (name, value), *_ = lists.items()
        hint = "; betas takes two, e.g. [0.9, 0.999]" if name == "betas" else ""
        return LecoError(f"{key}: {name}={value!r} has the wrong number of items (for {owner}){hint}")
    said = str(error)
    return LecoError(f"{key}: {said}" if owner in said else f"{key}: {said} (for {owner})")


class Updates:
    """What turns a step's gradients into new weights: the optimizer, its lr schedule, gradient
    clipping, and the fp16 loss scaler (a no-op at other precisions)."""

    def __init__(
        self, train: TrainConfig, parameters: list[torch.nn.Parameter], device: torch.device, fp16: bool
    ):
        self.parameters, self.max_grad_norm = parameters, train.max_grad_norm
        self.optimizer = build_optimizer(train, parameters)
        self.lr_scheduler = build_lr_scheduler(train, self.optimizer)
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)

    def backward(self, loss: torch.Tensor) -> None:
        """Add the loss's gradient (scaled under fp16) to the parameters' `.grad`."""
        self.scaler.scale(loss).backward()

    def unscaled(self, gradients: list[torch.Tensor]) -> list[torch.Tensor]:
        return [g / self.scaler.get_scale() for g in gradients]

    def start(self, gradients: list[torch.Tensor] | None = None) -> None:
        """Clear the parameters' gradients, or set them to these unscaled ones (scaled as they would
        be now: the scale may have changed since they were taken)."""
        self.optimizer.zero_grad(set_to_none=True)
        for parameter, gradient in zip(self.parameters, gradients or [], strict=gradients is not None):
            parameter.grad = gradient * self.scaler.get_scale()

    def step(self) -> None:
        """Apply the parameters' gradients, then advance the lr schedule."""
        if self.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()

    @property
    def lr(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a saved run under this config's lr: torch's load puts the saved run's lr back
        into the optimizer, and the run went on with it silently. (Another optimizer, or other
        optimizer or schedule arguments, are refused by checkpoints.read_state.) The schedule's shape
        is this config's too: StepLR's saved step size (a quarter of the first run's iterations by
        default) would otherwise outlive a change of train.iterations, which diffusers' schedules
        follow."""
        configured = [group["initial_lr"] for group in self.optimizer.param_groups]
        schedule = vars(self.lr_scheduler)
        shape = {key: schedule[key] for key in ("step_size", "gamma") if key in schedule}
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        vars(self.lr_scheduler).update(shape)
        self.scaler.load_state_dict(state["scaler"])
        groups = self.optimizer.param_groups
        for group, wanted, saved_base in zip(groups, configured, self.lr_scheduler.base_lrs, strict=True):
            if wanted != saved_base:  # a new lr, at the point its schedule has reached
                group["lr"] = wanted * (group["lr"] / saved_base if saved_base else 1.0)
                group["initial_lr"] = wanted
        self.lr_scheduler.base_lrs = [group["initial_lr"] for group in groups]
        if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.LambdaLR):  # diffusers' schedules
            # the curve as configured now, at the step reached: a resume that raises train.iterations
            # moves every later point of it, and the saved lr is the old curve's (cosine: 0 at its end)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # get_lr() outside step(): its closed form is wanted here
                for group, lr in zip(groups, self.lr_scheduler.get_lr(), strict=True):
                    group["lr"] = lr
        self.lr_scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports


def non_finite_loss(step: int, loss: float, dtype: torch.dtype) -> LecoError:
    """What stops a run whose loss became NaN or inf, and what to change."""
    fp16 = "train.precision: bf16 or fp32 (fp16 overflows easily), or " if dtype == torch.float16 else ""
    return LecoError(
        f"training stopped at step {step}: the loss became {loss}; use {fp16}a lower train.lr "
        "(or a lower network.alpha, the LoRA's scale)"
    )
