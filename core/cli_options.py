"""Option checks shared by the CLI's commands: each raises ``typer.BadParameter`` (exit 2 with
one line naming the option), and ``clean_errors`` turns a ``ConfigError`` into the same."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import typer

from lowmem.api import ConfigError
from lowmem.config import parse_bool, parse_count

Opt = typer.Option


@contextmanager
def clean_errors():
    """Bad input ends in one line on stderr and exit code 2, never a traceback."""
    try:
        yield
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


# -- option callbacks --------------------------------------------------------------------------
def positive_int(value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise typer.BadParameter(f"must be a positive integer, got {value}")
    return value


def non_negative_int(value: int | None) -> int | None:
    if value is not None and value < 0:
        raise typer.BadParameter(f"must be 0 or more, got {value}")
    return value


def positive_float(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise typer.BadParameter(f"must be a positive number, got {value}")
    return value


def non_negative_float(value: float | None) -> float | None:
    if value is not None and not value >= 0:
        raise typer.BadParameter(f"must be 0 or more, got {value}")
    return value


def boolean(value: str | None) -> bool | None:
    if value is None:
        return None
    try:
        return parse_bool(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{exc}; use true or false") from None


def count(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        count = parse_count(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if count <= 0:
        raise typer.BadParameter(f"must be positive, got {value}")
    return count


def choice(choices: tuple[str, ...]):
    def check(value: str | None) -> str | None:
        if value is not None and value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of: {', '.join(choices)}")
        return value

    return check


def existing_file(value: Path | None) -> Path | None:
    if value is not None and value.is_dir():
        raise typer.BadParameter(f"{str(value)!r} is a directory, not a file")
    if value is not None and not value.is_file():
        raise typer.BadParameter(f"file {str(value)!r} does not exist")
    return value


def size(value: str | None) -> int | None:
    if value is None:
        return None
    from lowmem.config import parse_bytes

    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
