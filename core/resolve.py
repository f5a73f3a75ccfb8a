"""Resolve a ``TrainConfig``: fill in what depends on the plugins and the machine, and refuse
what cannot work, all before any model is built.

"Resolve" means this one thing in lowmem: a config as the user gave it becomes the complete
config of the run (registered dataset and its source, merged optimizer settings, --test caps,
the run folder, the cache folder). The result is what ``config.json`` records, and resolving
it again changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lowmem.api import Optimizer
from lowmem.config import CHOICES, REPORTERS, TrainConfig, default_of
from lowmem.errors import ConfigError
from lowmem.registry import Registry
from lowmem.run_files import run_folder

# --test caps: the seed's ~1000 pretraining tokens in a few short steps (so even the seed's
# llama_1b batch-32 command finishes on a CPU), a few finetuning batches.
TEST_TOKENS = 1000
TEST_BATCHES = 4
TEST_MAX_LENGTH = 32
TEST_FINETUNE_MAX_LENGTH = 128
TEST_EVAL_BATCHES = 2
GENERIC_FILES, GENERIC_HUB = "files", "hub"
POSITIVE = ("batch_size", "num_epochs", "max_length", "num_training_tokens", "max_steps", "grad_accum",
            "eval_batches", "log_every", "keep_checkpoints", "max_nonfinite_skips", "tmax")
NOT_NEGATIVE = ("weight_decay", "max_grad_norm", "warmup_steps", "eval_every", "save_every")


def resolve_config(config: TrainConfig, registry: Registry, say: Callable[[str], None],
                   environ: Mapping[str, str] | None = None) -> TrainConfig:
    """The complete config of the run. ``environ`` supplies LOWMEM_CACHE_DIR / XDG_CACHE_HOME
    for the cache folder when ``config.cache_dir`` is empty (default: this process's)."""
    check_values(config)
    optimizer = registry.optimizer(config.optimizer)
    model = registry.model_for(config.model)
    if config.parallel == "fsdp" and not optimizer.shards:
        raise ConfigError(fsdp_refusal(optimizer))
    dataset, source = resolve_dataset(config, registry)
    merged = merge_optimizer_config(optimizer, config, say)
    changes: dict[str, Any] = {"optimizer_config": merged, "per_layer": bool(merged.get("per_layer", False)),
                               "dataset": dataset, "dataset_source": source, "model": model.name}
    if config.test:
        changes.update(test_caps(config, say))
    if config.bf16_rounding != default_of("bf16_rounding") and config.dtype not in ("bf16-pure", "auto"):
        say(f"note: --bf16-rounding applies to --dtype bf16-pure; with {config.dtype} it is not used")
    asked = changes.get("max_length", config.max_length)
    max_length = length_for(model.max_positions, asked)
    if max_length != asked:
        say(f"note: --max_length {asked} (the default) is capped at {max_length}, the context of model "
            f"{model.name!r}")
        changes["max_length"] = max_length
    if max_length > model.max_positions:
        raise ConfigError(f"--max_length {max_length} is longer than model {model.name!r} allows "
                          f"({model.max_positions} positions)")
    changes["output_dir"] = str(run_folder(config, model.name, optimizer.name))
    env = os.environ if environ is None else environ
    changes["cache_dir"] = config.cache_dir or str(default_cache_dir(env))
    return dataclasses.replace(config, **changes)


# What a field annotated with one of these names may hold (a bool is an int to Python: refused).
SIMPLE_TYPES: dict[str, tuple[type, ...]] = {
    "bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


def check_types(config: TrainConfig) -> None:
    """Each field of a simple type holds that type: from Python, lean_loss="false" would
    otherwise switch the lever on."""
    for spec in dataclasses.fields(config):
        kinds = [kind.strip() for kind in str(spec.type).split("|")]
        allowed = tuple(t for kind in kinds for t in SIMPLE_TYPES.get(kind, ()))
        value = getattr(config, spec.name)
        if not allowed or (value is None and "None" in kinds):
            continue  # dicts and tuples are checked where they are read
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ConfigError(f"{spec.name} must be {' or '.join(kinds)}, got {value!r}")
    if not isinstance(config.optimizer_config, dict):
        raise ConfigError(f"optimizer_config must be a dict of settings, got {config.optimizer_config!r}")
    # A lone string would otherwise be read letter by letter.
    targets = config.report_to
    if not isinstance(targets, tuple | list) or not all(isinstance(t, str) for t in targets):
        raise ConfigError(f"report_to must be a tuple of names, got {config.report_to!r}")


def check_values(config: TrainConfig) -> None:
    """Values Python callers can get wrong (the CLI's option checks catch them earlier)."""
    check_types(config)
    for name, choices in CHOICES.items():
        if getattr(config, name) not in choices:
            raise ConfigError(f"{name} {getattr(config, name)!r} is not one of: {', '.join(choices)}")
    for name in POSITIVE:
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    for name in NOT_NEGATIVE:
        value = getattr(config, name)
        if value is not None and not value >= 0:
            raise ConfigError(f"{name} must be 0 or more, got {value}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise ConfigError(f"lr must be a positive number, got {config.lr}")
    for target in config.report_to:
        if target not in REPORTERS:
            raise ConfigError(f"--report-to {target!r} is not one of: {', '.join(REPORTERS)}")


def fsdp_refusal(optimizer: Any) -> str:
    """Why ``--parallel fsdp`` is refused for an optimizer that does not shard, and what works."""
    instead = "--parallel ddp" if optimizer.data_parallel else "one process (it updates inside backward)"
    return (f"optimizer {optimizer.name!r} does not support --parallel fsdp (its updates are not known to "
            f"be exact on sharded parameters); use {instead}")


def length_for(max_positions: int, max_length: int | None) -> int:
    """``--max_length`` for a model of ``max_positions``: the default (None, or 512) is capped at a
    shorter context; another length is as given (and refused by the caller where too long)."""
    default = default_of("max_length")
    return min(default, max_positions) if max_length in (None, default) else max_length


def resolve_dataset(config: TrainConfig, registry: Registry) -> tuple[str, str | None]:
    return dataset_choice(config.dataset or registry.default_dataset(config.mode), config.dataset_source,
                          registry)


def dataset_choice(name: str, source: str | None, registry: Registry) -> tuple[str, str | None]:
    """(dataset plugin, source) for ``--dataset name``: a registered name, else an existing local
    path (the ``files`` dataset), else a hub id."""
    if name in registry.datasets:
        registry.dataset(name)  # raises on a name two plugins claim
        return name, source  # a resolved config keeps its source
    family, _, rest = name.partition("/")
    if rest and family in registry.datasets and registry.dataset(family).takes_source:
        return family, rest  # glue/mrpc: the glue dataset, task mrpc
    if Path(name).expanduser().exists():
        return GENERIC_FILES, str(Path(name).expanduser().resolve())
    if name.startswith(("/", "./", "../", "~")):  # written as a path, not a hub id
        raise ConfigError(f"--dataset {name}: no such file or folder")
    if "/" in name or name in ("glue", "imdb", "ag_news", "wikitext"):
        return GENERIC_HUB, name
    choices = ", ".join(sorted(registry.datasets))
    raise ConfigError(f"unknown dataset {name!r}: not registered ({choices}), not a local path, not a hub id")


def test_caps(config: TrainConfig, say: Callable[[str], None]) -> dict[str, Any]:
    caps: dict[str, Any] = {"num_training_tokens": min(config.num_training_tokens, TEST_TOKENS),
                            "eval_batches": min(config.eval_batches, TEST_EVAL_BATCHES)}
    cap = TEST_MAX_LENGTH if config.mode == "pretraining" else TEST_FINETUNE_MAX_LENGTH
    if config.max_length > cap:
        say(f"note: --test caps --max_length at {cap} (was {config.max_length})")
        caps["max_length"] = cap
    if config.mode == "finetuning":
        caps["max_steps"] = min(config.max_steps or TEST_BATCHES, TEST_BATCHES)
    return caps


# -- optimizer settings ----------------------------------------------------------------------
def merge_optimizer_config(optimizer: Optimizer, config: TrainConfig,
                           say: Callable[[str], None]) -> dict[str, Any]:
    """``optimizer.default_config`` overlaid by the config files in order, then by
    ``config.optimizer_config``; keys and value types checked, then the plugin's own check."""
    layers = config_file_layers(optimizer, config.lora_config_file, config.galore_config_file,
                                config.optimizer_config_file, say)
    if config.optimizer_config:
        layers.append(("optimizer_config", dict(config.optimizer_config)))
    if config.per_layer:
        if "per_layer" not in optimizer.default_config:
            raise ConfigError(f"--per-layer: optimizer {optimizer.name!r} has no per-layer mode (those with "
                              "one have a 'per_layer' setting; lowmem list-optimizers)")
        overridden = [source for source, values in layers if values.get("per_layer") is False]
        if overridden:
            say(f"note: --per-layer overrides per_layer false in {', '.join(overridden)}")
        layers.append(("--per-layer", {"per_layer": True}))
    return merge_layers(optimizer, layers)


def config_file_layers(optimizer: Optimizer, lora_file: str | Path | None, galore_file: str | Path | None,
                       optimizer_file: str | Path | None,
                       say: Callable[[str], None] | None) -> list[tuple[str, dict[str, Any]]]:
    """(file, values) for each settings file that applies to ``optimizer``, in the order they
    overlay: ``--lora_config``, ``--galore_config`` (each only for optimizers that read that
    family; otherwise a note through ``say``), then ``--optimizer-config``."""
    layers: list[tuple[str, dict[str, Any]]] = []
    for family, path in (("lora", lora_file), ("galore", galore_file)):
        if path is None:
            continue
        if family in optimizer.config_files:
            layers.append((str(path), read_config_file(path)))
        elif say is not None:
            say(f"note: --{family}_config does not apply to optimizer {optimizer.name!r}; ignored")
    if optimizer_file is not None:
        layers.append((str(optimizer_file), read_config_file(optimizer_file)))
    return layers


def merge_layers(optimizer: Optimizer, layers: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The defaults overlaid by each (where, values) in order, checked."""
    merged = json.loads(json.dumps(optimizer.default_config))  # a deep, JSON-clean copy
    for where, data in layers:
        for key, value in data.items():
            if key not in optimizer.default_config:
                valid = ", ".join(sorted(optimizer.default_config)) or "none"
                raise ConfigError(f"{where}: unknown key {key!r} for optimizer {optimizer.name!r}; "
                                  f"valid keys: {valid}")
            default = optimizer.default_config[key]
            if not _same_type(default, value):
                raise ConfigError(
                    f"{where}: key {key!r} must be {type(default).__name__}, got {json.dumps(value)}")
            merged[key] = value
    try:
        optimizer.check_config(merged)
    except ConfigError as exc:
        where = ", ".join(w for w, _ in layers) or "defaults"
        raise ConfigError(f"{where}: {exc}") from None
    return merged


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON object from ``path``; problems name the file."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"config file {str(file)!r} is a directory, not a JSON file")
    if not file.is_file():
        raise ConfigError(f"config file {str(file)!r} does not exist")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(file)!r} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(file)!r} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(file)!r} must hold a JSON object, not {type(data).__name__}")
    return data


def _same_type(default: Any, value: Any) -> bool:
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int | float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, list | tuple):
        return isinstance(value, list | tuple)
    return isinstance(value, type(default))


# -- folders ---------------------------------------------------------------------------------
def default_cache_dir(environ: Mapping[str, str]) -> Path:
    if environ.get("LOWMEM_CACHE_DIR"):
        return Path(environ["LOWMEM_CACHE_DIR"])
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lowmem"
