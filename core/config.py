"""The typed run configuration: every training setting and its one default.

Config flows one way: CLI options (or Python code) -> ``TrainConfig`` -> ``lowmem.train``.
``lowmem.resolve.resolve_config`` fills in what depends on the plugins and the machine (the
dataset, the merged optimizer settings, the run folder); that resolved config is what
``config.json`` holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

MODES = ("pretraining", "finetuning")
# bf16/fp16: autocast over fp32 weights. bf16-pure: weights, gradients and states in bf16 with
# no fp32 master copy (what the GaLore paper's 7B-on-24GB figure uses): half the memory, less precision.
DTYPES = ("auto", "bf16", "fp16", "fp32", "bf16-pure")
ON_NONFINITE = ("stop", "skip")
DEVICES = ("auto", "cpu", "cuda")
REPORTERS = ("tensorboard", "wandb")
# With several processes: ddp keeps a full model, gradients and optimizer state per process;
# fsdp (FSDP2's fully_shard) gives each process 1/N of them.
PARALLEL = ("ddp", "fsdp")
BF16_ROUNDINGS = ("kahan", "stochastic", "nearest")  # lowmem.rounding.ROUNDINGS
# The fields that take one of a fixed set of values, and the values.
CHOICES = {"mode": MODES, "dtype": DTYPES, "on_nonfinite": ON_NONFINITE, "device": DEVICES,
           "parallel": PARALLEL, "bf16_rounding": BF16_ROUNDINGS}


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``mode``, ``optimizer`` and ``model`` are required; the rest has defaults."""

    mode: str  # one of MODES
    optimizer: str  # a registered optimizer name
    model: str  # a registered model name, or a Hugging Face model folder or hub id
    # A registered dataset, a local file or folder, or a hub id; "" = the dataset plugins mark as
    # the default for the mode. Resolved into a registered name plus ``dataset_source``.
    dataset: str = ""
    dataset_source: str | None = None  # the path or hub id a generic dataset plugin reads
    batch_size: int = 16  # sequences per micro-batch, per process
    num_epochs: int = 30  # finetuning epochs
    max_length: int = 512  # tokens per sequence
    num_training_tokens: int = 1_000_000_000  # pretraining budget in real (non-padding) tokens
    max_steps: int | None = None  # optimizer steps; caps either mode
    shuffle: bool = True  # reshuffle documents each epoch, deterministically in the seed
    dtype: str = "auto"  # one of DTYPES; auto: bf16 where it is fast, else fp16 (old GPUs) / fp32
    lr: float = 4e-4  # peak learning rate
    weight_decay: float = 0.01  # decoupled weight decay
    # Biases and normalisation weights are not decayed unless this is set (as in HF Trainer).
    decay_norms_and_biases: bool = False
    # Cosine period in optimizer steps after warm-up; None = the rest of the run.
    tmax: int | None = None
    warmup_steps: int | None = None  # linear warm-up in optimizer steps; None = 10% of the run
    min_lr_ratio: float = 0.1  # where the cosine ends, as a fraction of lr
    grad_accum: int = 1  # micro-batches per optimizer step
    # Update each weight from its gradient hook inside backward, so all gradients never exist at
    # once: the optimizer's own "per_layer" setting (for optimizers that have one).
    per_layer: bool = False
    parallel: str = "ddp"  # one of PARALLEL: how several processes share the work
    # Clip the global gradient norm; 0: no clipping. None: 1.0, or none for an optimizer that
    # updates inside backward (per-layer, LOMO), which cannot clip by the global norm.
    max_grad_norm: float | None = None
    seed: int = 42
    # The layers LoRA adapts and GaLore projects: "" = the model's own (every linear layer of the
    # transformer blocks for a Hugging Face folder), comma-separated names, a regular expression
    # matched against qualified names, or "all-linear".
    target_modules: str = ""
    packing: bool = False  # pack LM/SFT/chat examples into full rows, attention kept per example
    activation_checkpointing: bool = False  # recompute each transformer block in backward
    compile: bool = False  # torch.compile the model (inductor)
    # Causal LMs: the loss a chunk of tokens at a time, never the whole batch's fp32 logits.
    lean_loss: bool = False
    # --dtype bf16-pure: how an update is written into a bf16 weight (lowmem.rounding). "kahan":
    # exact to about 16 bits, 2 bytes of state per weight; "stochastic": exact in expectation, no
    # state; "nearest": what plain bf16 arithmetic does (small updates are lost).
    bf16_rounding: str = "kahan"
    test: bool = False  # smoke mode: ~1000 pretraining tokens at length <= 32, or 4 finetuning batches
    # JSON files read into the optimizer's settings (the seed's --lora_config / --galore_config
    # apply to optimizers that declare them in ``config_files``; the third to any optimizer).
    lora_config_file: str | None = None
    galore_config_file: str | None = None
    optimizer_config_file: str | None = None
    # Settings laid over the files; once resolved, the complete merged settings of the optimizer.
    optimizer_config: dict[str, Any] = field(default_factory=dict)
    output_dir: str = ""  # "" = runs/<date>-<model>-<optimizer>
    eval_every: int = 0  # optimizer steps between evaluations; 0 = only at the end
    eval_batches: int = 50  # held-out batches per evaluation
    log_every: int = 10  # optimizer steps between metrics rows
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # newest complete checkpoints kept
    resume: str | None = None  # "latest", a run folder or a checkpoint folder
    on_nonfinite: str = "stop"  # one of ON_NONFINITE
    max_nonfinite_skips: int = 5  # consecutive skipped updates before a "skip" run stops anyway
    model_path: str | None = None  # Hugging Face folder or hub id with weights to finetune
    tokenizer: str | None = None  # tokenizer folder or hub id
    trust_remote_code: bool = False  # allow model folders that ship their own code
    device: str = "auto"  # one of DEVICES
    cache_dir: str = ""  # "" = $LOWMEM_CACHE_DIR, else ~/.cache/lowmem
    report_to: tuple[str, ...] = ()  # any of REPORTERS

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
        if isinstance(values.get("target_modules"), list):  # config.json records the resolved layers
            values["target_modules"] = ",".join(values["target_modules"])
        return cls(**values)


def default_of(name: str) -> Any:
    """The default of a ``TrainConfig`` field: the one place each default is written."""
    found = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    if found.default_factory is not dataclasses.MISSING:
        return found.default_factory()
    return found.default
