"""The ``lowmem`` command line: thin option parsing over the core.

Options are checked in callbacks (``typer.BadParameter`` -> exit 2); ``train`` then resolves
everything into a ``TrainConfig`` and makes one call into the core. Heavy libraries are
imported only inside the commands that train or build models.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from lowmem.api import ConfigError
from lowmem.config import DTYPES, MODES, ON_NONFINITE, parse_bool, parse_count
from lowmem.registry import BUILT_IN, Registry, load_registry

app = typer.Typer(
    name="lowmem",
    help="Memory-efficient training of language models: AdamW, LoRA, GaLore, 8-bit GaLore and plugins.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Optimizer configuration files.", no_args_is_help=True)
app.add_typer(config_app, name="config")

# Tests inject inline plugins here instead of installing distributions.
EXTRA_PLUGINS: list[object] = []
_registry: Registry | None = None


def registry() -> Registry:
    """The plugin registry, loaded once per process (LOWMEM_LOAD_PLUGINS chooses entry points)."""
    global _registry
    if _registry is None:
        _registry = load_registry(os.environ.get("LOWMEM_LOAD_PLUGINS"), extra=EXTRA_PLUGINS)
    return _registry


def reset_registry() -> None:
    global _registry
    _registry = None


@contextmanager
def clean_errors():
    """Bad input ends in one line on stderr and exit code 2, never a traceback."""
    try:
        yield
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


# -- option callbacks --------------------------------------------------------------------------
def _positive_int(value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise typer.BadParameter(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(value: int | None) -> int | None:
    if value is not None and value < 0:
        raise typer.BadParameter(f"must be 0 or more, got {value}")
    return value


def _positive_float(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise typer.BadParameter(f"must be a positive number, got {value}")
    return value


def _non_negative_float(value: float | None) -> float | None:
    if value is not None and not value >= 0:
        raise typer.BadParameter(f"must be 0 or more, got {value}")
    return value


def _bool(value: str | None) -> bool | None:
    if value is None:
        return None
    try:
        return parse_bool(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{exc}; use true or false") from None


def _count(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        count = parse_count(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if count <= 0:
        raise typer.BadParameter(f"must be positive, got {value}")
    return count


def _choice(choices: tuple[str, ...]):
    def check(value: str | None) -> str | None:
        if value is not None and value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of: {', '.join(choices)}")
        return value

    return check


def _existing_file(value: Path | None) -> Path | None:
    if value is not None and value.is_dir():
        raise typer.BadParameter(f"{str(value)!r} is a directory, not a file")
    if value is not None and not value.is_file():
        raise typer.BadParameter(f"file {str(value)!r} does not exist")
    return value


# -- train -------------------------------------------------------------------------------------
Opt = typer.Option


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def train(
    mode: Annotated[str, Opt("--mode", help="pretraining or finetuning", callback=_choice(MODES))],
    optimizer: Annotated[str, Opt("--optimizer", help="A registered optimizer (lowmem list-optimizers)")],
    model: Annotated[str, Opt("--model", help="A registered model (lowmem list-models)")],
    batch_size: Annotated[int, Opt("--batch_size", "--batch-size", callback=_positive_int)] = 16,
    num_epochs: Annotated[int, Opt("--num_epochs", "--num-epochs", callback=_positive_int, help="Finetuning epochs")] = 30,
    max_length: Annotated[int, Opt("--max_length", "--max-length", callback=_positive_int, help="Tokens per sequence")] = 512,
    num_training_tokens: Annotated[str, Opt("--num_training_tokens", "--num-training-tokens", callback=_count, help="Pretraining budget in real tokens: 1e9, 100M, 1B")] = "1e9",
    max_steps: Annotated[int | None, Opt("--max-steps", "--max_steps", callback=_positive_int, help="Stop after N optimizer steps")] = None,
    shuffle: Annotated[str, Opt("--shuffle", callback=_bool, help="true or false")] = "true",
    dtype: Annotated[str, Opt("--dtype", callback=_choice(DTYPES), help="auto, bf16, fp16 (loss scaling), fp32, or bf16-pure (bf16 weights, no fp32 copy); auto: bf16 where fast, else fp32 on CPU / fp16 on old GPUs")] = "auto",
    lr: Annotated[float, Opt("--lr", callback=_positive_float)] = 4e-4,
    weight_decay: Annotated[float, Opt("--weight_decay", "--weight-decay", callback=_non_negative_float)] = 0.01,
    tmax: Annotated[int | None, Opt("--tmax", callback=_positive_int, help="Cosine period in optimizer steps after warm-up (default: the rest of the run)")] = None,
    warmup_steps: Annotated[int | None, Opt("--warmup_steps", "--warmup-steps", callback=_non_negative_int, help="Linear warm-up steps (default: 10% of the run)")] = None,
    lora_config: Annotated[Path | None, Opt("--lora_config", "--lora-config", callback=_existing_file, help="JSON LoRA settings")] = None,
    galore_config: Annotated[Path | None, Opt("--galore_config", "--galore-config", callback=_existing_file, help="JSON GaLore settings")] = None,
    optimizer_config: Annotated[Path | None, Opt("--optimizer-config", "--optimizer_config", callback=_existing_file, help="JSON settings for any optimizer")] = None,
    test: Annotated[str, Opt("--test", callback=_bool, help="Smoke mode: ~1000 tokens or a few batches")] = "false",
    dataset: Annotated[str | None, Opt("--dataset", help="A registered dataset, a local file or folder, or a hub id")] = None,
    output_dir: Annotated[Path | None, Opt("--output-dir", "--output_dir", help="Run folder (default runs/<date>-<model>-<optimizer>)")] = None,
    seed: Annotated[int, Opt("--seed")] = 42,
    grad_accum: Annotated[int, Opt("--grad-accum", "--grad_accum", callback=_positive_int, help="Micro-batches per optimizer step")] = 1,
    max_grad_norm: Annotated[float, Opt("--max-grad-norm", "--max_grad_norm", callback=_non_negative_float, help="Clip the global gradient norm; 0 turns clipping off")] = 1.0,
    eval_every: Annotated[int, Opt("--eval-every", "--eval_every", callback=_non_negative_int, help="Evaluate every N optimizer steps (0: at the end only)")] = 0,
    eval_batches: Annotated[int, Opt("--eval-batches", "--eval_batches", callback=_positive_int)] = 50,
    log_every: Annotated[int, Opt("--log-every", "--log_every", callback=_positive_int)] = 10,
    save_every: Annotated[int, Opt("--save-every", "--save_every", callback=_non_negative_int, help="Checkpoint every N optimizer steps (and at the end)")] = 0,
    keep_checkpoints: Annotated[int, Opt("--keep-checkpoints", "--keep_checkpoints", callback=_positive_int)] = 2,
    resume: Annotated[str | None, Opt("--resume", help="A checkpoint folder, a run folder, or 'latest'")] = None,
    on_nonfinite: Annotated[str, Opt("--on-nonfinite", callback=_choice(ON_NONFINITE), help="stop (exit 3) or skip the update")] = "stop",
    max_nonfinite_skips: Annotated[int, Opt("--max-nonfinite-skips", callback=_positive_int)] = 5,
    model_path: Annotated[str | None, Opt("--model-path", "--model_path", help="Hugging Face folder (or hub id) with weights to finetune")] = None,
    tokenizer: Annotated[str | None, Opt("--tokenizer", help="Tokenizer folder or hub id")] = None,
    trust_remote_code: Annotated[bool, Opt("--trust-remote-code", help="Allow model folders that ship their own code")] = False,
    device: Annotated[str, Opt("--device", callback=_choice(("auto", "cpu", "cuda")))] = "auto",
    report_to: Annotated[str, Opt("--report-to", help="Comma-separated: tensorboard, wandb")] = "",
    nproc: Annotated[int, Opt("--nproc", callback=_positive_int, help="Start N data-parallel processes through torchrun")] = 1,
) -> None:
    """Train MODEL with OPTIMIZER and write a self-contained run folder."""
    params = dict(locals())
    with clean_errors():
        # Under a launcher, or before re-running under torchrun, rank 0 alone prints the notes.
        quiet = nproc > 1 or os.environ.get("RANK", "0") != "0"
        config = resolve_train_config(params, note=(lambda message: None) if quiet else None)
        if nproc > 1:
            from lowmem.distributed import launch_torchrun

            raise typer.Exit(launch_torchrun(nproc, sys.argv))
        from lowmem.loop import run_training

        raise typer.Exit(run_training(config, registry()))


def resolve_train_config(params: dict[str, Any], note=None) -> Any:
    """Validated CLI values -> TrainConfig. Everything a user can get wrong is found here,
    before any model is built."""
    from lowmem.resolve import build_train_config

    return build_train_config(params, registry(), environ=dict(os.environ), note=note)


# -- listings ----------------------------------------------------------------------------------
def _print_table(title: str, attr: str) -> None:
    from rich.table import Table

    from lowmem.progress import results_console

    reg = registry()
    table = Table(title=title)
    table.add_column("name", style="bold")
    table.add_column("description")
    table.add_column("from")
    for name, entry in sorted(getattr(reg, attr).items()):
        origin = entry.origin if entry.origin != BUILT_IN else "built-in"
        if entry.conflicts:
            origin += " [red](conflicts with " + ", ".join(entry.conflicts) + ")[/red]"
        table.add_row(name, entry.obj.description, origin)
    results_console().print(table)


@app.command("list-optimizers")
def list_optimizers() -> None:
    """The registered optimizers."""
    _print_table("optimizers", "optimizers")


@app.command("list-models")
def list_models() -> None:
    """The registered models."""
    _print_table("models", "models")


@app.command("list-datasets")
def list_datasets() -> None:
    """The registered datasets."""
    _print_table("datasets", "datasets")


@app.command("plugins")
def plugins() -> None:
    """Every loaded plugin: where it comes from, its hooks, and whether it loaded."""
    from rich.table import Table

    from lowmem.progress import results_console

    table = Table(title="plugins")
    for column in ("name", "from", "hooks", "status"):
        table.add_column(column)
    for info in registry().plugins:
        status = info.status if info.status == "ok" else f"[red]{info.status}[/red]"
        table.add_row(info.name, info.origin, ", ".join(info.hooks), status)
    results_console().print(table)


@config_app.command("show")
def config_show(name: Annotated[str, typer.Argument(help="An optimizer name")]) -> None:
    """Print an optimizer's default settings as a starting JSON file."""
    with clean_errors():
        optimizer = registry().optimizer(name)
        typer.echo(json.dumps(optimizer.default_config, indent=2))


