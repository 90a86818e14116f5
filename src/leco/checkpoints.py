"""Where a run writes: its LoRA (or embedding) files and resumable state, checked before any step.

A run folder is `save.path`; a run owns the files named after `save.name` in it. Before training
starts the folder must be writable, no other run may be writing the same name (a lock held while
training), and files of an earlier run are not overwritten unless asked (`--overwrite`), or
continued (`--resume`). Temp files a killed process left behind are removed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import sys
import threading
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from leco.config import LecoConfig
from leco.errors import LecoError, Terminated, is_main_process, process_count, warn
from leco.files import atomic_output, load_torch_file, nearest_existing, safetensors_metadata
from leco.models import looks_like_repo_id, recorded_model_name
from leco.optim import check_optimizer, optimizer_class
from leco.tracking import check_log_folder, tensorboard_folder

STATE_FILE = "training_state.pt"
# Parts of the config that must match for a resumed run to continue the same training.
_MUST_MATCH = ("pretrained_model", "network", "prompts", "anchors", "teacher")
# Keys of those sections that change where or how weights are read, or who samples the rollouts,
# not what is trained: a run may go on with them changed (offload is what one turns on after
# running out of memory mid-run; rollout_share may hand the rollouts to the student for the rest).
_FREE_KEYS = {"offload", "allow_pickle", "rollout_share"}


# What file managers leave in a folder they showed (Finder, Explorer): not the user's work.
_FOLDER_VIEW_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}


def _trained_part(section: Any) -> Any:
    return {k: v for k, v in section.items() if k not in _FREE_KEYS} if isinstance(section, dict) else section


def _moved_model(key: str, saved: Any, current: Any, file: Path) -> Any:
    """The saved model section as if it named the current path, where only the folder differs: a
    model moved to another disk or machine is the same model (reading it whole to prove that would
    cost minutes for a full-size one)."""
    if (
        key not in ("pretrained_model", "teacher")
        or not isinstance(saved, dict)
        or not isinstance(current, dict)
    ):
        return saved
    was, now = saved.get("name_or_path"), current.get("name_or_path")
    if not isinstance(was, str) or not isinstance(now, str) or was == now:
        return saved
    if Path(was).name != Path(now).name or _trained_part({**saved, "name_or_path": now}) != _trained_part(
        current
    ):
        return saved
    # Two Hub repos of one name, or a model still where it was, are two models, not one moved.
    hub_repos = looks_like_repo_id(was) and looks_like_repo_id(now)
    if hub_repos or Path(was).expanduser().exists() or not Path(now).expanduser().exists():
        return saved
    warn(f"--resume: {file} was trained with {key}.name_or_path {was}; taking {now} as the same model moved")
    return {**saved, "name_or_path": now}


def _with_later_defaults(key: str, saved: Any, current: Any) -> Any:
    """The saved section with the keys a later leco added, where this run leaves them at their
    default: a state saved before a new setting existed trained as that default does."""
    model = _section_model(LecoConfig.model_fields[key].annotation)
    if model is None:
        return saved
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [_fill(model, s, c) for s, c in zip(saved, current, strict=True)]
    return _fill(model, saved, current)


def _fill(model: type, saved: Any, current: Any) -> Any:
    if not isinstance(saved, dict) or not isinstance(current, dict):
        return saved
    fields = model.model_fields
    added = {
        k: v for k, v in current.items() if k not in saved and k in fields and v == fields[k].get_default()
    }
    return {**saved, **added}


def _section_model(annotation: Any) -> type | None:
    """The pydantic model inside a section's annotation (`TeacherConfig | None`, `list[PromptSettings]`)."""
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    for argument in typing.get_args(annotation):
        found = _section_model(argument)
        if found is not None:
            return found
    return None


