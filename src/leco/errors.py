"""The one exception type a user ever sees: a problem with their input, stated in one line; and
warnings, which go where errors go (stderr), so that output piped elsewhere stays clean."""

import os
import signal
import sys


class LecoError(Exception):
    """A user-facing problem (bad config, missing file, unsupported model).

    The message is a complete sentence naming the file, the key and the fix; the CLI prints it
    without a traceback. Anything else that escapes is a bug in leco.
    """


def warn(message: str) -> None:
    """`leco: warning: <message>` on stderr."""
    print(f"leco: warning: {message}", file=sys.stderr, flush=True)


def process_count() -> int:
    """How many data-parallel processes this run has (WORLD_SIZE, as launchers set it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1  # distributed.Ranks names the bad value


def is_main_process() -> bool:
    """False only in a data-parallel process other than the first, which leaves messages to it.
    RANK alone (a variable left over in a shell) does not count: without WORLD_SIZE > 1 there is
    one process, and it must speak."""
    return process_count() <= 1 or os.environ.get("RANK", "0") == "0"


class Terminated(BaseException):  # noqa: N818 (a signal, as KeyboardInterrupt is)
    """SIGTERM or a hang-up outside training's own handlers. Not a KeyboardInterrupt: CPython ends a
    process that saw one by killing itself with SIGINT at exit (exit code -2, not leco's 143)."""

    def __init__(self, signal_number: int = signal.SIGTERM) -> None:
        super().__init__(signal_number)
        self.signal_number = int(signal_number)


def stopped_exit_code(signal_number: int | None) -> int:
    """The shell's convention for a process a signal ended, 128 + its number: 130 for Ctrl-C, 143 for
    SIGTERM, 129 for a hang-up; schedulers and `wait` read it as that signal."""
    return 128 + int(signal_number if signal_number is not None else signal.SIGINT)


def first_line(error: BaseException, limit: int | None = 160) -> str:
    """A library error's first line, for one-line messages (its name when it says nothing)."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    line = text.splitlines()[0]
    if limit is None or len(line) <= limit:
        return line
    sentence = line.split(". ")[0] + "."  # a whole sentence reads better than one cut mid-word
    return sentence if len(sentence) <= limit else line[: limit - 3].rstrip() + "..."


def check_flags(**flags: object) -> None:
    """Python callers' yes/no arguments: a string such as "no" would read as true (and replace
    earlier outputs)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise LecoError(f"{name}: {value!r}; give True or False")


def check_list(name: str, value: object, of: str) -> None:
    """A list where one is expected: a string would be read character by character."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise LecoError(f"{name}: {value!r} is not a list; give a list of {of}, e.g. [{value!r}]")
