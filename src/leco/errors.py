"""The one exception type a user ever sees: a problem with their input, stated in one line."""


class LecoError(Exception):
    """A user-facing problem (bad config, missing file, unsupported model).

    The message is a complete sentence naming the file, the key and the fix; the CLI prints it
    without a traceback. Anything else that escapes is a bug in leco.
    """
