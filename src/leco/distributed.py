"""Data-parallel training across processes (`accelerate launch` or `torchrun`), through accelerate.

Each process makes its own rollouts from its own random stream (the run's seed plus its rank), so
N processes see N times the samples per step; their gradients are averaged before every optimizer
step, so the trained weights stay identical everywhere. Only the main process writes files, logs
and previews. With one process everything here is a no-op.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from leco.errors import LecoError, first_line


def _world_size() -> int:
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise LecoError(
            f"WORLD_SIZE={text!r} is not a number of processes; unset it (launchers such as accelerate "
            "set it)"
        ) from None


def launcher_precision_note(precision: str) -> str | None:
    """`accelerate launch --mixed_precision bf16` (or its config file) sets a variable leco does not
    read: the run's precision is train.precision, which a kohya user would not think to change."""
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if asked in ("fp16", "bf16") and asked != precision:
        return (
            f"accelerate's mixed precision {asked} is not read: this run trains in train.precision "
            f"{precision}; set train.precision: {asked} for it"
        )
    return None


class Ranks:
    def __init__(self, device: torch.device) -> None:
        self.state = None
        if _world_size() > 1:
            from accelerate import PartialState

            try:  # accelerate picks gloo for CPU processes and nccl for GPUs.
                self.state = PartialState(cpu=device.type == "cpu")
            except (ValueError, RuntimeError, KeyError) as error:
                reason = first_line(error, 120)
                raise LecoError(
                    f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for data-parallel processes, which cannot "
                    f"meet ({reason}); start them with `accelerate launch -m leco train ...` or `leco train "
                    "--num-processes N`, or unset WORLD_SIZE"
                ) from None

    @property
    def count(self) -> int:
        return self.state.num_processes if self.state else 1

    @property
    def index(self) -> int:
        return self.state.process_index if self.state else 0

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def device(self, requested: torch.device) -> torch.device:
        """The process's own GPU when several processes share a machine."""
        return self.state.device if self.state and requested.type == "cuda" else requested

    def mean_gradients(self, parameters: list[nn.Parameter]) -> None:
        """Average the gradients over the processes, in one collective call."""
        if self.count == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.count
        for parameter, chunk in zip(parameters, flat.split([g.numel() for g in grads]), strict=True):
            parameter.grad = chunk.view_as(parameter)

    def mean(self, value: float, device: torch.device) -> float:
        if self.count == 1:
            return value
        tensor = torch.tensor([value], device=device, dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return float(tensor) / self.count

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process if it is true on one (a stop request, a NaN)."""
        if self.count == 1:
            return flag
        tensor = torch.tensor([float(flag)], device=device)
        torch.distributed.all_reduce(tensor)
        return bool(tensor.item() > 0)

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value`, in rank order (on every process)."""
        if self.count == 1:
            return [value]
        gathered: list[Any] = [None] * self.count
        torch.distributed.all_gather_object(gathered, value)
        return gathered
