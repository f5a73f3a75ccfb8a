"""The base classes plugins subclass, and the frozen requests lowmem hands them.

Nothing here imports torch: registering a plugin must stay cheap, so heavy
imports belong inside ``build()`` and friends.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch


class ConfigError(ValueError):
    """A user-facing configuration problem; the CLI prints it on one line and exits 2."""


# Objectives a model can be trained for; datasets and the loss follow from them.
CAUSAL_LM = "causal_lm"
MASKED_LM = "masked_lm"
CLASSIFICATION = "classification"


@dataclass(frozen=True)
class OptimizerSettings:
    """What an optimizer plugin is told. New fields may be added; plugins read what they need."""

    lr: float
    weight_decay: float = 0.0
    config: Mapping[str, Any] = field(default_factory=dict)
    # Names (last path component) of the attention and MLP linear layers of the model:
    # LoRA adapts them, GaLore projects their weights.
    target_modules: tuple[str, ...] = ()
    objective: str = CAUSAL_LM
    grad_accum: int = 1
    max_grad_norm: float = 0.0
    world_size: int = 1


class Optimizer:
    """An optimizer plugin: ``build`` returns a ``torch.optim.Optimizer`` for the model."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    default_config: ClassVar[dict[str, Any]] = {}
    # Which of the seed's ``--lora_config`` / ``--galore_config`` files this optimizer reads
    # ("lora", "galore"); ``--optimizer-config`` always applies.
    config_files: ClassVar[tuple[str, ...]] = ()

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Raise ``ConfigError`` naming the key for values that are wrong before any model exists.

        Unknown keys and values whose type differs from ``default_config`` are refused by
        lowmem itself before this is called.
        """

    def prepare_model(self, model: torch.nn.Module, settings: OptimizerSettings) -> torch.nn.Module:
        """Change the model before training (LoRA adds adapters here). Default: unchanged."""
        return model

    def build(self, model: torch.nn.Module, settings: OptimizerSettings) -> torch.optim.Optimizer:
        raise NotImplementedError(f"optimizer plugin {self.name!r} does not implement build()")

    def state_bytes(self, model: torch.nn.Module, settings: OptimizerSettings) -> int | None:
        """Bytes of optimizer state this optimizer will hold for ``model`` (possibly on the meta
        device), for ``lowmem estimate``. ``None``: lowmem falls back to a generic guess."""
        return None

    def save_model(self, model: torch.nn.Module, directory: Path) -> None:
        """Write the trained model in Hugging Face format. LoRA also writes its adapter."""
        model.save_pretrained(directory, safe_serialization=True)  # type: ignore[operator]


@dataclass(frozen=True)
class ModelRequest:
    """How lowmem asks a model plugin for a network."""

    objective: str
    vocab_size: int
    num_labels: int = 0
    # A Hugging Face folder or hub id to load weights from; None builds random weights.
    weights: str | None = None
    # "meta" builds the shapes without memory (lowmem estimate).
    device: str = "cpu"
    pad_token_id: int | None = None
    trust_remote_code: bool = False


class Model:
    """A model plugin: a named architecture lowmem can build for an objective."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    vocab_size: ClassVar[int] = 32000
    max_positions: ClassVar[int] = 1024
    target_modules: ClassVar[tuple[str, ...]] = ()
    # Hub ids used when they can be had (cached or online): its own tokenizer and the
    # pretrained weights finetuning starts from.
    tokenizer_id: ClassVar[str | None] = None
    pretrained_id: ClassVar[str | None] = None

    def objective(self, mode: str, dataset_kind: str) -> str:
        """What the model is trained for in ``mode`` on a dataset of ``dataset_kind``."""
        if mode == "finetuning" and dataset_kind == CLASSIFICATION:
            return CLASSIFICATION
        return CAUSAL_LM

    def build(self, request: ModelRequest) -> torch.nn.Module:
        raise NotImplementedError(f"model plugin {self.name!r} does not implement build()")


@dataclass(frozen=True)
class DataRequest:
    """How lowmem asks a dataset plugin for records."""

    split: str  # "train" or "eval"
    seed: int | None = None  # shuffle order; None keeps the source order
    epoch: int = 0  # each epoch reshuffles with (seed, epoch)
    source: str | None = None  # a path or hub id, for the generic datasets
    cache_dir: Path | None = None


class Dataset:
    """A dataset plugin: records of ``{"text": str}`` or ``{"text": str, "label": int}``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    kind: ClassVar[str] = "text"  # "text" or CLASSIFICATION

    def kind_of(self, source: str | None) -> str:
        """The kind for a given source; generic datasets decide from the files."""
        return self.kind

    def label_names(self, request: DataRequest) -> list[str]:
        """Class names, index = label, for classification datasets."""
        return []

    def records(self, request: DataRequest) -> Iterable[dict[str, Any]]:
        raise NotImplementedError(f"dataset plugin {self.name!r} does not implement records()")
