"""The shape of every lowmem command, and the one place errors become exit codes: a usage
error (unknown option, bad value) and a lowmem error alike end in one line on stderr and the
exit code the error names, never a traceback or a usage block."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import typer
import typer.core

from lowmem.errors import ConfigError, LowmemError, PluginFault, exit_code_of


class _HelpFlagDefaultsFalse:
    """Typer checks every option value through a pydantic adapter, except bool flags whose value
    already is a bool. Its --help flag defaults to None, so every command (even
    ``list-optimizers``) would import pydantic (~80 ms); a False default skips that."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None and option.default is None:
            option.default = False
        return option


class LowmemGroup(_HelpFlagDefaultsFalse, typer.core.TyperGroup):
    """The app's and sub-apps' command group (``typer.Typer(cls=LowmemGroup)``)."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, windows_expand_args: bool = True,
             **extra: Any) -> Any:
        """Typer's, except that a usage error prints ``error: <what>`` alone (Click's usage block
        and hint would make it four lines) and exits 2."""
        run = dict(args=args, prog_name=prog_name, complete_var=complete_var,
                   windows_expand_args=windows_expand_args, **extra)
        if not standalone_mode:
            return super().main(standalone_mode=False, **run)
        try:
            code = super().main(standalone_mode=False, **run)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        except typer.TyperException as exc:  # Click's exceptions: usage errors, bad values
            message = getattr(exc, "format_message", None)
            if type(exc).__name__ == "NoArgsIsHelpError" or not callable(message):
                exc.show()  # type: ignore[attr-defined]  # `lowmem` alone: the help
            else:
                typer.echo(f"error: {message()}", err=True)
            sys.exit(getattr(exc, "exit_code", 2))
        sys.exit(code if isinstance(code, int) else 0)


class LowmemCommand(_HelpFlagDefaultsFalse, typer.core.TyperCommand):
    """Every command's class (``@app.command(cls=LowmemCommand)``)."""


@contextmanager
def exit_on_error() -> Iterator[None]:
    """Every lowmem error ends in one line on stderr (rank 0 only under a launcher) and the
    exit code its ``ExitCode`` names; never a traceback."""
    try:
        yield
    except LowmemError as exc:
        if os.environ.get("RANK", "0") == "0":
            prefix = "" if exc.exit_code >= 128 else "error: "
            suffix = " (checkpoints already saved are intact)" if isinstance(exc, PluginFault) else ""
            typer.echo(f"{prefix}{exc}{suffix}", err=True)
        raise typer.Exit(int(exit_code_of(exc))) from None


def start_processes(nproc: int, config: Any) -> None:
    """``--nproc N`` (or an ``accelerate launch`` that started one process where it was asked for
    N): check ``config`` once, then run this command again in N processes through torchrun and
    exit with their code. Returns where this process is to do the work itself."""
    from lowmem.distributed import processes_to_start

    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1:  # a launcher started the processes: this is one of them
        if nproc not in (1, launched):
            raise ConfigError(f"--nproc {nproc} under a launcher that started {launched} processes; "
                              "give the count once: drop --nproc, or launch with lowmem alone")
        return
    asked = processes_to_start(dict(os.environ))
    if asked > 1 and nproc not in (1, asked):
        raise ConfigError(f"--nproc {nproc} and accelerate's --num_processes {asked} disagree; give the "
                          "count once")
    nproc = max(nproc, asked)
    if nproc > 1:
        from lowmem.launch import launch_torchrun
        from lowmem.registry import get_registry
        from lowmem.resolve import resolve_config

        # Bad input is found here, once, before any process starts.
        resolve_config(config, get_registry(), say=lambda message: None)
        raise typer.Exit(launch_torchrun(nproc, sys.argv))


def is_main_process() -> bool:
    """Under a launcher, rank 0 alone prints results and writes shared reports."""
    return os.environ.get("RANK", "0") == "0"
