"""Which key of another tool's file each leco key was read from, so that a problem found later (a
model not found, a setting without effect) names the key the user wrote."""

from __future__ import annotations

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
