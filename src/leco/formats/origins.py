"""Which key of another tool's file each leco key was read from, so that a problem found later (a
model not found, a setting without effect) names the key the user wrote."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path

_ORIGINS: dict[Path, dict[str, str]] = {}  # file -> {leco key: its key there}


def remember(path: Path, origin: dict[str, str]) -> None:
    _ORIGINS[Path(path).resolve()] = dict(origin)


def in_file_keys(path: str | Path, message: str) -> str:
    """`message`, opening with a leco key read from the file at `path`, told with that file's key."""
    return with_origin(message, _ORIGINS.get(Path(path).resolve(), {}))


def with_origin(message: str, origin: dict[str, str]) -> str:
    # the key itself (longest first: train.lr before train); "prompts entry 5" counts leco's entries
    for ours, theirs in sorted(origin.items(), key=lambda item: -len(item[0])):
        if message.startswith(f"{ours}: "):
            told = theirs if theirs == ours else f"{theirs} (leco: {ours})"
            return f"{told}{message[len(ours) :]}"
    return message


# A message about a key of a config's sections (leco's names), as the loaders word them.
_CONFIG_KEY_PROBLEM = re.compile(
    r"^(pretrained_model|network|train|save|logging|other|anchors|preview|closed_form|teacher|prompts)\b"
)


def in_config_file(config: str | Path, message: str, changes: Sequence[str] = ()) -> str:
    """A problem with a key, named with the config file (in its own format's words) and the --set
    changes made to it; a key --set changed keeps leco's name."""
    named_file = message.partition(": ")[0]  # a file such as prompts.toml opens like a key
    if not _CONFIG_KEY_PROBLEM.match(message) or Path(named_file).is_file():
        return message
    where = f"{config} with --set {' '.join(map(shlex.quote, changes))}" if changes else str(config)
    changed = any(message.startswith(f"{change.partition('=')[0].strip()}:") for change in changes)
    return f"{where}: {message if changed else in_file_keys(config, message)}"
