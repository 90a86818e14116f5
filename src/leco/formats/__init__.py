"""Other trainers' prompt and config files, read into leco's own config.

One module per format a user would name: `kohya_leco` (sd-scripts `train_leco.py` prompt TOML),
`kohya_args` (its arguments TOML, `--config_file`),
`ai_toolkit` (ostris/ai-toolkit slider job configs) and `sliders` (rohitgandikota/sliders'
`--attributes`). `leco.config.load_config` / `load_prompts` dispatch here, so these files run
unchanged with `leco train`.
"""

from __future__ import annotations

from pathlib import Path

from leco.config import ConfigError, LecoConfig
from leco.formats.ai_toolkit import is_ai_toolkit_config, load_ai_toolkit_config, read_document
from leco.formats.kohya_args import load_kohya_arguments
from leco.formats.kohya_leco import kohya_arguments


def foreign_config(path: Path, prompts_file: str | None = None) -> LecoConfig | None:
    """The config another trainer's file stands for, or None when `path` is leco's own YAML
    (`prompts_file`: given on the command line, which a kohya arguments file leaves to it)."""
    if path.suffix.lower() == ".toml":
        arguments = kohya_arguments(path)
        if arguments is not None:
            return load_kohya_arguments(path, arguments, prompts_file)
        raise ConfigError(
            f"{path}: a kohya train_leco TOML is a prompts file, not a training config; name it in a "
            f"config YAML: prompts_file: {path.name}"
        )
    if is_ai_toolkit_config(read_document(path, quiet=path.suffix.lower() not in (".json", ".jsonc"))):
        if prompts_file is not None:
            raise ConfigError(
                f"--prompts_file: {path} is an ai-toolkit job, whose slider targets are its prompts; "
                "leave the option out"
            )
        return load_ai_toolkit_config(path)
    return None