# -- estimate, compare, plot --------------------------------------------------------------------
def _size(value: str | None) -> int | None:
    if value is None:
        return None
    from lowmem.config import parse_bytes

    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def estimate(
    model: Annotated[str, Opt("--model", help="A registered model (lowmem list-models)")],
    optimizer: Annotated[str | None, Opt("--optimizer", help="One optimizer (default: all, side by side)")] = None,
    all_optimizers: Annotated[bool, Opt("--all", help="Every registered optimizer side by side")] = False,
    mode: Annotated[str, Opt("--mode", callback=_choice(MODES))] = "pretraining",
    batch_size: Annotated[int, Opt("--batch_size", "--batch-size", callback=_positive_int)] = 1,
    max_length: Annotated[int, Opt("--max_length", "--max-length", callback=_positive_int)] = 256,
    dtype: Annotated[str, Opt("--dtype", callback=_choice(DTYPES))] = "bf16",
    per_layer: Annotated[bool, Opt("--per-layer", "--per_layer", help="Per-layer mode (optimizers with a 'per_layer' setting)")] = False,
    grad_accum: Annotated[int, Opt("--grad-accum", "--grad_accum", callback=_positive_int)] = 1,
    device_memory: Annotated[str | None, Opt("--device-memory", "--device_memory", callback=_size, help="Say whether it fits: 24GB, 80GiB")] = None,
    optimizer_config: Annotated[Path | None, Opt("--optimizer-config", "--optimizer_config", callback=_existing_file, help="JSON settings overriding the optimizer's defaults")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print JSON instead of a table")] = False,
) -> None:
    """Estimate the memory training MODEL takes with each optimizer, without training (meta device)."""
    with clean_errors():
        from lowmem.config import DEFAULT_DATASETS, merge_optimizer_config, read_config_file
        from lowmem.estimate import estimate as estimate_memory
        from lowmem.estimate import print_estimates

        reg = registry()
        model_plugin = reg.model(model)
        if optimizer is not None and all_optimizers:
            raise ConfigError("give --optimizer or --all, not both")
        names = [optimizer] if optimizer is not None else sorted(reg.optimizers)
        file_data = read_config_file(optimizer_config) if optimizer_config is not None else None
        dataset = reg.datasets.get(DEFAULT_DATASETS[mode])
        objective = model_plugin.objective(mode, dataset.obj.kind if dataset else "text")
        if max_length > model_plugin.max_positions:
            raise ConfigError(f"--max_length {max_length} is longer than model {model!r} allows ({model_plugin.max_positions} positions)")
        results: dict[str, Any] = {}
        for name in names:
            try:
                optimizer_plugin = reg.optimizer(name)
                files = [(str(optimizer_config), file_data)] if file_data is not None else []
                config = merge_optimizer_config(optimizer_plugin, files)
                results[name] = estimate_memory(
                    model_plugin, optimizer_plugin, mode=mode, objective=objective, batch_size=batch_size,
                    max_length=max_length, dtype=dtype, optimizer_config=config, per_layer=per_layer,
                    grad_accum=grad_accum,
                )
            except ConfigError as exc:
                if optimizer is not None:
                    raise
                results[name] = str(exc)  # shown as "n/a" with the reason, the others still shown
        print_estimates(results, device_memory, as_json=as_json)  # type: ignore[arg-type]  # _size made it int


@app.command(context_settings={
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
        train_command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
        train_args = [*ctx.args, "--optimizer", names[0]]
        train_context = train_command.make_context("lowmem compare", train_args, parent=ctx)
        params = dict(train_context.params)
        if params.pop("nproc", 1) != 1:
            raise ConfigError("compare runs on one process; --nproc is not supported here")
        if params.get("output_dir") is not None or params.get("resume"):
            raise ConfigError("compare chooses each run's folder under --output-dir; --resume is not supported")
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


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
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


def main() -> None:
    app(prog_name="lowmem")
