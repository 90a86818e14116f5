"""leco: train LoRAs that erase or strengthen concepts in Stable Diffusion, without images."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leco.trainer import TrainResult

__version__ = "0.1.0"


def train(config: Any, **options: Any) -> TrainResult:
    """Train a LECO LoRA from a config (a LecoConfig or the path of a config YAML).

    The same as `leco train CONFIG`; see leco.trainer.train. Imported lazily so that `import leco`
    stays light.
    """
    from leco.trainer import train as run

    return run(config, **options)
