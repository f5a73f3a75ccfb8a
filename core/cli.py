"""The ``lowmem`` command line: thin option parsing over the core.

Options are checked in callbacks (``typer.BadParameter`` -> exit 2); ``train`` then resolves
everything into a ``TrainConfig`` and makes one call into the core. Heavy libraries are
imported only inside the commands that train or build models.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from lowmem.cli_options import (
    Opt,
    boolean,
    choice,
    clean_errors,
    count,
    existing_file,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from lowmem.cli_reports import reports_app
from lowmem.config import DTYPES, MODES, ON_NONFINITE
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
app.add_typer(reports_app)  # estimate, compare, plot: top-level commands

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


# -- train -------------------------------------------------------------------------------------


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def train(
    mode: Annotated[str, Opt("--mode", help="pretraining or finetuning", callback=choice(MODES))],
    optimizer: Annotated[str, Opt("--optimizer", help="A registered optimizer (lowmem list-optimizers)")],
    model: Annotated[str, Opt("--model", help="A registered model (lowmem list-models)")],
    batch_size: Annotated[int, Opt("--batch_size", "--batch-size", callback=positive_int)] = 16,
    num_epochs: Annotated[int, Opt("--num_epochs", "--num-epochs", callback=positive_int, help="Finetuning epochs")] = 30,
    max_length: Annotated[int, Opt("--max_length", "--max-length", callback=positive_int, help="Tokens per sequence")] = 512,
    num_training_tokens: Annotated[str, Opt("--num_training_tokens", "--num-training-tokens", callback=count, help="Pretraining budget in real tokens: 1e9, 100M, 1B")] = "1e9",
    max_steps: Annotated[int | None, Opt("--max-steps", "--max_steps", callback=positive_int, help="Stop after N optimizer steps")] = None,
    shuffle: Annotated[str, Opt("--shuffle", callback=boolean, help="true or false")] = "true",
    dtype: Annotated[str, Opt("--dtype", callback=choice(DTYPES), help="auto, bf16, fp16 (loss scaling), fp32, or bf16-pure (bf16 weights, no fp32 copy); auto: bf16 where fast, else fp32 on CPU / fp16 on old GPUs")] = "auto",
    lr: Annotated[float, Opt("--lr", callback=positive_float)] = 4e-4,
    weight_decay: Annotated[float, Opt("--weight_decay", "--weight-decay", callback=non_negative_float)] = 0.01,
    tmax: Annotated[int | None, Opt("--tmax", callback=positive_int, help="Cosine period in optimizer steps after warm-up (default: the rest of the run)")] = None,
    warmup_steps: Annotated[int | None, Opt("--warmup_steps", "--warmup-steps", callback=non_negative_int, help="Linear warm-up steps (default: 10% of the run)")] = None,
    lora_config: Annotated[Path | None, Opt("--lora_config", "--lora-config", callback=existing_file, help="JSON LoRA settings")] = None,
    galore_config: Annotated[Path | None, Opt("--galore_config", "--galore-config", callback=existing_file, help="JSON GaLore settings")] = None,
    optimizer_config: Annotated[Path | None, Opt("--optimizer-config", "--optimizer_config", callback=existing_file, help="JSON settings for any optimizer")] = None,
    test: Annotated[str, Opt("--test", callback=boolean, help="Smoke mode: ~1000 tokens or a few batches")] = "false",
    dataset: Annotated[str | None, Opt("--dataset", help="A registered dataset, a local file or folder, or a hub id")] = None,
    output_dir: Annotated[Path | None, Opt("--output-dir", "--output_dir", help="Run folder (default runs/<date>-<model>-<optimizer>)")] = None,
    seed: Annotated[int, Opt("--seed")] = 42,
    grad_accum: Annotated[int, Opt("--grad-accum", "--grad_accum", callback=positive_int, help="Micro-batches per optimizer step")] = 1,
    max_grad_norm: Annotated[float, Opt("--max-grad-norm", "--max_grad_norm", callback=non_negative_float, help="Clip the global gradient norm; 0 turns clipping off")] = 1.0,
    eval_every: Annotated[int, Opt("--eval-every", "--eval_every", callback=non_negative_int, help="Evaluate every N optimizer steps (0: at the end only)")] = 0,
    eval_batches: Annotated[int, Opt("--eval-batches", "--eval_batches", callback=positive_int)] = 50,
    log_every: Annotated[int, Opt("--log-every", "--log_every", callback=positive_int)] = 10,
    save_every: Annotated[int, Opt("--save-every", "--save_every", callback=non_negative_int, help="Checkpoint every N optimizer steps (and at the end)")] = 0,
    keep_checkpoints: Annotated[int, Opt("--keep-checkpoints", "--keep_checkpoints", callback=positive_int)] = 2,
    resume: Annotated[str | None, Opt("--resume", help="A checkpoint folder, a run folder, or 'latest'")] = None,
    on_nonfinite: Annotated[str, Opt("--on-nonfinite", callback=choice(ON_NONFINITE), help="stop (exit 3) or skip the update")] = "stop",
    max_nonfinite_skips: Annotated[int, Opt("--max-nonfinite-skips", callback=positive_int)] = 5,
    model_path: Annotated[str | None, Opt("--model-path", "--model_path", help="Hugging Face folder (or hub id) with weights to finetune")] = None,
    tokenizer: Annotated[str | None, Opt("--tokenizer", help="Tokenizer folder or hub id")] = None,
    trust_remote_code: Annotated[bool, Opt("--trust-remote-code", help="Allow model folders that ship their own code")] = False,
    device: Annotated[str, Opt("--device", callback=choice(("auto", "cpu", "cuda")))] = "auto",
    report_to: Annotated[str, Opt("--report-to", help="Comma-separated: tensorboard, wandb")] = "",
    nproc: Annotated[int, Opt("--nproc", callback=positive_int, help="Start N data-parallel processes through torchrun")] = 1,
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


def main() -> None:
    app(prog_name="lowmem")
