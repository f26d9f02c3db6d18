"""The two kinds of failure a user can be told about in one line.

The CLI prints the message and exits with ``exit_code``; everything else is a bug and keeps
its traceback.
"""


class LocsortError(Exception):
    """Something went wrong while running (bad data, disk, ...): exit code 1."""

    exit_code = 1


class UsageError(LocsortError):
    """The command or its inputs are wrong (path, format, options): exit code 2."""

    exit_code = 2
