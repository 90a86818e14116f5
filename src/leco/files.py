"""Output files appear whole or not at all: written to a temp file beside them, then renamed."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from leco.errors import LecoError, first_line


class OutputNotWritten(OSError):
    """An output file or folder that could not be written (a folder gone read-only or taken away
    under a running job, no permission): what the command line reports as such."""


@contextmanager
def atomic_output(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file handle whose content replaces `path` only if the block finishes.

    A crash or Ctrl-C mid-write leaves the previous file (a LoRA, a training state) untouched
    and no half-written one; the temp file is in the same folder so the rename is atomic.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _not_written(error, path) from error
    try:
        with os.fdopen(handle, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode a plain open() gives
        os.replace(temp, path)
    except BaseException as error:
        Path(temp).unlink(missing_ok=True)
        if isinstance(error, OSError) or is_disk_full(error):
            raise _not_written(error, path) from error
        raise


def _not_written(error: BaseException, path: Path) -> OSError:
    """The error named by the file it was writing: torch and safetensors wrap a full disk without
    the path, and a folder gone read-only names only the temp file."""
    if is_disk_full(error):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    assert isinstance(error, OSError)
    return OutputNotWritten(error.errno, error.strerror or str(error), str(path))


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what it wraps: torch and safetensors raise their own) is a full disk."""
    causes = [error, error.__cause__, error.__context__]
    return any(
        isinstance(cause, OSError) and cause.errno == errno.ENOSPC or "No space left on device" in str(cause)
        for cause in causes
        if cause is not None
    )


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A fresh folder to fill; it takes the place of `path` only if the block finishes.

    Until then the old folder (e.g. the shipped ink-digits model during a rebuild) stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700
        if path.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, retired / path.name)
            os.replace(staging, path)
            shutil.rmtree(retired)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def path_exists(path: Path) -> bool:
    """Path.exists, False for a name the system refuses (too long, a NUL byte) instead of raising."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def nearest_existing(path: Path, option: str = "") -> Path:
    """`path` (made absolute) if it exists, else the closest folder or file above it that does.

    A symlink on the way that leads nowhere (dangling, or a loop) is named, after `option` (e.g.
    "--out: "): nothing can be written through it, and creating a folder there fails obscurely."""
    existing = path.absolute()
    while not path_exists(existing) and existing != existing.parent:
        if os.path.islink(existing):
            raise LecoError(
                f"{option}{existing} is a symlink that leads nowhere (dangling, or a loop); choose another "
                "path"
            )
        existing = existing.parent
    return existing


def canonical(path: str | Path) -> Path:
    """The path as the file system sees it: `..` and symlinks resolved, case folded where the
    file system ignores it (Windows), so two spellings of one place compare equal."""
    return Path(os.path.normcase(os.path.realpath(path)))


def holds_or_is(outer: str | Path, inner: str | Path) -> bool:
    """Whether `outer` is `inner` or a folder above it, however either is spelled."""
    outer, inner = canonical(outer), canonical(inner)
    return inner == outer or inner.is_relative_to(outer)


def _same_or_nested(a: Path, b: Path) -> bool:
    """Whether a and b are one path, or one holds the other, however either is spelled."""
    return holds_or_is(a, b) or holds_or_is(b, a)


def check_output(
    out: Path, *, overwrite: bool, inputs: Sequence[Path] = (), folder_marker: str | None = None
) -> Path:
    """Refuse an output that cannot be written or would destroy what the user has, before any work.

    `inputs`: paths the command reads, which the output may neither be, hold nor sit inside.
    `folder_marker`: a file every folder this command writes holds (e.g. model_index.json); with
    `overwrite`, an existing folder without it is refused (it holds something else).
    """
    if not str(out).strip() or out == Path("."):
        raise LecoError("--out: name the file or folder to write")
    out = out.expanduser()
    where = out.absolute()
    for source in inputs:
        if _same_or_nested(where, source.expanduser()):
            raise LecoError(
                f"--out: {out} would replace, hold or sit inside the input {source}; choose another path"
            )
    existing = nearest_existing(where, "--out: ")
    if existing != where and not existing.is_dir():
        raise LecoError(f"--out: {existing} is a file, so {out} cannot be created; choose another path")
    if not os.access(existing, os.W_OK) or (existing == where and not os.access(where.parent, os.W_OK)):
        raise LecoError(f"--out: {out} cannot be written there (permission denied); choose another path")
    # An empty folder has nothing to lose: a command that writes folders fills it without --overwrite.
    if path_exists(out) and not overwrite and not (folder_marker and is_empty_folder(out)):
        raise LecoError(f"--out: {out} exists; choose another path or pass --overwrite to replace it")
    if out.is_dir() and folder_marker and not is_empty_folder(out) and not (out / folder_marker).is_file():
        raise LecoError(
            f"--out: {out} holds files this command did not write (no {folder_marker}); --overwrite replaces "
            "only such an output, so choose a new or empty folder"
        )
    return out


def is_empty_folder(path: Path) -> bool:
    """No entry but hidden ones (.DS_Store, .gitkeep: nothing a user would miss)."""
    try:
        return path.is_dir() and all(entry.name.startswith(".") for entry in path.iterdir())
    except OSError:  # unreadable: not known to be empty
        return False


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def refuse_earlier_outputs(paths: Sequence[Path], option: str, what: str, overwrite: bool = False) -> None:
    """LecoError if any of `paths` (the images a command is about to write) exists: leco's own earlier
    images are replaced only with --overwrite, files leco did not write never. `option`, e.g.
    "--out DIR", names where they are."""
    taken = [path for path in paths if path_exists(path)]
    foreign = [path for path in taken if not written_by_leco(path)]
    where = option.split()[0]
    if foreign:
        raise LecoError(
            f"{option}: holds {len(foreign)} file(s) leco did not write under the names of the {what} "
            f"(e.g. {foreign[0].name}); move them or choose another {where} (--overwrite replaces only "
            "images leco wrote)"
        )
    if taken and not overwrite:
        raise LecoError(
            f"{option}: already holds {len(taken)} of the {what} (e.g. {taken[0].name}, from an earlier "
            f"run); choose another {where}, or --overwrite to replace them"
        )


SOFTWARE = "leco"  # the PNG "Software" text of every image leco writes


def is_eval_report(path: Path) -> bool:
    """A JSON report an earlier `leco eval` wrote (re-running an eval may replace it)."""
    import json

    if path.stat().st_size > 1 << 30:
        return False
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(report, dict) and {"rows", "summary", "spec"} <= report.keys()


def written_by_leco(path: Path) -> bool:
    """Whether `path` is a PNG leco wrote: its Software text, or (images of earlier releases) A1111
    parameters naming leco's version. Earlier releases' grids carried no text; one is not told
    from a user's own grid.png, so it is left for the user to move."""
    text = _png_text(path)
    if text is None:
        return False
    return text.get("Software", "").startswith(SOFTWARE) or "Version: leco " in text.get("parameters", "")


