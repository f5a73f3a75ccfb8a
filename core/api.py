"""The base classes plugins subclass, and the frozen requests lowmem hands them.

Nothing here imports torch: registering a plugin must stay cheap, so heavy imports belong
inside ``build()`` and friends. What lowmem promises a plugin, and expects back, is written on
each class and method below; README.md ("Writing an optimizer plugin") walks through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch


# Objectives a model can be trained for; datasets and the loss follow from them.
CAUSAL_LM = "causal_lm"
MASKED_LM = "masked_lm"
CLASSIFICATION = "classification"  # sequence classification; one float output for regression
# Kinds of dataset, by the fields of their records (see Dataset):
TEXT = "text"  # {"text"}: language modelling
SFT = "sft"  # {"prompt", "completion"}: the loss on the completion only
CHAT = "chat"  # {"messages": [{"role", "content"}, ...]}: the loss on assistant turns only
REGRESSION = "regression"  # {"text", "label": float} (+ "text_pair"): one output, MSE
CLASSIFICATION_KINDS = (CLASSIFICATION, REGRESSION)


@dataclass(frozen=True)
class OptimizerSettings:
    """What an optimizer plugin is told. New fields may be added; plugins read what they need."""

    lr: float
    weight_decay: float = 0.0
    # The plugin's complete settings: its ``default_config`` overlaid by the user's config files
    # and overrides, merged once by lowmem, key names and value types checked against the
    # defaults, then passed through ``check_config``. Every default key is present.
    config: Mapping[str, Any] = field(default_factory=dict)
    # Names (last path component) of the attention and MLP linear layers of the model:
    # LoRA adapts them, GaLore projects their weights.
    target_modules: tuple[str, ...] = ()
    objective: str = CAUSAL_LM
    grad_accum: int = 1
    # The user's --max-grad-norm; None: not given (lowmem clips at 1.0, or not at all for an
    # optimizer that updates inside backward). Such an optimizer refuses only a given one > 0.
    max_grad_norm: float | None = 0.0
    world_size: int = 1
    # False (the default, as in Hugging Face Trainer): biases and normalisation weights get no
    # weight decay. True: every trainable parameter is decayed.
    decay_norms_and_biases: bool = False
    # Where a plugin's notes go (one line each, "note: ..."); None: nowhere.
    say: Callable[[str], None] | None = None
    # "ddp" or "fsdp" (``--parallel``): with "fsdp" and several processes, ``build`` receives
    # sharded parameters (DTensors; see ``Optimizer.shards``).
    parallel: str = "ddp"
    # With bf16 weights (``--dtype bf16-pure``): how updates are written back, "kahan",
    # "stochastic" or "nearest". An optimizer lowmem builds is wrapped by ``lowmem.rounding``'s
    # ``compensated``; one that updates inside backward applies ``fp32_update`` itself.
    bf16_rounding: str = "kahan"


class Optimizer:
    """An optimizer plugin: ``build`` returns a ``torch.optim.Optimizer`` for the model.

    Per optimizer step the loop runs forward and backward over ``grad_accum`` micro-batches,
    unscales (fp16) and clips the gradients, then calls ``step()`` and ``zero_grad()`` on what
    ``build`` returned, and steps an LR scheduler that sets ``lr`` in its ``param_groups``.

    Updating inside backward: a built optimizer whose attribute ``steps_in_backward`` is true
    updates each parameter from a gradient hook while backward runs (per-layer GaLore does).
    The loop then checks each micro-batch's loss for NaN/inf *before* backward, skips its own
    unscaling and clipping (there is no moment when every gradient exists), refuses fp16, and
    still calls ``step()`` (which must do nothing) and ``zero_grad()`` once per optimizer step,
    so such an optimizer must count micro-batches itself and update on every
    ``settings.grad_accum``-th one.

    Its ``state_dict()`` must hold only tensors and plain values: checkpoints are read back with
    ``torch.load(weights_only=True)``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # Every setting the plugin takes, with its default; users can set exactly these keys.
    default_config: ClassVar[dict[str, Any]] = {}
    # Which of the seed script's per-family files this optimizer reads: "lora" for
    # ``--lora_config``, "galore" for ``--galore_config``. A file given for a family the
    # optimizer does not list is ignored with a note; ``--optimizer-config`` always applies.
    config_files: ClassVar[tuple[str, ...]] = ()
    # True for the full-rank reference that ``lowmem compare`` gives every ratio against.
    reference: ClassVar[bool] = False
    # True when the optimizer trains FSDP-sharded parameters exactly (``--parallel fsdp``): its
    # ``build`` then receives DTensor parameters holding this process's slice, whose gradients
    # are already averaged over the processes, and each update must equal the one a single
    # process makes on the whole tensor. Tensors in its state are DTensors sharded like their
    # parameter or identical on every process (checked at the end of a run). False: refused.
    shards: ClassVar[bool] = False
    # False when a sharded checkpoint of its state loads only into the same number of
    # processes (state kept per slice in a form that does not re-slice, such as 8-bit blocks).
    reshards: ClassVar[bool] = True
    # False when it cannot train on several DDP processes either (it updates inside backward,
    # before DDP averages the gradients): refusals then point to one process, not to DDP.
    data_parallel: ClassVar[bool] = True

    def shard_dims(self, model: torch.nn.Module, settings: OptimizerSettings) -> Mapping[str, int]:
        """Parameters (by name) that FSDP should split along another dimension than rows (0),
        for an optimizer whose update is local only along one side (GaLore keeps the long side
        of a weight and projects the short one). Called before sharding. Default: none."""
        return {}

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

    def replicated_state_bytes(self, model: torch.nn.Module, settings: OptimizerSettings) -> int:
        """Of ``state_bytes``, what every FSDP process holds whole rather than sliced (GaLore's
        projection matrices), for ``lowmem estimate --parallel fsdp``. Default: nothing."""
        return 0

    def save_model(self, model: torch.nn.Module, directory: Path) -> None:
        """Write the trained model into ``directory`` in Hugging Face format, loadable by
        ``AutoModelFor<objective>.from_pretrained(directory)`` with nothing else: a plugin that
        changed the model in ``prepare_model`` (adapters) writes the merged plain model here,
        and may add its own files in sub-folders (LoRA writes ``adapter/``). lowmem writes the
        tokenizer next to it."""
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
        if mode == "finetuning" and dataset_kind in CLASSIFICATION_KINDS:
            return CLASSIFICATION
        return CAUSAL_LM

    def from_source(self, source: str) -> Model | None:
        """A model for ``--model SOURCE`` when SOURCE is not a registered name (a Hugging Face
        folder or hub id, say), or None when this plugin cannot load it. Default: None."""
        return None

    def tokenizer_source(self) -> str | None:
        """Where this model's own tokenizer is (a folder or hub id), for models loaded from a
        source; None: lowmem's usual choice (``tokenizer_id`` if cached, else the fallback BPE)."""
        return None

    def find_targets(self, model: torch.nn.Module) -> tuple[str, ...]:
        """The layers LoRA adapts and GaLore projects, when ``target_modules`` is empty: names
        (suffixes of qualified module names) found on the built model. Default: none."""
        return ()

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
    """A dataset plugin. Its records, by ``kind_of``: ``{"text"}`` (TEXT), ``{"prompt",
    "completion"}`` (SFT), ``{"messages": [{"role", "content"}]}`` (CHAT), ``{"text", "label":
    int}`` (CLASSIFICATION) or ``{"text", "label": float}`` (REGRESSION); the classification
    kinds may add ``"text_pair"`` for sentence-pair tasks."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    kind: ClassVar[str] = "text"  # "text" or CLASSIFICATION
    # Modes ("pretraining", "finetuning") for which this dataset is used when none is given.
    default_for: ClassVar[tuple[str, ...]] = ()
    # True: the offline fallback tokenizer may be trained on this dataset's text.
    tokenizer_corpus: ClassVar[bool] = False
    # True: ``--dataset NAME/SOURCE`` reaches this dataset with ``DataRequest.source`` SOURCE
    # (``glue/mrpc``: dataset ``glue``, source ``mrpc``).
    takes_source: ClassVar[bool] = False

    def kind_of(self, source: str | None) -> str:
        """The kind for a given source; generic datasets decide from the files."""
        return self.kind

    def label_names(self, request: DataRequest) -> list[str]:
        """Class names, index = label, for classification datasets."""
        return []

    def eval_splits(self, source: str | None) -> dict[str, str]:
        """Held-out splits to evaluate on: DataRequest split name -> suffix of their metric keys
        (MNLI: {"eval": "", "eval_mismatched": "_mismatched"})."""
        return {"eval": ""}

    def records(self, request: DataRequest) -> Iterable[dict[str, Any]]:
        raise NotImplementedError(f"dataset plugin {self.name!r} does not implement records()")
