"""The load generator's errors. Each knows its exit code; the CLI prints the message (no
traceback) and exits with it. Anything else escaping is a bug and keeps its traceback."""

from __future__ import annotations


class LoadgenError(Exception):
    """Base: the run cannot go on; the message says why and what to do."""

    exit_code = 1


class UsageError(LoadgenError):
    """Bad flags or inputs: fixing the command line fixes it."""

    exit_code = 2
