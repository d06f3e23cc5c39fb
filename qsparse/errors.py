"""User errors: mistakes the user can fix, reported in one line by every command.

:class:`UserError` (a ``ValueError``) is the base of every error whose message names the setting
or file at fault, says what is wrong with it and how to fix it: a bad training config
(:class:`~qsparse.training.config.ConfigError`), an unusable checkpoint folder
(:class:`~qsparse.models.hf.CheckpointError`), an unreadable data file
(:class:`~qsparse.data.local_files.DataFileError`), a run directory that would be overwritten.
The command-line entry points print such an error as ``<prog>: <message>`` with exit status 2
and no traceback; ``HYDRA_FULL_ERROR=1`` (or ``--debug`` where a command has it) re-raises it
with the full traceback, as Hydra does for its own errors.
"""

from __future__ import annotations

import os
import sys

__all__ = ["UserError", "full_traceback_requested", "report"]


class UserError(ValueError):
    """A mistake the user can fix; the message names the setting or file and the fix."""


def full_traceback_requested(debug: bool = False) -> bool:
    """True with ``--debug`` (``debug``) or ``HYDRA_FULL_ERROR=1`` in the environment."""
    return debug or os.environ.get("HYDRA_FULL_ERROR", "") == "1"


def report(prog: str, exc: BaseException) -> int:
    """Print ``exc`` as one line ``<prog>: <message>`` on stderr; return the exit status (2)."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"{prog}: {message}", file=sys.stderr)
    return 2
