"""Turn validated CLI values into a ``TrainConfig``: look names up, read config files, pick
defaults, and refuse what cannot work, all before any model is built."""

from __future__ import annotations

import datetime as _dt
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lowmem.api import ConfigError
from lowmem.config import (
    DEFAULT_DATASETS,
    TEST_BATCHES,
    TEST_TOKENS,
    TrainConfig,
    merge_optimizer_config,
    read_config_file,
)
from lowmem.registry import Registry

# Sequence length cap in --test mode: a few short steps instead of one huge one, so even the
# seed's llama_1b batch-32 command finishes on a CPU.
TEST_MAX_LENGTH = 32
TEST_FINETUNE_MAX_LENGTH = 128
GENERIC_FILES, GENERIC_HUB = "files", "hub"


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    if environ.get("LOWMEM_CACHE_DIR"):
        return Path(environ["LOWMEM_CACHE_DIR"])
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lowmem"


def resolve_dataset(name: str, registry: Registry) -> tuple[str, str | None]:
    """A registered name, else an existing local path (the ``files`` dataset), else a hub id."""
    if name in registry.datasets:
        registry.dataset(name)  # raises on a name two plugins claim
        return name, None
    if Path(name).expanduser().exists():
        return GENERIC_FILES, str(Path(name).expanduser().resolve())
    if "/" in name or name in ("glue", "imdb", "ag_news", "wikitext"):
        return GENERIC_HUB, name
    choices = ", ".join(sorted(registry.datasets))
    raise ConfigError(f"unknown dataset {name!r}: not registered ({choices}), not a local path, not a hub id")


def new_run_dir(model: str, optimizer: str, root: Path = Path("runs")) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = root / f"{stamp}-{model}-{optimizer.replace('+', '-')}"
    candidate, n = base, 1
    while candidate.exists():  # never silently overwrite an existing run
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def build_train_config(
    params: Mapping[str, Any],
    registry: Registry,
    environ: Mapping[str, str],
    note: Callable[[str], None] | None = None,
) -> TrainConfig:
    say = note or (lambda message: print(message, file=sys.stderr))
    optimizer = registry.optimizer(params["optimizer"])
    model = registry.model(params["model"])
    dataset_name, source = resolve_dataset(params.get("dataset") or DEFAULT_DATASETS[params["mode"]], registry)

    max_length = params["max_length"]

    files: list[tuple[str, dict[str, Any]]] = []
    for family, option in (("lora", "lora_config"), ("galore", "galore_config")):
        path = params.get(option)
        if path is None:
            continue
        if family in optimizer.config_files:
            files.append((str(path), read_config_file(path)))
        else:
            say(f"note: --{option} does not apply to optimizer {optimizer.name!r}; ignored")
    if params.get("optimizer_config") is not None:
        files.append((str(params["optimizer_config"]), read_config_file(params["optimizer_config"])))
    optimizer_config = merge_optimizer_config(optimizer, files)

    test = bool(params.get("test"))
    num_tokens = params["num_training_tokens"]
    max_steps = params.get("max_steps")
    eval_batches = params.get("eval_batches", 50)
    if test:
        num_tokens = min(num_tokens, TEST_TOKENS)
        cap = TEST_MAX_LENGTH if params["mode"] == "pretraining" else TEST_FINETUNE_MAX_LENGTH
        if max_length > cap:
            say(f"note: --test caps --max_length at {cap} (was {max_length})")
            max_length = cap
        if params["mode"] == "finetuning":
            max_steps = min(max_steps or TEST_BATCHES, TEST_BATCHES)
        eval_batches = min(eval_batches, 2)
    if max_length > model.max_positions:
        raise ConfigError(
            f"--max_length {max_length} is longer than model {model.name!r} allows ({model.max_positions} positions)"
        )

    resume = params.get("resume")
    output_dir = params.get("output_dir")
    if resume and resume != "latest" and output_dir is None:
        output_dir = _run_dir_of(Path(resume))
    if resume == "latest" and output_dir is None:
        raise ConfigError("--resume latest needs --output-dir: the run folder whose newest checkpoint to continue")
    if output_dir is None:
        output_dir = new_run_dir(model.name, optimizer.name)
    elif not resume and (Path(output_dir) / "config.json").exists():
        raise ConfigError(
            f"{output_dir} already holds a run; choose another --output-dir or continue it with --resume latest"
        )

    _check_writable_folder(Path(output_dir))
    report_to = tuple(x.strip() for x in str(params.get("report_to") or "").split(",") if x.strip())
    for target in report_to:
        if target not in ("tensorboard", "wandb"):
            raise ConfigError(f"--report-to {target!r} is not one of: tensorboard, wandb")

    return TrainConfig(
        mode=params["mode"],
        optimizer=optimizer.name,
        model=model.name,
        dataset=dataset_name,
        dataset_source=source,
        batch_size=params["batch_size"],
        num_epochs=params["num_epochs"],
        max_length=max_length,
        num_training_tokens=num_tokens,
        max_steps=max_steps,
        shuffle=bool(params["shuffle"]),
        dtype=params["dtype"],
        lr=params["lr"],
        weight_decay=params["weight_decay"],
        tmax=params.get("tmax"),
        warmup_steps=params.get("warmup_steps"),
        grad_accum=params.get("grad_accum", 1),
        max_grad_norm=params.get("max_grad_norm", 1.0),
        seed=params.get("seed", 42),
        test=test,
        optimizer_config=optimizer_config,
        output_dir=str(output_dir),
        eval_every=params.get("eval_every", 0),
        eval_batches=eval_batches,
        log_every=params.get("log_every", 10),
        save_every=params.get("save_every", 0),
        keep_checkpoints=params.get("keep_checkpoints", 2),
        resume=resume,
        on_nonfinite=params.get("on_nonfinite", "stop"),
        max_nonfinite_skips=params.get("max_nonfinite_skips", 5),
        model_path=params.get("model_path"),
        tokenizer=params.get("tokenizer"),
        trust_remote_code=bool(params.get("trust_remote_code")),
        device=params.get("device", "auto"),
        cache_dir=str(default_cache_dir(environ)),
        report_to=report_to,
    )


def _check_writable_folder(path: Path) -> None:
    """The run folder must be (or become) a writable directory: found now, not after the model
    is built."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output-dir {path} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--output-dir {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"--output-dir {path} cannot be written: {existing} is read-only")


def _run_dir_of(path: Path) -> Path:
    """A checkpoint folder's run folder (``RUN/checkpoints/step-N`` -> ``RUN``), or the folder itself."""
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return path
