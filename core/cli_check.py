"""``lowmem check-optimizer NAME``: the conformance checks of ``lowmem.testing`` on the command line.
Registered on the main app by ``lowmem.cli``.

The table of checks goes to stdout (rich on a terminal, plain columns otherwise). Exit 0 when no
check fails (warnings allowed), 1 with a line per failed check on stderr, 2 with one line for an
unknown optimizer or a config file lowmem refuses.
"""

import time
from pathlib import Path
from typing import Annotated

import typer

from lowmem.cli_commands import LowmemCommand, exit_on_error
from lowmem.cli_options import Opt

check_app = typer.Typer(rich_markup_mode=None)


HELP = {"help_option_names": ["-h", "--help"]}


@check_app.command("check-optimizer", cls=LowmemCommand, context_settings=HELP)
def check_optimizer(
    name: Annotated[str, typer.Argument(help="A registered optimizer (lowmem list-optimizers)")],
    config: Annotated[Path | None, Opt("--config", help="JSON settings over its defaults")] = None,
) -> None:
    """Check an optimizer plugin against lowmem's contract on a tiny model (seconds, CPU): loss,
    state_dict round trip, bitwise resume, state_bytes, accumulation, LR schedule, per-layer."""
    with exit_on_error():
        from lowmem.registry import BUILT_IN, get_registry
        from lowmem.resolve import merge_layers, read_config_file

        registry = get_registry()
        plugin = registry.optimizer(name)
        values = read_config_file(config) if config is not None else {}
        merge_layers(plugin, [(str(config), values)] if values else [])  # exit 2 before torch loads
        from lowmem.testing import FAIL, WARN
        from lowmem.testing import check_optimizer as run_checks

        started = time.perf_counter()
        results = run_checks(plugin, values)
        seconds = time.perf_counter() - started
    from lowmem.cli import print_rows

    origin = registry.optimizers[name].origin
    title = f"check-optimizer {name} ({'built-in' if origin == BUILT_IN else origin})"
    print_rows(title, ("check", "status", "detail"), [(r.name, r.status, r.reason) for r in results])
    failed = [r for r in results if r.status == FAIL]
    warned = sum(r.status == WARN for r in results)
    typer.echo(f"{len(results) - len(failed) - warned} passed, {warned} warning{'s' * (warned != 1)}, "
               f"{len(failed)} failed in {seconds:.1f} s")
    for result in failed:
        typer.echo(f"error: {name}: {result.name}: {result.reason}", err=True)
    if failed:
        raise typer.Exit(1)
