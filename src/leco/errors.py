"""The one exception type a user ever sees: a problem with their input, stated in one line; and
warnings, which go where errors go (stderr), so that output piped elsewhere stays clean."""

import sys


class LecoError(Exception):
    """A user-facing problem (bad config, missing file, unsupported model).

    The message is a complete sentence naming the file, the key and the fix; the CLI prints it
    without a traceback. Anything else that escapes is a bug in leco.
    """


def warn(message: str) -> None:
    """`leco: warning: <message>` on stderr."""
    print(f"leco: warning: {message}", file=sys.stderr, flush=True)
