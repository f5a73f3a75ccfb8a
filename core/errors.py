"""What can go wrong in a run, as typed exceptions, and the exit code the CLI gives each.

The core raises; only the CLI turns an exception into an exit code (``exit_code_of``), so a
notebook or another tool calling ``lowmem.train`` gets exceptions, never ``sys.exit``.
"""

from __future__ import annotations

import signal
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # a plugin raised, replicas diverged, or an unexpected error
    BAD_INPUT = 2  # a ConfigError: options, files, checkpoints the run cannot use
    NONFINITE = 3  # the loss or gradient norm became NaN/inf
    INTERRUPTED = 130  # SIGINT (Ctrl-C): 128 + 2
    TERMINATED = 143  # SIGTERM: 128 + 15


class LowmemError(Exception):
    """Base of lowmem's own errors."""

    exit_code: ExitCode = ExitCode.FAILURE


class ConfigError(LowmemError, ValueError):
    """A user-facing configuration problem, reported on one line (exit 2)."""

    exit_code = ExitCode.BAD_INPUT


class CheckpointError(ConfigError):
    """A checkpoint that is missing, incomplete, corrupt or cannot be written; names the file."""


class NonFiniteError(LowmemError):
    """Loss or gradient norm became NaN or infinite; the update was not applied."""

    exit_code = ExitCode.NONFINITE


class PluginFault(LowmemError):
    """A plugin raised while lowmem was using it."""


class ReplicaMismatch(LowmemError):
    """The model replicas of a data-parallel run are no longer identical."""


class Interrupted(LowmemError):
    """SIGINT or SIGTERM stopped the run after its current step; a checkpoint was saved."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = ExitCode.INTERRUPTED if signum == signal.SIGINT else ExitCode.TERMINATED


def exit_code_of(exc: BaseException) -> ExitCode:
    """The one mapping from an exception to the process's exit code."""
    if isinstance(exc, LowmemError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    return ExitCode.FAILURE
