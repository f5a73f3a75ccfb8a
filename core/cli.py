"""The ``lowmem`` command line: thin option parsing over the core.

Options are checked in callbacks (``typer.BadParameter`` -> exit 2); ``train`` builds a
``TrainConfig`` from them and makes one call into the core. Heavy libraries are imported only
inside the commands that train or build models.
"""

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from lowmem.cli_check import check_app
from lowmem.cli_commands import LowmemCommand, LowmemGroup, exit_on_error, is_main_process, start_processes
from lowmem.cli_options import (
    NPROC,
    Opt,
    config_from_options,
    existing_file,
    positive_int,
    with_parameters,
)
from lowmem.cli_reports import reports_app
from lowmem.registry import BUILT_IN, get_registry

# Plain (click-style) help: typer's rich help renderer costs ~95 ms of imports on every --help.
app = typer.Typer(
    name="lowmem",
    cls=LowmemGroup,
    rich_markup_mode=None,
    help="Memory-efficient training of language models: AdamW, LoRA, GaLore, 8-bit GaLore and plugins.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Optimizer configuration files.", no_args_is_help=True, cls=LowmemGroup,
                         rich_markup_mode=None)
app.add_typer(config_app, name="config")
app.add_typer(reports_app)  # estimate, compare, plot: top-level commands
app.add_typer(check_app)  # check-optimizer

@app.command(cls=LowmemCommand, context_settings={"help_option_names": ["-h", "--help"]})
@with_parameters(NPROC)
def train(**options: Any) -> None:
    """Train MODEL with OPTIMIZER and write a self-contained run folder."""
    nproc = options.pop("nproc")
    config = config_from_options(options)
    with exit_on_error():
        start_processes(nproc, config)
        from lowmem.training import train as train_run

        result = train_run(config)
    from lowmem.cli_reports import print_result

    if is_main_process():
        print_result(result)


# -- listings ----------------------------------------------------------------------------------
def _print_table(title: str, attr: str) -> None:
    rows = []
    for name, entry in sorted(getattr(get_registry(), attr).items()):
        origin = entry.origin if entry.origin != BUILT_IN else "built-in"
        if entry.conflicts:
            origin += " (conflicts with " + ", ".join(entry.conflicts) + ")"
        rows.append((name, entry.obj.description, origin))
    print_rows(title, ("name", "description", "from"), rows)


def print_rows(title: str, header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    """A rich table on a terminal; plain aligned columns in pipes and files (and no rich import,
    which keeps the listings' start-up short)."""
    if not sys.stdout.isatty():
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        print(title)
        for row in [header, *rows]:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        return
    from rich.markup import escape
    from rich.table import Table

    from lowmem.progress import results_console

    table = Table(title=title)
    for column in header:
        table.add_column(column)
    for row in rows:
        table.add_row(*map(escape, row))
    results_console().print(table)


@app.command("list-optimizers", cls=LowmemCommand)
def list_optimizers() -> None:
    """The registered optimizers."""
    _print_table("optimizers", "optimizers")


@app.command("list-models", cls=LowmemCommand)
def list_models() -> None:
    """The registered models."""
    _print_table("models", "models")


@app.command("list-datasets", cls=LowmemCommand)
def list_datasets() -> None:
    """The registered datasets."""
    _print_table("datasets", "datasets")


@app.command("plugins", cls=LowmemCommand)
def plugins() -> None:
    """Every loaded plugin: where it comes from, its hooks, and whether it loaded."""
    rows = [(info.name, info.origin, ", ".join(info.hooks), info.status) for info in get_registry().plugins]
    print_rows("plugins", ("name", "from", "hooks", "status"), rows)


@app.command(cls=LowmemCommand, context_settings={"help_option_names": ["-h", "--help"]})
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (with model/)")],
    prompt: Annotated[str | None, Opt("--prompt", help="The text to continue or answer")] = None,
    messages: Annotated[Path | None, Opt("--messages", callback=existing_file,
                                         help="A JSON file of {role, content} messages")] = None,
    max_new_tokens: Annotated[int, Opt("--max-new-tokens", callback=positive_int)] = 64,
) -> None:
    """Let a finished run's model answer a prompt (chat runs: in their chat template)."""
    with exit_on_error():
        from lowmem.errors import ConfigError
        from lowmem.generate import generate as answer
        from lowmem.generate import read_messages

        if (prompt is None) == (messages is None):
            raise ConfigError("give --prompt or --messages (one of them)")
        conversation = read_messages(Path(messages)) if messages is not None else None
        typer.echo(answer(run_dir, prompt, conversation, max_new_tokens))


@config_app.command("show", cls=LowmemCommand)
def config_show(name: Annotated[str, typer.Argument(help="An optimizer name")]) -> None:
    """Print an optimizer's default settings as a starting JSON file."""
    with exit_on_error():
        optimizer = get_registry().optimizer(name)
        typer.echo(json.dumps(optimizer.default_config, indent=2))


def main() -> None:
    app(prog_name="lowmem")
