"""``lowmem estimate``, ``lowmem compare`` and ``lowmem plot``: the commands that answer "will it
fit, and what does it cost?", and the end-of-run table. Registered on the main app by
``lowmem.cli``."""

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from lowmem.cli_commands import LowmemCommand, exit_on_error, is_main_process, start_processes
from lowmem.cli_options import (
    NPROC,
    Opt,
    choice,
    config_from_options,
    existing_file,
    positive_int,
    size,
    with_parameters,
)
from lowmem.config import BF16_ROUNDINGS, DEVICES, DTYPES, MODES, PARALLEL, default_of
from lowmem.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from lowmem.result import RunResult

reports_app = typer.Typer(rich_markup_mode=None)


def optimizer_list(value: str | None) -> str | None:
    """Checks a comma-separated list as `lowmem compare --optimizers` does ("all" is --all)."""
    if value is not None:
        from lowmem.compare import ALL, parse_optimizer_list

        try:
            if parse_optimizer_list(value) == [ALL]:
                raise ValueError("use --all (or leave --optimizer out) for every optimizer")
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


@reports_app.command(cls=LowmemCommand, context_settings={"help_option_names": ["-h", "--help"]})
def estimate(
    model: Annotated[str, Opt("--model", help="A registered model (lowmem list-models)")],
    optimizer: Annotated[str | None, Opt("--optimizer", callback=optimizer_list, help=(
        "One optimizer, or several comma-separated (default: all, side by side)"))] = None,
    all_optimizers: Annotated[bool, Opt("--all", help="Every registered optimizer side by side")] = False,
    mode: Annotated[str, Opt("--mode", callback=choice(MODES))] = "pretraining",
    dataset: Annotated[str | None, Opt("--dataset", help=(
        "As train's: a registered dataset or a folder/file of your data; its layout decides what "
        "the model is trained for (default: the mode's dataset)"))] = None,
    batch_size: Annotated[int, Opt("--batch_size", "--batch-size", callback=positive_int)] = 1,
    max_length: Annotated[int | None, Opt("--max_length", "--max-length", callback=positive_int, help=(
        f"Tokens per sequence (default: train's, {default_of('max_length')}, or the model's context "
        "where that is shorter)"))] = None,
    dtype: Annotated[str, Opt("--dtype", callback=choice(DTYPES))] = "bf16",
    per_layer: Annotated[bool, Opt("--per-layer", "--per_layer",
                                   help="Per-layer mode (optimizers with a 'per_layer' setting)")] = False,
    grad_accum: Annotated[int, Opt("--grad-accum", "--grad_accum", callback=positive_int)] = 1,
    device_memory: Annotated[str | None, Opt("--device-memory", "--device_memory", callback=size,
                                             help="Say whether it fits: 24GB, 80GiB")] = None,
    optimizer_config: Annotated[Path | None, Opt(
        "--optimizer-config", "--optimizer_config", callback=existing_file,
        help="JSON settings overriding the optimizer's defaults")] = None,
    lora_config: Annotated[Path | None, Opt(
        "--lora_config", "--lora-config", callback=existing_file,
        help="JSON LoRA settings (optimizers that read them), as train's")] = None,
    galore_config: Annotated[Path | None, Opt(
        "--galore_config", "--galore-config", callback=existing_file,
        help="JSON GaLore settings (optimizers that read them), as train's")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print JSON instead of a table")] = False,
    checkpointing: Annotated[bool, Opt("--activation-checkpointing", "--activation_checkpointing",
                                       "--gradient-checkpointing", "--gradient_checkpointing",
                                       help="With activation checkpointing")] = False,
    lean_loss: Annotated[bool, Opt("--lean-loss", "--lean_loss",
                                   help="With the chunked causal-LM loss")] = False,
    gpu_memory: Annotated[str | None, Opt(
        "--gpu-memory", "--gpu_memory", callback=size,
        help="What fits: the largest batch per optimizer, e.g. 24GiB")] = None,
    nproc: Annotated[int, Opt("--nproc", callback=positive_int, help="Processes (with --parallel fsdp: "
                              "the figures of one of them)")] = 1,
    parallel: Annotated[str, Opt("--parallel", callback=choice(PARALLEL), help="ddp or fsdp")] = "ddp",
    bf16_rounding: Annotated[str, Opt("--bf16-rounding", "--bf16_rounding", callback=choice(BF16_ROUNDINGS),
                                      help="With --dtype bf16-pure: kahan, stochastic or nearest")] = "kahan",
    device: Annotated[str, Opt("--device", callback=choice(DEVICES), help=(
        "The run's device: cuda (auto, the default: a GPU run, on any machine) or cpu"))] = "auto",
) -> None:
    """Estimate the memory training MODEL takes with each optimizer, without training (meta device).

    With --gpu-memory: the largest batch at --max_length that fits, per optimizer, with and without
    activation checkpointing."""
    with exit_on_error():
        from lowmem.estimate_many import estimate_many
        from lowmem.estimate_report import print_estimates
        from lowmem.registry import get_registry

        if optimizer is not None and all_optimizers:
            raise ConfigError("give --optimizer or --all, not both")
        asked: str | list[str] | None = optimizer
        if optimizer is not None and "," in optimizer:
            from lowmem.compare import parse_optimizer_list

            asked = parse_optimizer_list(optimizer)  # checked by optimizer_list already
        if device == "auto":
            # A GPU run wherever the estimate is made: "what fits" is a GPU's question, and one
            # default keeps a plain estimate and the --gpu-memory search the same sum.
            device = "cuda"
        options: dict[str, Any] = dict(mode=mode, batch_size=batch_size, max_length=max_length, dtype=dtype,
                                       per_layer=per_layer, grad_accum=grad_accum,
                                       optimizer_config_file=optimizer_config, lora_config_file=lora_config,
                                       galore_config_file=galore_config, lean_loss=lean_loss,
                                       world_size=nproc, parallel=parallel, bf16_rounding=bf16_rounding,
                                       device=device, dataset=dataset)
        if gpu_memory is not None:
            from lowmem.estimate_report import print_fits

            given = (("--batch_size", batch_size != 1), ("--device-memory", device_memory),
                     ("--activation-checkpointing", checkpointing))
            ignored = ", ".join(flag for flag, value in given if value)
            if ignored:  # the search sets the batch and shows both; a note on stderr, not in the JSON
                typer.echo(f"note: with --gpu-memory, {ignored} is not used: the batch is searched, with "
                           "and without checkpointing", err=True)
            plain = estimate_many(get_registry(), model, asked, checkpointing=False, **options)
            try:
                recomputed = estimate_many(get_registry(), model, asked, checkpointing=True, **options)
            except ConfigError as exc:  # one optimizer asked, on a model that cannot checkpoint
                recomputed = dict.fromkeys(plain, str(exc))
            print_fits(plain, recomputed, cast(int, gpu_memory), as_json=as_json)
            return
        results = estimate_many(get_registry(), model, asked, checkpointing=checkpointing, **options)
        # The size callback turned the text into bytes.
        print_estimates(results, cast("int | None", device_memory), as_json=as_json)


COMPARE_OPTIONS = (
    inspect.Parameter("optimizers", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[
        str, Opt("--optimizers", help="Comma-separated optimizers, e.g. baseline,lora,galore; "
                 "'all': every installed optimizer")]),
    inspect.Parameter("output_dir", inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[
        Path, Opt("--output-dir", "--output_dir",
                  help="Parent folder: one run folder per optimizer, plus compare.json/.md/.png")]),
)


@reports_app.command(cls=LowmemCommand, context_settings={"help_option_names": ["-h", "--help"]})
@with_parameters(*COMPARE_OPTIONS, NPROC, leave_out=("optimizer", "output_dir", "resume"))
def compare(**options: Any) -> None:
    """Train with several optimizers under the same settings and compare them, sorted by peak memory.

    Takes every `lowmem train` option (--mode, --model, budgets, config files, --nproc, ...)."""
    from lowmem.compare import parse_optimizer_list

    nproc = options.pop("nproc")

    try:
        asked = parse_optimizer_list(options.pop("optimizers"))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--optimizers") from None
    parent: Path = options.pop("output_dir")
    with exit_on_error():
        from lowmem.compare import by_peak_memory, optimizer_names, print_table, run_all, write_reports
        from lowmem.plots import write_compare_plot
        from lowmem.registry import get_registry

        registry = get_registry()
        names, skipped = optimizer_names(asked, registry)  # unknown names fail before anything trains
        for name in skipped:
            typer.echo(f"compare: {name} left out: {registry.optimizers[name].obj.description}", err=True)
        if not names:
            raise ConfigError("no installed optimizer to compare")
        base = config_from_options(options, optimizer=names[0])
        start_processes(nproc, base)
        parent.mkdir(parents=True, exist_ok=True)
        reference = registry.reference_optimizer()
        main = is_main_process()
        runs = run_all(base, names, parent, registry, say=None if main else lambda message: None)
        if main:
            write_reports(parent, runs, base, reference)
            print_table(runs, f"lowmem compare: {base.model} ({base.mode})", reference)
            write_compare_plot(by_peak_memory(runs), parent / "compare.png")
            typer.echo(f"wrote compare.json, compare.md, compare.png in {parent}")
        if all(r.result is None for r in runs):
            raise typer.Exit(1)


@reports_app.command(cls=LowmemCommand, context_settings={"help_option_names": ["-h", "--help"]})
def plot(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders (each with metrics.jsonl)")],
    output: Annotated[Path, Opt("--output", "-o", help="PNG file to write")] = Path("loss.png"),
) -> None:
    """Plot the training-loss curves of existing runs on one chart."""
    with exit_on_error():
        for run_dir in run_dirs:
            if not (run_dir / "metrics.jsonl").is_file():
                raise ConfigError(f"{run_dir} has no metrics.jsonl: not a lowmem run folder")
        from lowmem.plots import write_loss_plot

        drawn = write_loss_plot(run_dirs, output)
        typer.echo(f"wrote {output} ({drawn} curve{'s' if drawn != 1 else ''})")


def print_result(result: "RunResult") -> None:
    """The end-of-run table, on stdout: results are output, progress is not."""
    from rich.table import Table

    from lowmem.progress import results_console
    from lowmem.text import format_bytes

    table = Table(title=f"lowmem run: {result.model} / {result.optimizer}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.to_json().items():
        if key in ("model", "optimizer", "output_dir") or value is None:
            continue
        if key == "per_process":  # one row per process, when there are several
            for figures in value if len(value) > 1 else ():
                shown = ", ".join(f"{name[:-6].replace('_', ' ')} {format_bytes(figures[name])}"
                                  for name in figures if name.endswith("_bytes"))
                table.add_row(f"rank {figures['rank']}", shown)
            continue
        if key.endswith("_bytes") and isinstance(value, int):
            shown = format_bytes(value)
        elif isinstance(value, float):
            shown = f"{value:.4g}"
        else:
            shown = f"{value:,}" if isinstance(value, int) else str(value)
        table.add_row(key, shown)
    results_console().print(table)
