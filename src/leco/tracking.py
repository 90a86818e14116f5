"""A run's progress: the bar, and optional logging to Weights & Biases and TensorBoard."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from leco.config import LecoConfig
from leco.errors import LecoError, first_line
from leco.files import nearest_existing


class Progress:
    """The progress bar and the trackers, one call a step; quiet on every process but the main one."""

    def __init__(self, config: LecoConfig, step: int, run_id: str, *, show: bool, main: bool) -> None:
        self.tracker = Tracker(config if main else None, first_step=step, run_id=run_id)
        total = config.train.iterations
        self.bar = tqdm(total=total, initial=step, desc=config.save.name, disable=not (show and main))

    def update(self, step: int, loss: float, lr: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3e}", lr=f"{lr:.2e}", refresh=False)
        self.tracker.log({"loss": loss, "lr": lr}, step)

    def close(self) -> None:
        self.bar.close()
        self.tracker.close()


WANDB_PROJECT_REFUSES = ("/", "\\", "#", "?", "%", ":")  # wandb.init refuses them, after the model loaded


def tensorboard_folder(config: LecoConfig) -> Path:
    """The run's TensorBoard events: a folder of its own under the one named (TensorBoard draws each
    folder as one run: two runs in one would be one zig-zag curve), by default `save.path/logs`."""
    root = config.logging.tensorboard_dir or Path(config.save.path) / "logs"
    return Path(root).expanduser() / config.save.name


def check_log_folder(config: LecoConfig) -> None:
    """Before anything is loaded or replaced: the loggers asked for are installed, and the
    TensorBoard folder can be made where it is asked for."""
    if config.logging.use_wandb and importlib.util.find_spec("wandb") is None:
        raise LecoError("logging.use_wandb: wandb is not installed; pip install wandb")
    project = config.logging.wandb_project
    refused = [c for c in WANDB_PROJECT_REFUSES if c in project]
    if config.logging.use_wandb and (refused or not project.strip()):
        raise LecoError(
            f"logging.wandb_project: {project!r} is no W&B project name (it may not be empty or hold any of "
            f"{' '.join(WANDB_PROJECT_REFUSES)}); choose another"
        )
    if not config.logging.use_tensorboard:
        return
    if importlib.util.find_spec("tensorboard") is None:
        raise LecoError("logging.use_tensorboard: tensorboard is not installed; pip install tensorboard")
    folder = tensorboard_folder(config)
    existing = nearest_existing(folder)
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        why = "a file" if existing.exists() and not existing.is_dir() else "not writable"
        raise LecoError(
            f"logging.tensorboard_dir: {folder} cannot be made ({existing} is {why}); choose another folder"
        )


class Tracker:
    """Sends scalars to the sinks the config enables; does nothing when none is."""

    def __init__(self, config: LecoConfig | None, first_step: int = 0, run_id: str | None = None) -> None:
        """`None`: a process that logs nothing (not the main one of a data-parallel run).
        `first_step`: where a resumed run goes on from; `run_id`: the run's own, kept by its resumes."""
        self.sinks: list[Any] = []
        if config is None:
            return
        logging = config.logging
        if logging.use_wandb:
            try:
                import wandb
            except ImportError:
                raise LecoError("logging.use_wandb: wandb is not installed; pip install wandb") from None
            try:
                run = wandb.init(
                    project=logging.wandb_project,
                    name=config.save.name,
                    config=config.model_dump(mode="json"),
                    id=run_id,
                    resume="allow",  # a resumed run goes on with its own curves
                )
            except Exception as error:  # not logged in, no network, a project W&B refuses: its own types
                raise LecoError(
                    f"logging.use_wandb: W&B did not start ({first_line(error)}); log in with `wandb "
                    "login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to log here and sync later"
                ) from None
            self.sinks.append(run)
        if logging.use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise LecoError(
                    "logging.use_tensorboard: tensorboard is not installed; pip install tensorboard"
                ) from None
            # A run killed after its last save logged steps past the one it resumes from; purging
            # them keeps the curve single-valued instead of drawing those steps twice. The resumed
            # run logs from first_step + 1 (TensorBoard drops every event at or after purge_step).
            purge_step = first_step + 1 if first_step > 0 else None
            writer = SummaryWriter(str(tensorboard_folder(config)), purge_step=purge_step)
            self.sinks.append(_TensorBoard(writer))

    def log(self, values: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(values, step=step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.finish()


class _TensorBoard:
    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self) -> None:
        self.writer.close()
