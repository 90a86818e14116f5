"""Resumable training state: everything a run needs to continue exactly where it stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from leco.errors import LecoError
from leco.files import atomic_output

STATE_FILE = "training_state.pt"
# Parts of the config that must match for a resumed run to continue the same training.
_MUST_MATCH = ("pretrained_model", "network", "prompts", "anchors")


def state_dir(save_path: str | Path, name: str) -> Path:
    return Path(save_path) / f"{name}_state"


def write_state(folder: Path, state: dict[str, Any]) -> Path:
    """Write atomically: a crash while saving leaves the previous state intact."""
    with atomic_output(folder / STATE_FILE) as file:
        torch.save(state, file)
    return folder / STATE_FILE


def read_state(path: str | Path, config_json: str) -> dict[str, Any]:
    """Load a state folder (or its file) and check it belongs to this config."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise LecoError(f"--resume: {path} holds no {STATE_FILE}; pass the *_state folder a run saved")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for damaged or foreign files
        raise LecoError(f"--resume: {file} cannot be read ({str(error).splitlines()[0][:120]})") from None
    saved, current = json.loads(state["config"]), json.loads(config_json)
    for key in _MUST_MATCH:
        if saved.get(key) != current.get(key):
            raise LecoError(
                f"--resume: {file} was trained with a different `{key}` section; resume with the config "
                "that started the run (only train/save/logging settings may change)"
            )
    return state
