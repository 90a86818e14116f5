"""leco: train LoRAs that erase or strengthen concepts in Stable Diffusion, without images."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leco.config import LecoConfig
    from leco.trainer import TrainResult

from leco._version import __version__

__all__ = ["__version__", "train"]


def train(
    config: LecoConfig | dict[str, Any] | str | Path,
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    prompts_file: str | Path | None = None,
) -> TrainResult:
    """Train as the config says (a file, a dict of its sections or a LecoConfig, which is left as
    it is), as `leco train CONFIG` does. Returns a TrainResult: `path` of the final file, `state`
    (the folder `resume=` continues from; None for a closed-form edit), `steps`, `interrupted` (a
    first Ctrl-C saves `_interrupted` and returns; a second raises KeyboardInterrupt) and
    `trainable` (the trained part, still applied to the loaded models). `prompts_file` replaces a
    config file's prompts, as `leco train --prompts_file` does.

    The caller's torch state is left as it was: its random generators (the run seeds its own),
    grad mode and default dtype. A config with `train.method: closed_form` is one edit of the
    cross-attention (leco.closed_form); any other runs the training loop (leco.trainer). Imported
    lazily so that `import leco` stays light.
    """
    import torch

    from leco.errors import LecoError, check_flags

    check_flags(overwrite=overwrite, progress=progress)
    if resume is not None and overwrite:
        raise LecoError("train: resume= continues a run and overwrite= replaces it; give one of them")
    dtype = torch.get_default_dtype()
    devices = list(range(torch.cuda.device_count()))
    try:  # a notebook's settings (no_grad, float64 defaults) would break the run, and it seeds torch
        torch.set_default_dtype(torch.float32)
        with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
            return _train(config, resume, overwrite, progress, prompts_file)
    finally:
        torch.set_default_dtype(dtype)


def _train(
    config: LecoConfig | dict[str, Any] | str | Path,
    resume: str | Path | None,
    overwrite: bool,
    progress: bool,
    prompts_file: str | Path | None,
) -> TrainResult:
    from leco.config import ready_config
    from leco.distributed import launcher_precision_note
    from leco.errors import LecoError, is_main_process, warn
    from leco.formats.origins import in_config_file, in_file_keys

    config_file = config if isinstance(config, (str, Path)) else None  # another tool's: its keys
    config = ready_config(config, prompts_file)
    if is_main_process():  # once, not per process
        for note in dict.fromkeys(config.unused_settings()):  # a kohya target's entries: said once
            warn(in_file_keys(config_file, note) if config_file else note)
        precision_note = launcher_precision_note(config.train.precision)
        if precision_note:
            warn(precision_note)
    try:
        return _run(config, resume, overwrite, progress)
    except LecoError as error:  # found once models are loaded: a key of the file, named with it
        told = in_config_file(config_file, str(error)) if config_file is not None else str(error)
        if told == str(error):
            raise
        error.args = (told,)  # the same error (a ConfigError stays one), told in the file's words
        raise error from None


def _run(config: LecoConfig, resume: str | Path | None, overwrite: bool, progress: bool) -> TrainResult:
    from leco.errors import LecoError

    if config.train.method == "closed_form":
        from leco import closed_form
        from leco.trainer import TrainResult

        if resume is not None:
            raise LecoError("--resume: a closed-form edit has no steps to continue; run it again")
        path, network, _ = closed_form.edit(config, overwrite=overwrite)
        return TrainResult(path, None, 0, False, network)
    from leco.trainer import Trainer

    return Trainer(config, progress=progress, resume=resume, overwrite=overwrite).run()
