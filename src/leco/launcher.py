"""`leco train --num-processes N`: the same command in N data-parallel processes, through torchrun.

The launcher owns the terminal's signals: Ctrl-C reaches it alone, and it passes each on once to the
training processes (they save and stop) once they have told it they are ready for one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

from leco.errors import LecoError, stopped_exit_code


def check_process_count(count: int) -> None:
    import torch

    room = torch.cuda.device_count() if torch.cuda.is_available() else os.cpu_count() or 1
    if count > room:
        where = "GPUs" if torch.cuda.is_available() else "CPU cores"
        raise LecoError(
            f"--num-processes: {count} processes, but this machine has {room} {where}; use at most {room}"
        )


LAUNCHED_BY_LECO = "LECO_LAUNCHED_PROCESSES"  # set for the processes `--num-processes` starts


def launch_processes(count: int, words: list[str]) -> int:
    """Run this same `leco train` command in `count` processes with torchrun (data-parallel)."""
    import shutil
    import subprocess
    import tempfile
    import time

    # torchrun through run_torchrun below: quiet about a process that stopped on a bad input it said
    run = "from leco.launcher import run_torchrun; run_torchrun()"
    command = [sys.executable, "-c", run, "--standalone", f"--nproc_per_node={count}"]
    # Its own session: Ctrl-C in the terminal reaches this process only, and each signal is passed
    # on once, to the training processes themselves (they save and stop). torchrun, if signalled,
    # would pass it on too (a second signal to each: abort without saving) and print a traceback.
    # Each training process marks itself ready in this folder once its libraries are imported: a
    # signal during an import (its own or torchrun's) ends it with a Python traceback, or leaves a
    # module half-made that the next import trips over, so signals wait until then.
    ready = Path(tempfile.mkdtemp(prefix="leco-ready-"))
    environment = {**os.environ, LAUNCHED_BY_LECO: str(ready)}
    relay = _SignalRelay(ready)
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    previous = {  # before torchrun exists; a hang-up the caller ignores (`nohup`) stays ignored
        number: signal.signal(number, relay.receive)
        for number in stops
        if not (number == signal.SIGHUP and signal.getsignal(number) is signal.SIG_IGN)
    }
    try:
        argv = _without_num_processes(words)
        launcher = subprocess.Popen([*command, "-m", "leco", *argv], start_new_session=True, env=environment)
        relay.launchers.append(launcher)
        while (code := launcher.poll()) is None:
            time.sleep(0.1)
            relay.pass_on(launcher.pid)
        if (ready / ERROR_FILE).exists():  # a bad input a process found and said: as one process does
            return 2
        if relay.received and (code == 0 or code < 0):  # stopped and saved, or ended by a third signal:
            return stopped_exit_code(relay.received[0])  # what a single process says, not torchrun's 247
        return code
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        shutil.rmtree(ready, ignore_errors=True)


def _without_num_processes(words: list[str]) -> list[str]:
    """The command line the launched processes run: this one without --num-processes."""
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word == "--num-processes":
            skip = True
        elif not word.startswith("--num-processes="):
            kept.append(word)
    return kept


class _SignalRelay:
    """The launcher's signals, passed on once to each training process that is ready for them."""

    def __init__(self, ready: Path) -> None:
        self.ready = ready  # the folder where each process marks itself ready (its pid)
        self.received: list[int] = []
        self.passed_on: dict[int, int] = {}  # worker pid -> how many of `received` it was given
        self.launchers: list[Any] = []  # the torchrun process (a subprocess.Popen)

    def receive(self, number: int, frame: object) -> None:  # passed on by the launcher's loop, never twice
        self.received.append(number)
        if len(self.received) >= 3:  # one may be stuck where its handler cannot run: end them all now
            for launcher in self.launchers:
                for pid in [*child_processes(launcher.pid), launcher.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)

    def pass_on(self, launcher_pid: int) -> None:
        count = len(self.received)  # once: a signal arriving meanwhile is passed on next time
        # Where processes cannot be listed (no Linux /proc), torchrun passes it on, traceback and all.
        workers = child_processes(launcher_pid) if Path("/proc/self/task").is_dir() else [launcher_pid]
        for pid in workers:
            if pid == launcher_pid or (self.ready / str(pid)).exists():
                for number in self.received[self.passed_on.get(pid, 0) : count]:
                    # A hang-up (the terminal or ssh gone) is passed on as one: they save, and stop
                    # writing to that terminal. SIGQUIT stops them as SIGTERM does.
                    passed = number if number in (signal.SIGINT, signal.SIGHUP) else signal.SIGTERM
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, passed)
                self.passed_on[pid] = count


ERROR_FILE = "error"  # in the launcher's folder: a training process has said a bad input's line


def first_to_report_error() -> bool:
    """Whether this process says its bad input's one line: always alone; under `--num-processes`,
    only the first process to find one (each finds the same), which marks it for the launcher."""
    folder = os.environ.get(LAUNCHED_BY_LECO)
    if not folder:
        return True
    try:
        os.close(os.open(Path(folder) / ERROR_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:  # no mark can be left: say it anyway
        return True
    return True


class _QuietAfterError:
    """torchrun's stderr, silent once a training process has said its bad input: what torchrun
    adds then is its report of a failed process (a traceback), which the line already explains."""

    def __init__(self, stream: Any, mark: Path) -> None:
        self.stream, self.mark = stream, mark

    def write(self, text: str) -> int:
        return len(text) if self.mark.exists() else self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def run_torchrun() -> None:
    """torchrun's own entry point, for launch_processes; the training processes write to the
    terminal directly (their output is not touched), only torchrun's Python output is filtered."""
    mark = Path(os.environ[LAUNCHED_BY_LECO]) / ERROR_FILE
    sys.stderr = _QuietAfterError(sys.stderr, mark)  # before torch's loggers take hold of it
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    try:
        main(sys.argv[1:])
    except ChildFailedError:
        if not mark.exists():
            raise
        sys.exit(2)


def tell_launcher_ready() -> None:
    """Under `--num-processes`: this process now turns Ctrl-C into a clean stop (see launch_processes)."""
    folder = os.environ.get(LAUNCHED_BY_LECO)
    if folder and Path(folder).is_dir():
        with contextlib.suppress(OSError):
            (Path(folder) / str(os.getpid())).touch()


def child_processes(pid: int) -> list[int]:
    """The launcher's worker processes, from Linux's /proc; none where they cannot be listed."""
    children = []
    with contextlib.suppress(OSError, ValueError):  # any thread of it may have started them
        for thread in Path(f"/proc/{pid}/task").iterdir():
            children += [int(child) for child in (thread / "children").read_text().split()]
    return children