class RunFolder:
    def __init__(self, path: str | Path, name: str, logs: Path | None = None) -> None:
        self.path = Path(path).expanduser()
        self.name = name
        self.logs = logs if logs is not None else self.path / "logs" / name  # the run's TensorBoard events
        self._lock: Any = None
        self._replaced: list[Path] = []
        self._pending_grids: dict[Path, Path] = {}  # grid -> where it waits for the first save

    @property
    def previews(self) -> Path:
        return self.path / "previews"

    @property
    def state_dir(self) -> Path:
        return self.path / f"{self.name}_state"

    def preview_file(self, suffix: str) -> Path:
        return self.previews / f"{self.name}_{suffix}.png"

    def file(self, suffix: str, extension: str = ".safetensors") -> Path:
        return self.path / f"{self.name}_{suffix}{extension}"

    def check(self, *, overwrite: bool, resume_source: Path | None = None, previews: bool = False) -> None:
        """Before anything slow: the folder can be written, and no earlier run is silently replaced
        (continuing another run's state under this name would replace this name's files too)."""
        self._check_writable(keep=False)
        if previews and self.previews.exists() and not self.previews.is_dir():
            raise LecoError(
                f"save.path: {self.previews} is a file, but the preview grids go into a folder of that name; "
                "move the file or choose another save.path"
            )
        if previews and self.previews.is_dir() and not os.access(self.previews, os.W_OK | os.X_OK):
            raise LecoError(
                f"save.path: {self.previews}, where the preview grids go, is not writable; make it "
                "writable, or choose another save.path"
            )
        if resume_source is not None and resume_source.exists():
            state_file_of(resume_source)  # a folder or file that holds no state is named as such first
        if self._lock is None:  # a run writing this name now: neither --resume nor --overwrite may
            _refuse_if_locked(self.path / f".{self.name}.lock", self.name, self.path)
        earlier = self.earlier_files()
        # A path that is not there is read_state's to name.
        foreign = (
            resume_source is not None and resume_source.exists() and not self.is_own_state(resume_source)
        )
        if earlier and foreign:
            raise LecoError(
                f"--resume: {resume_source} is another run's state, and save.path {self.path} already holds "
                f"the run {self.name!r} ({earlier[0].name}), which continuing there would replace; choose "
                f"another save.name, or resume {self.state_dir} to continue {self.name!r} itself"
            )
        if earlier and not (resume_source is not None or overwrite):
            resumable = self.state_dir.is_dir()  # a closed-form edit leaves no state to continue
            carry_on = f"continue it with --resume {self.state_dir}, " if resumable else ""
            raise LecoError(
                f"save.path: {self.path} already holds the run {self.name!r} ({earlier[0].name}); "
                f"{carry_on}replace it with --overwrite (in Python: {'resume=, ' if resumable else ''}"
                "overwrite=), or choose another save.name"
            )
        replacing = overwrite and resume_source is None
        foreign_files = [
            path for path in earlier if path.suffix == ".safetensors" and not _written_by_leco(path)
        ]
        if replacing and foreign_files:
            raise LecoError(
                f"--overwrite: {foreign_files[0]} has this run's name but leco did not write it (no leco "
                "metadata), so --overwrite does not delete it; move it, or choose another save.name"
            )
        others = self.others_in_state() if replacing else []
        if others:
            raise LecoError(
                f"--overwrite: {self.state_dir} also holds {others[0].name}, which leco did not write and "
                "--overwrite would delete with the state; move it out of that folder"
            )

    def open(self, *, overwrite: bool, resume_source: Path | None = None) -> None:
        """Lock the run's name in the folder for this process, check again, and clear what may be cleared."""
        self._check_writable()
        try:
            self._lock = _acquire_lock(self.path / f".{self.name}.lock", self.name, self.path)
        except FileNotFoundError:  # another run's check took the folder away in that instant: again
            self._check_writable()
            self._lock = _acquire_lock(self.path / f".{self.name}.lock", self.name, self.path)
        try:  # a run that finished meanwhile counts
            self.check(overwrite=overwrite, resume_source=resume_source)
        except LecoError:
            self.close()
            raise
        for temp in self._own_temp_files():  # left by a process killed mid-save
            temp.unlink(missing_ok=True)
        # Replaced at the first save, not now: a run that fails before it leaves the earlier one whole.
        self._replaced = []
        if overwrite and resume_source is None:  # the earlier run's TensorBoard curves go with it
            logs = self.logs
            events = sorted(logs.glob("events.out.tfevents.*")) if logs.is_dir() else []
            self._replaced = self.earlier_files() + events

    def keep_final_files(self, step: int) -> None:
        """On resume: the earlier run's `_last` (or `_interrupted`) file holds its weights at `step`;
        it becomes that step's file, so continuing (which writes its own) does not lose them."""
        for suffix in ("last", "interrupted"):
            final, kept = self.file(suffix), self.file(f"{step}steps")
            if not final.is_file() or _saved_step(final) != step:
                continue
            grid, kept_grid = self.preview_file(suffix), self.preview_file(f"{step}steps")
            if kept.exists():  # the same step's weights, saved on schedule and again on stopping
                if suffix == "interrupted":
                    final.unlink()
                    if grid.is_file():  # its grid too: the step's own, or else it becomes the step's
                        grid.unlink() if kept_grid.exists() else grid.rename(kept_grid)
                continue
            final.rename(kept)
            if grid.is_file() and not kept_grid.exists():  # the grid of those weights goes with them
                grid.rename(kept_grid)

    def others_in_state(self) -> list[Path]:
        """What the state folder holds besides the state leco writes there (and its temp files)."""
        if not self.state_dir.is_dir():
            return []
        own = re.compile(rf"^{re.escape(STATE_FILE)}$|^\.{re.escape(STATE_FILE)}\..*\.tmp$")
        return sorted(
            entry
            for entry in self.state_dir.iterdir()
            if entry.is_dir() or not (own.match(entry.name) or entry.name in _FOLDER_VIEW_FILES)
        )

    def grid_target(self, path: Path) -> Path:
        """Where to draw the preview grid `path`: there, or, before the first save of a run that
        --overwrite lets replace an earlier one, a hidden temp name that the first save moves into
        place. A run that fails before that leaves the earlier run whole, grids included."""
        if not self._replaced:
            return path
        self._pending_grids[path] = path.with_name(f".{path.name}.pending.tmp")  # cleared by open()
        return self._pending_grids[path]

    def clear_replaced(self) -> None:
        """Delete what --overwrite replaces (the earlier run's files and state), before the first save."""
        for old in self._replaced:
            if old.is_dir():  # the state folder: what leco wrote there (check() found nothing else)
                others = self.others_in_state()
                for inner in old.iterdir():
                    if inner not in others:
                        inner.unlink()
                if old.is_symlink():  # a link to a folder elsewhere: the link goes, the folder stays
                    old.unlink()
                elif not others:
                    old.rmdir()
            else:
                old.unlink(missing_ok=True)
        self._replaced = []
        for grid, pending in self._pending_grids.items():
            if pending.is_file():
                os.replace(pending, grid)
        self._pending_grids = {}

    def is_own_state(self, path: str | Path) -> bool:
        """Whether `path` (a state folder or its file) is this run's own state."""
        path = Path(path).expanduser().resolve()
        own = self.state_dir.resolve()
        return path in (own, own / STATE_FILE)

    def _own_temp_files(self) -> list[Path]:
        """Temp files (leco.files.atomic_output's `.<file>.<random>.tmp`) of this run's own files
        only: a run named `no_seven_v2` saving in the same folder keeps its own."""
        own = self._own_file_stems
        patterns = [
            (self.path, rf"\.{own}\.safetensors\.\w+\.tmp"),
            (self.previews, rf"\.{own}\.png\.\w+\.tmp"),
            (self.state_dir, rf"\.{re.escape(STATE_FILE)}\.\w+\.tmp"),
        ]
        return [
            path
            for folder, pattern in patterns
            if folder.is_dir()
            for path in folder.iterdir()
            if re.fullmatch(pattern, path.name)
        ]

    @property
    def _own_file_stems(self) -> str:
        """The names (without extension) of the files a run of this name writes, as a regex."""
        return rf"{re.escape(self.name)}_(\d+steps|last|interrupted)"

    def earlier_files(self) -> list[Path]:
        """What a run of this name wrote here: its state, trained files and preview grids."""
        found = []
        for folder, extension in ((self.path, "safetensors"), (self.previews, "png")):
            pattern = re.compile(rf"{self._own_file_stems}\.{extension}")
            if folder.is_dir():
                found += sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name))
        return ([self.state_dir] if self.state_dir.is_dir() else []) + found

    def save(
        self,
        trainable: Any,
        suffix: str,
        state: dict[str, Any],
        metadata: dict[str, Any],
        dtype: torch.dtype,
        resolution: int,
        keep_step_files: int | None,
    ) -> Path:
        """The trained file and the resumable state: the run --overwrite replaces goes first, step
        files beyond save.max_step_files after."""
        self._lock_again_if_gone()
        self.clear_replaced()
        path = trainable.save(
            self.file(suffix), dtype=dtype, resolution=resolution, title=self.name, extra_metadata=metadata
        )
        self.write_state(state)
        self.prune_step_files(keep_step_files)
        return path

    def write_state(self, state: dict[str, Any]) -> Path:
        """Atomically: a crash while saving leaves the previous state intact."""
        created = not self.state_dir.exists()
        try:
            with atomic_output(self.state_dir / STATE_FILE) as file:
                torch.save(state, file)
        except BaseException:  # e.g. a full disk: no empty state folder left to block the next run
            if created and self.state_dir.is_dir() and not any(self.state_dir.iterdir()):
                self.state_dir.rmdir()
            raise
        return self.state_dir / STATE_FILE

    def prune_step_files(self, keep: int | None) -> None:
        """Keep only the newest `keep` step files (None or 0: all, as ai-toolkit's 0 means)."""
        if not keep:
            return
        steps = re.compile(rf"{re.escape(self.name)}_(\d+)steps\.safetensors")
        found = sorted(
            ((int(m[1]), p) for p in self.path.iterdir() if (m := steps.fullmatch(p.name))), reverse=True
        )
        for _, old in found[keep:]:
            old.unlink(missing_ok=True)

    def _lock_again_if_gone(self) -> None:
        """The folder deleted while the run trains (the save makes it again): its lock file went
        with it, and a second run of this name could start there; lock the name again (a run that
        did start there keeps its files: this one stops with one line instead of writing over them)."""
        if self._lock is None:
            return
        path, held = Path(self._lock.name), os.fstat(self._lock.fileno())
        with contextlib.suppress(OSError):
            now = os.stat(path)
            if (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev):
                return  # still the file this run locked
        self.path.mkdir(parents=True, exist_ok=True)
        stale, self._lock = self._lock, None
        stale.close()
        self._lock = _acquire_lock(path, self.name, self.path)

    def close(self) -> None:
        for pending in self._pending_grids.values():  # the run ended before its first save
            pending.unlink(missing_ok=True)
        self._pending_grids = {}
        if self._lock is not None:
            _release_lock(self._lock)
            self._lock = None

    def _check_writable(self, keep: bool = True) -> None:
        """save.path can be made and written; made to find out, and taken away again unless `keep`
        (a run that fails before it starts leaves no empty folder behind)."""
        parent = nearest_existing(self.path, "save.path: ")
        if not parent.is_dir():
            raise LecoError(f"save.path: {parent} is a file, not a folder; choose another save.path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise LecoError(f"save.path: {parent} is not writable; choose another save.path")
        made = []  # the folders the mkdir below makes, deepest first
        for folder in (self.path, *self.path.parents):
            try:
                if folder.exists():
                    break
            except OSError:  # a name too long, say: the mkdir below names the problem
                break
            made.append(folder)
        try:  # os.access passes for root, and on /proc and /sys, where mkdir then fails
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise LecoError(
                f"save.path: {self.path} cannot be made ({error.strerror or error}); choose another save.path"
            ) from None
        # Data-parallel: only the first process, which alone opens the folder later, takes it away (the
        # others could remove it between its mkdir and its lock; open() makes it again if another
        # run's check does).
        if not keep and is_main_process():
            for folder in made:  # the deepest first; one that something else filled meanwhile stays
                with contextlib.suppress(OSError):
                    folder.rmdir()
        for suffix in ("last", "interrupted"):
            if self.file(suffix).is_dir():
                raise LecoError(
                    f"save.path: {self.file(suffix)} is a folder; move it or choose another save.name"
                )
        if self.state_dir.exists() and not self.state_dir.is_dir():  # found only at the first save
            raise LecoError(
                f"save.path: {self.state_dir} is a file, where the run keeps its resumable state (a "
                "folder); move it or choose another save.name"
            )


class StopRequest:
    """Ctrl-C, SIGTERM or a hang-up (SIGHUP: the terminal or ssh session gone) asks the loop to stop
    after the current step and save; a second one aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []))
    # Set by the `leco` command: a second signal ends the process. In Python (a notebook, a script
    # calling leco.train) it raises KeyboardInterrupt, which the caller can catch.
    second_signal_ends_process = False

    def __init__(self) -> None:
        self.requested = False
        self.by_signal: int | None = None  # the signal that asked first
        self._previous: dict[int, Any] = {}
        self._saving = False  # a save is being written: a second signal waits for it to end
        self._abort_after_save = False
        self._second = signal.SIGINT  # the signal that asked to abort

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {
                s: signal.signal(s, self._handle)
                for s in self.SIGNALS
                # `nohup` ignores SIGHUP: so does the run (a shell's background job ignores SIGINT,
                # but one sent on purpose, `kill -INT`, still stops it)
                if not (s == getattr(signal, "SIGHUP", None) and signal.getsignal(s) is signal.SIG_IGN)
            }
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    @property
    def wants_exit_now(self) -> bool:
        """SIGTERM or a hang-up: a scheduler or a closed session that will not wait for extras (a
        job scheduler kills after a grace period); Ctrl-C is a person, who can press it again."""
        return self.requested and self.by_signal not in (None, signal.SIGINT)

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """A save in progress: aborting inside it would leave the file and the resumable state at
        different steps (or a traceback from inside torch.save), so a second signal aborts after it."""
        self._saving = True
        self._second_signal(abort_at_once=False)
        try:
            yield
        finally:
            self._saving = False
        if self._abort_after_save:
            self._abort_after_save = False
            raise _stop_now(self._second)
        self._second_signal(abort_at_once=True)

    def _second_signal(self, *, abort_at_once: bool) -> None:
        """Once a stop is asked for, a second signal ends the process at once, as the signal's
        default does: Python runs a handler only between bytecodes, so in a step's minutes-long
        torch call it would never run, and two Ctrl-Cs would count as one. A save waits for it; so
        do data-parallel processes, which end together through their launcher."""
        if not (self.requested and self.second_signal_ends_process):
            return
        if process_count() > 1:
            return
        if threading.current_thread() is threading.main_thread():
            for number in self._previous:
                signal.signal(number, signal.SIG_DFL if abort_at_once else self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and self._saving:
            self._abort_after_save, self._second = True, signum
            if is_main_process():  # data-parallel: the first process says so
                with contextlib.suppress(OSError):
                    message = "aborting once the file being saved is written"
                    print(f"\nleco: {message}", file=sys.stderr, flush=True)
            return
        if self.requested:
            raise _stop_now(signum)
        self.requested, self.by_signal = True, signum
        if not self._saving:
            self._second_signal(abort_at_once=True)
        if signum == getattr(signal, "SIGHUP", None):
            _leave_lost_terminal()
        if is_main_process():  # data-parallel: every process stops, the first one says so
            again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            message = f"stopping after this step and saving ({again} again aborts without saving)"
            with contextlib.suppress(OSError):  # where output goes may be gone; the save must not be
                print(f"\nleco: {message}", file=sys.stderr, flush=True)


def _stop_now(signum: int) -> BaseException:
    """What a second signal raises: Ctrl-C as Python raises it, others as leco's Terminated, so that
    the exit code is that signal's (130, 143, 129)."""
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _leave_lost_terminal() -> None:
    """After a hang-up, writing to the terminal fails (EIO) and would end the run before it saves:
    output meant for it goes nowhere instead (output into files or pipes stays where it was)."""
    with open(os.devnull, "w") as devnull:
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is None or not stream.isatty():
                    continue
            except Exception:  # a closed or replaced stream is no terminal to leave
                continue
            with contextlib.suppress(Exception):
                stream.flush()  # what is buffered goes now, or not at all
            with contextlib.suppress(Exception):
                os.dup2(devnull.fileno(), stream.fileno())


def run_metadata(
    config: Any,
    entries: list[Any],
    step: int,
    seed: int,
    resumes: list[dict[str, Any]] | None = None,
    trained_in: str = "fp32",
) -> dict[str, Any]:
    """What a trained file records about its run (besides the network's own keys); the model by
    the name the user gave, as kohya does (ink-digits, not the bundled folder's name). `resumes`:
    where the run was resumed with other settings (leco.config holds the latest ones);
    `trained_in`: the precision the steps ran in, which on a CPU may not be train.precision."""
    return {
        "leco.config": config.model_dump(mode="json"),
        "leco.prompts": [entry.model_dump() for entry in entries],
        "leco.step": str(step),
        "leco.seed": str(seed),
        **({"leco.resumes": resumes} if resumes else {}),
        "ss_steps": str(step),
        "ss_sd_model_name": recorded_model_name(config.pretrained_model.name_or_path),
        "ss_clip_skip": str(config.pretrained_model.clip_skip),  # "None" where unset, as kohya writes it
        "ss_mixed_precision": "no" if trained_in == "fp32" else trained_in,  # kohya's values
        **kohya_training_metadata(config.train, seed),
        **kohya_leco_metadata(config, entries),
    }


def kohya_training_metadata(train: Any, seed: int) -> dict[str, str]:
    """The training settings as kohya's trainers record them (ss_*), which metadata viewers (A1111's,
    Civitai's) show: the optimizer as its class's full name with its arguments, the lr, the schedule."""
    chosen = optimizer_class(train)
    arguments = ",".join(f"{key}={value}" for key, value in train.optimizer_args.items())
    return {
        "ss_optimizer": f"{chosen.__module__}.{chosen.__name__}" + (f"({arguments})" if arguments else ""),
        "ss_learning_rate": str(train.lr),
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_lr_warmup_steps": str(train.lr_warmup_steps),
        "ss_max_train_steps": str(train.iterations),
        "ss_seed": str(seed),
        "ss_max_grad_norm": str(train.max_grad_norm or 0.0),  # kohya: 0.0 clips nothing
        "ss_min_snr_gamma": str(train.min_snr_gamma),
    }


def kohya_leco_metadata(config: Any, entries: list[Any]) -> dict[str, str]:
    """What kohya's train_leco writes about its prompts, so that tools showing its files show ours:
    the count and first 16 of the pairs trained (an entry of many targets counts each)."""
    pairs = (  # a target_file of 100,000 lines: only the first 16 are built
        {
            "target": target,
            "positive": entry.role_text("positive", index),
            "unconditional": entry.role_text("unconditional", index),
            "neutral": entry.role_text("neutral", index),
            "action": entry.action,
            "multiplier": entry.multiplier,
            "weight": entry.weight,
        }
        for entry in entries
        for index, target in enumerate(entry.targets)
    )
    count = sum(len(entry.targets) for entry in entries)
    named = {"ss_leco_prompts_file": Path(config.prompts_file).name} if config.prompts_file else {}
    preview = json.dumps(list(itertools.islice(pairs, 16)), ensure_ascii=False)
    return {"ss_leco_prompt_count": str(count), **named, "ss_leco_preview": preview}


def resumed_with(state: dict[str, Any], config_json: str) -> list[dict[str, Any]]:
    """The run's resumes so far, this one added if it changes a setting: its step and each changed
    key as {"train.lr": [before, after]}, so a file trained in parts says how every part was run."""
    resumes = list(state.get("resumes", []))
    changed = _changed_keys(json.loads(state["config"]), json.loads(config_json))
    if changed:
        resumes.append({"step": state.get("step", 0), "changed": changed})
    return resumes


def _changed_keys(
    before: Any, after: Any, prefix: str = "", into_lists: bool = False
) -> dict[str, list[Any]]:
    """Each changed setting as {"train.lr": [before, after]}, in the order of the keys; with
    `into_lists`, lists of one length compared entry by entry (`prompts[4].guidance_scale`)."""
    changed: dict[str, list[Any]] = {}
    if isinstance(before, dict) and isinstance(after, dict):
        for key in dict.fromkeys([*before, *after]):
            changed |= _changed_keys(before.get(key), after.get(key), f"{prefix}{key}.", into_lists)
        return changed
    if into_lists and isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        for index, (one, other) in enumerate(zip(before, after, strict=True)):
            changed |= _changed_keys(one, other, f"{prefix.rstrip('.')}[{index}].", into_lists)
        return changed
    return {} if before == after else {prefix.rstrip("."): [before, after]}


def _first_difference(before: Any, after: Any, key: str) -> tuple[str, str, str] | None:
    """Where two saved settings first differ (into sections and lists: `prompts[4].guidance_scale`),
    with both values shown around where they differ."""
    changed = _changed_keys(before, after, f"{key}.", into_lists=True)
    if not changed:
        return None
    key, (before, after) = next(iter(changed.items()))
    one, other = json.dumps(before), json.dumps(after)
    start = next((i for i, (a, b) in enumerate(zip(one, other, strict=False)) if a != b), 0)
    start = max(0, min(start, len(one), len(other)) - 20)  # show the values from just before they part

    def window(text: str) -> str:
        part = text[start : start + 40]
        return ("..." if start else "") + part + ("..." if start + 40 < len(text) else "")

    return key, window(one), window(other)


def _written_by_leco(path: Path) -> bool:
    """Whether a .safetensors file carries the metadata every file leco trains has."""
    return "leco.version" in safetensors_metadata(path)


def _saved_step(path: Path) -> int | None:
    """The training step a leco file was saved at (its leco.step metadata), if it says."""
    step = safetensors_metadata(path).get("leco.step", "")
    return int(step) if step.isdigit() else None


def state_file_of(path: Path) -> Path:
    """The state file of a *_state folder (or that file itself); one line where there is none."""
    if not path.exists():
        raise LecoError(f"--resume: {path} not found; pass the *_state folder a run saved")
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file() or file.suffix != ".pt":  # a copy under another name is still a state
        inside = sorted(path.glob(f"*_state/{STATE_FILE}")) if path.is_dir() else []
        hint = f" (here: {', '.join(str(p.parent) for p in inside[:3])})" if inside else ""
        raise LecoError(f"--resume: {path} holds no {STATE_FILE}; pass the *_state folder a run saved{hint}")
    return file


# What Trainer.save writes, by type: a state missing one cannot continue the run exactly.
_STATE_PARTS = {
    "step": int,
    "seed": int,
    "trainable": dict,
    "optimizer": dict,
    "lr_scheduler": dict,
    "scaler": dict,
    "ranks": list,
}


def _processes(count: int) -> str:
    return "one process" if count == 1 else f"{count} data-parallel processes"


def _option_for(count: int) -> str:
    return "no --num-processes" if count == 1 else f"--num-processes {count}"


def read_state(path: str | Path, config_json: str, processes: int = 1) -> dict[str, Any]:
    """Load a state folder (or its file) and check it belongs to this config and process count."""
    file = state_file_of(Path(path))
    try:
        state = load_torch_file(file)
    except LecoError as reason:
        raise LecoError(f"--resume: {file} cannot be read ({reason})") from None
    try:
        saved = json.loads(state["config"])
    except (TypeError, KeyError, IndexError, ValueError):
        raise LecoError(
            f"--resume: {file} is not a leco training state (it holds no run config); "
            "pass the *_state folder a leco run saved"
        ) from None
    damaged = [key for key, kind in _STATE_PARTS.items() if not isinstance(state.get(key), kind)]
    if damaged:
        raise LecoError(
            f"--resume: {file} lacks its {', '.join(damaged)} (damaged, or edited by hand), so it cannot "
            "continue the run exactly; start the run again with --overwrite"
        )
    current = json.loads(config_json)
    for key in _MUST_MATCH:
        was = _with_later_defaults(key, saved.get(key), current.get(key))
        was = _moved_model(key, was, current.get(key), file)
        if _trained_part(was) != _trained_part(current.get(key)):
            first = _first_difference(_trained_part(was), _trained_part(current.get(key)), key)
            what = f" ({first[0]}: {first[1]} then, {first[2]} now)" if first else ""
            option = " (and the --prompts_file it was given, if any)" if key == "prompts" else ""
            raise LecoError(
                f"--resume: {file} was trained with a different `{key}` section{what}; resume with the "
                f"config that started the run{option} (only train/save/logging settings, offload, "
                "allow_pickle and rollout_share may change)"
            )
    # Their saved state is another kind's (sgd has no moments, amsgrad more of them, StepLR keeps its
    # step_size): continuing under other ones would fail, or silently keep the first run's.
    for key in ("optimizer", "optimizer_args", "lr_scheduler", "lr_scheduler_args"):
        was, now = saved.get("train", {}).get(key), current.get("train", {}).get(key)
        if was != now:
            raise LecoError(
                f"train.{key}: {now}, but {file} was trained with {was}; resume with {key}: {was} "
                "(train.lr and iterations may change)"
            )
    seed, run_seed = current.get("train", {}).get("seed"), state.get("seed")
    if seed not in (None, -1) and run_seed is not None and seed != run_seed:  # its streams are in the state
        raise LecoError(
            f"train.seed: {seed}, but {file} is a run of seed {run_seed}, whose random streams it continues; "
            f"resume with seed: {run_seed} (or leave it out), or start a new run for seed {seed}"
        )
    step, iterations = state.get("step", 0), current.get("train", {}).get("iterations")
    if isinstance(iterations, int) and step >= iterations:  # at ==, resuming would only rewrite its files
        where = f"finished (step {step})" if step == iterations else f"already at step {step}"
        raise LecoError(
            f"train.iterations: {iterations}, but the run in {path} is {where}; set it above {step} to "
            "train on from there"
        )
    if len(state.get("ranks", [])) != processes:
        raise LecoError(
            f"--resume: {file} was saved by {_processes(len(state.get('ranks', [])))}; resume with "
            f"{_option_for(len(state.get('ranks', [])))} (this run has {_processes(processes)})"
        )
    return state


@contextlib.contextmanager
def state_parts_of(path: str | Path) -> Iterator[None]:
    """Loading a state's optimizer and sampling parts: damage read_state's check of their kinds
    cannot see (a tensor of another shape, an edited entry) is one line naming the state."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        raise LecoError(
            f"--resume: {path}: its optimizer or sampling state cannot be read ({type(error).__name__}: "
            f"{str(error)[:100]}), so it cannot continue the run exactly; start the run again with "
            "--overwrite"
        ) from None


def _acquire_lock(path: Path, name: str, folder: Path) -> Any:
    """An OS lock on a small file: released by the OS even when the process is killed."""
    handle = open(path, "a+")  # noqa: SIM115 (held open for the whole run)
    try:
        _lock_file(handle)
    except OSError:
        raise _running_elsewhere(handle, name, folder) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def _refuse_if_locked(path: Path, name: str, folder: Path) -> None:
    """The lock taken and let go at once, its file left as it is (its owner, if any, keeps it)."""
    if not path.is_file():
        return
    try:
        handle = open(path)  # noqa: SIM115 (closed below, or by _running_elsewhere)
    except OSError:
        return  # unreadable: open() meets it when it locks
    try:
        _lock_file(handle)
    except OSError:
        raise _running_elsewhere(handle, name, folder) from None
    handle.close()  # closing lets go of the lock (flock, and msvcrt's with the handle)


def _running_elsewhere(handle: Any, name: str, folder: Path) -> LecoError:
    handle.seek(0)
    owner = handle.read().strip() or "another process"
    handle.close()
    return LecoError(
        f"save.path: another `leco train` ({owner}) is writing the run {name!r} in {folder}; "
        "wait for it to finish (then --resume or --overwrite it) or choose another save.name"
    )


def _lock_file(handle: Any) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _release_lock(handle: Any) -> None:
    # Removed while still locked. A process that opened the old file just before could then lock it
    # while a third locks a new one; both would still meet the files this run wrote and refuse.
    try:
        with contextlib.suppress(OSError):  # a folder gone read-only: what failed there is reported
            Path(handle.name).unlink(missing_ok=True)
    finally:
        handle.close()


def check_before_loading(
    config: LecoConfig, resume: Path | None, overwrite: bool, writes_files: bool = True
) -> RunFolder:
    """All that can be refused before minutes of loading: the combination of settings, the outputs
    (no earlier run silently replaced), the log folder and the packages asked for. The launcher of
    a data-parallel run calls it too, so one line is said once, not once per process.

    `writes_files` False: a data-parallel process other than the first, which writes nothing. It
    does not look at the outputs: the first process may have locked the run's name by then (its
    own run), which would read as another run writing there."""
    config.check_combination()
    folder = RunFolder(config.save.path, config.save.name, tensorboard_folder(config))
    if writes_files:
        folder.check(overwrite=overwrite, resume_source=resume, previews=bool(config.preview.prompts))
    check_log_folder(config)
    if config.train.method != "closed_form":  # an edit solved in one step has no optimizer
        check_optimizer(config.train)
    return folder
