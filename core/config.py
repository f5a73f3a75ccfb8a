"""The typed run configuration and the parsing of the values users type.

Config flows one way: CLI options -> ``TrainConfig`` -> ``train(config, registry)``.
The resolved config is saved as ``config.json`` with every run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowmem.api import ConfigError, Optimizer

MODES = ("pretraining", "finetuning")
# bf16/fp16: autocast over fp32 weights. bf16-pure: weights, gradients and states in bf16 with
# no fp32 master copy (what the GaLore paper's 7B-on-24GB figure uses): half the memory, less precision.
DTYPES = ("auto", "bf16", "fp16", "fp32", "bf16-pure")
ON_NONFINITE = ("stop", "skip")
# --test caps: the seed's ~1000 pretraining tokens, a few finetuning batches.
TEST_TOKENS = 1000
TEST_BATCHES = 4
DEFAULT_DATASETS = {"pretraining": "stdlib-docs", "finetuning": "stdlib-topics"}


@dataclass(frozen=True)
class TrainConfig:
    mode: str
    optimizer: str
    model: str
    dataset: str = ""
    dataset_source: str | None = None  # a path or hub id for the generic datasets
    batch_size: int = 16
    num_epochs: int = 30
    max_length: int = 512
    num_training_tokens: int = 1_000_000_000
    max_steps: int | None = None  # optimizer steps; caps either mode
    shuffle: bool = True
    dtype: str = "auto"  # auto: bf16 where it is fast (CUDA, AVX512-BF16/AMX CPUs), else fp16/fp32
    lr: float = 4e-4
    weight_decay: float = 0.01
    # Cosine period in optimizer steps after warm-up; None = the whole run. (The seed
    # used it as CosineAnnealingLR's T_max stepped per batch, which oscillates.)
    tmax: int | None = None
    warmup_steps: int | None = None  # None = 10% of the run
    min_lr_ratio: float = 0.1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 42
    test: bool = False
    optimizer_config: dict[str, Any] = field(default_factory=dict)
    output_dir: str = ""
    eval_every: int = 0  # optimizer steps; 0 = only at the end
    eval_batches: int = 50
    log_every: int = 10
    save_every: int = 0  # optimizer steps; 0 = only at the end
    keep_checkpoints: int = 2
    resume: str | None = None
    on_nonfinite: str = "stop"
    max_nonfinite_skips: int = 5
    model_path: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False
    device: str = "auto"
    cache_dir: str = ""
    report_to: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["report_to"] = list(self.report_to)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if "report_to" in values:
            values["report_to"] = tuple(values["report_to"])
        return cls(**values)


# -- values users type -----------------------------------------------------------------------
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str) -> int:
    """'1e9', '100M', '1B', '2.5k', '1_000' -> int. Raises ValueError with a clear message."""
    cleaned = str(text).strip().lower().replace("_", "").replace(",", "")
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)([kmbgt]?)", cleaned)
    if not match:
        raise ValueError(f"{text!r} is not a count (examples: 1000000, 1e9, 100M, 1B)")
    value = float(match.group(1)) * _SUFFIXES[match.group(2)]
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"{text!r} is not a whole number")
    return int(value)


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def parse_bytes(text: str) -> int:
    """'24GB', '24GiB', '80G', '512MiB', '1e9' -> bytes (GB and GiB both mean 2**30)."""
    cleaned = str(text).strip().lower().replace(" ", "")
    match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)(b|k|kb|kib|m|mb|mib|g|gb|gib|t|tb|tib)?", cleaned)
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 24GB, 80GiB, 512MB)")
    unit = (match.group(2) or "b")[0]
    scale = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit]
    value = float(match.group(1)) * scale
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite size")
    return int(value)


# -- optimizer config files ------------------------------------------------------------------
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


def _type_ok(default: Any, value: Any) -> bool:
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int | float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, list | tuple):
        return isinstance(value, list | tuple)
    return isinstance(value, type(default))


def merge_optimizer_config(optimizer: Optimizer, files: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """``optimizer.default_config`` overlaid by each (path, data) in order, keys and types checked."""
    merged = json.loads(json.dumps(optimizer.default_config))  # a deep, JSON-clean copy
    for path, data in files:
        for key, value in data.items():
            if key not in optimizer.default_config:
                valid = ", ".join(sorted(optimizer.default_config)) or "none"
                raise ConfigError(f"{path}: unknown key {key!r} for optimizer {optimizer.name!r}; valid keys: {valid}")
            default = optimizer.default_config[key]
            if not _type_ok(default, value):
                raise ConfigError(
                    f"{path}: key {key!r} must be {type(default).__name__}, got {json.dumps(value)}"
                )
            merged[key] = value
    try:
        optimizer.check_config(merged)
    except ConfigError as exc:
        where = ", ".join(p for p, _ in files) or "defaults"
        raise ConfigError(f"{where}: {exc}") from None
    return merged
