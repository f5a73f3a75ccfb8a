"""``lowmem estimate``, ``lowmem compare`` and ``lowmem plot``: the commands that answer "will it
fit, and what does it cost?". Registered on the main app by ``lowmem.cli``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from lowmem.api import ConfigError
from lowmem.cli_options import Opt, choice, clean_errors, existing_file, positive_int, size
from lowmem.config import DTYPES, MODES

reports_app = typer.Typer()


@reports_app.command(context_settings={"help_option_names": ["-h", "--help"]})
def estimate(
    model: Annotated[str, Opt("--model", help="A registered model (lowmem list-models)")],
    optimizer: Annotated[str | None, Opt("--optimizer", help="One optimizer (default: all, side by side)")] = None,
    all_optimizers: Annotated[bool, Opt("--all", help="Every registered optimizer side by side")] = False,
    mode: Annotated[str, Opt("--mode", callback=choice(MODES))] = "pretraining",
    batch_size: Annotated[int, Opt("--batch_size", "--batch-size", callback=positive_int)] = 1,
    max_length: Annotated[int, Opt("--max_length", "--max-length", callback=positive_int)] = 256,
    dtype: Annotated[str, Opt("--dtype", callback=choice(DTYPES))] = "bf16",
    per_layer: Annotated[bool, Opt("--per-layer", "--per_layer", help="Per-layer mode (optimizers with a 'per_layer' setting)")] = False,
    grad_accum: Annotated[int, Opt("--grad-accum", "--grad_accum", callback=positive_int)] = 1,
    device_memory: Annotated[str | None, Opt("--device-memory", "--device_memory", callback=size, help="Say whether it fits: 24GB, 80GiB")] = None,
    optimizer_config: Annotated[Path | None, Opt("--optimizer-config", "--optimizer_config", callback=existing_file, help="JSON settings overriding the optimizer's defaults")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print JSON instead of a table")] = False,
) -> None:
    """Estimate the memory training MODEL takes with each optimizer, without training (meta device)."""
    with clean_errors():
        from lowmem.cli import registry
        from lowmem.estimate import estimate_many, print_estimates

        if optimizer is not None and all_optimizers:
            raise ConfigError("give --optimizer or --all, not both")
        results = estimate_many(
            registry(), model, optimizer, mode=mode, batch_size=batch_size, max_length=max_length, dtype=dtype,
            per_layer=per_layer, grad_accum=grad_accum, optimizer_config_file=optimizer_config,
        )
        print_estimates(results, device_memory, as_json=as_json)  # type: ignore[arg-type]  # the size callback made it int


@reports_app.command(context_settings={
    "allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": ["-h", "--help"],
})
def compare(
    ctx: typer.Context,
    optimizers: Annotated[str, Opt("--optimizers", help="Comma-separated optimizers, e.g. baseline,lora,galore")],
    output_dir: Annotated[Path, Opt("--output-dir", "--output_dir", help="Parent folder: one run folder per optimizer, plus compare.json/.md/.png")],
) -> None:
    """Train with several optimizers under the same settings and compare them.

    Takes every `lowmem train` option (--mode, --model, budgets, config files, ...)."""
    with clean_errors():
        from lowmem.compare import parse_optimizer_list

        try:
            names = parse_optimizer_list(optimizers)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--optimizers") from None
        # Let `train` itself parse and check the remaining options: one definition of each.
        train_command = ctx.find_root().command.commands["train"]  # type: ignore[attr-defined]
        train_args = [*ctx.args, "--optimizer", names[0]]
        train_context = train_command.make_context("lowmem compare", train_args, parent=ctx)
        params = dict(train_context.params)
        if params.pop("nproc", 1) != 1:
            raise ConfigError("compare runs on one process; --nproc is not supported here")
        if params.get("output_dir") is not None or params.get("resume"):
            raise ConfigError("compare chooses each run's folder under --output-dir; --resume is not supported")
        from lowmem.cli import registry

        for name in names:
            registry().optimizer(name)  # unknown names fail before anything trains
        from lowmem.compare import print_table, run_all, write_reports

        output_dir.mkdir(parents=True, exist_ok=True)
        results = run_all(params, names, output_dir, registry(), environ=dict(os.environ))
        settings = {**params, "optimizers": names, "output_dir": str(output_dir)}
        write_reports(output_dir, results, settings)
        print_table(results, f"lowmem compare: {params['model']} ({params['mode']})")
        from lowmem.plots import PlotUnavailable, write_compare_plot

        try:
            write_compare_plot(results, output_dir / "compare.png")
            written = "compare.json, compare.md, compare.png"
        except PlotUnavailable as exc:
            typer.echo(f"note: {exc}; compare.png not written", err=True)
            written = "compare.json, compare.md"
        typer.echo(f"wrote {written} in {output_dir}")
        if all(r.status != "ok" for r in results):
            raise typer.Exit(1)


@reports_app.command(context_settings={"help_option_names": ["-h", "--help"]})
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders (each with metrics.jsonl)")],
    output: Annotated[Path, Opt("--output", "-o", help="PNG file to write")] = Path("loss.png"),
) -> None:
    """Plot the training-loss curves of existing runs on one chart."""
    with clean_errors():
        for run_dir in run_dirs:
            if not (run_dir / "metrics.jsonl").is_file():
                raise ConfigError(f"{run_dir} has no metrics.jsonl: not a lowmem run folder")
        from lowmem.plots import PlotUnavailable, write_loss_plot

        try:
            drawn = write_loss_plot(run_dirs, output)
        except PlotUnavailable as exc:
            raise ConfigError(str(exc)) from None
        typer.echo(f"wrote {output} ({drawn} curve{'s' if drawn != 1 else ''})")