GRID = "grid.png"  # the labelled grid generate writes beside its images


def _png_text(path: Path) -> dict[str, str] | None:
    """A PNG's text chunks; None if it is no readable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return dict(getattr(image, "text", {}))
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def safetensors_metadata(path: Path) -> dict[str, str]:
    """A .safetensors file's metadata; empty where the file is not readable as one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            return dict(file.metadata() or {})
    except Exception:  # safetensors raises its own error types, OSError or ValueError
        return {}


def _not_a_torch_file(path: Path) -> str | None:
    """What a file is when it cannot be a torch save (a zip since torch 1.6, a pickle before)."""
    try:
        with open(path, "rb") as file:
            start = file.read(512)
    except OSError:
        return None  # torch.load names what stops reading it
    if not start:
        return "it is empty"
    if start.startswith(b"PK") or start[:1] == b"\x80":  # a zip, or a pickle's PROTO opcode
        return None
    try:
        text = start.decode("utf-8")
    except UnicodeDecodeError as error:  # binary, or text cut inside a character at byte 512
        if error.start < len(start) - 3:
            return None  # torch's reader says what it found
        text = start[: error.start].decode("utf-8")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        return None  # NULs and control bytes: binary (torch's legacy .tar format starts with text)
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"it is text (starting {first!r}), not the weights a torch .pt/.bin/.ckpt holds"


def load_torch_file(path: Path) -> Any:
    """torch.load with weights_only: tensors and plain containers only, no pickled code runs. What it
    refuses or cannot read raises LecoError with the reason alone (callers name the file and key);
    torch's own warnings and multi-paragraph messages stay out of the one line."""
    import pickle
    import warnings

    import torch

    try:
        # The original textual inversion (and early A1111) kept its vectors in a ParameterDict, which
        # A1111's own safe unpickler allows too: a container of tensors, no code.
        with warnings.catch_warnings(), torch.serialization.safe_globals([torch.nn.ParameterDict]):
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text, kind = str(error), _not_a_torch_file(path)  # a text file: refused or not, never weights
        if text.startswith("Weights only load failed") and kind is None:  # torch's paragraphs, one reason
            marker = "WeightsUnpickler error:"  # torch >= 2.6 puts its advice first, the reason here
            after = text.partition(marker)[2].strip()
            lines = [line.strip() for line in text.splitlines()[1:]]
            advice = ("Please file", "Check the documentation", "(1)", "(2)")
            others = (line for line in lines if line and not line.startswith(advice))
            detail = after.splitlines()[0].partition(". ")[0] if after else next(others, "?")
            raise LecoError(
                f"torch's safe reader refused it ({detail[:120]}): it holds more than plain tensors, which "
                "could run code when loaded, or it is damaged"
            ) from None
        raise _unreadable_torch_file(kind, error) from None
    except Exception as error:  # torch raises RuntimeError, EOFError, ... for damaged files
        raise _unreadable_torch_file(_not_a_torch_file(path), error) from None


def _unreadable_torch_file(kind: str | None, error: BaseException) -> LecoError:
    # torch's own answer for a text file is a bare byte value ("105"): say what the file is instead
    if kind:
        return LecoError(f"not a torch file: {kind}")
    return LecoError(f"damaged or not a torch file: {first_line(error)}")
