"""The CLI's own errors, each carrying its exit code (the policy is in `fedldm --help`).

0 ok; 2 bad input (bad flags, bad data, bad config, a missing file, refused by a check);
1 runtime failure (a step that should have worked did not: a SuperLink that does not answer, a
run that failed). `cli.main` prints an expected error as one line `fedldm <command>: <message>`
on stderr, without a traceback.
"""

from __future__ import annotations


class CommandError(Exception):
    """An expected failure of a command; the message names the flag or file and the fix."""

    exit_code = 2


class BadInput(CommandError):
    """Bad input: a flag, a file or data the command cannot use (exit 2)."""

    exit_code = 2


class RuntimeFailure(CommandError):
    """A step that should have worked failed at run time (exit 1)."""

    exit_code = 1


class UsageError(BadInput):
    """argparse refused the command line; `prog` is the (sub)command that refused it."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog
