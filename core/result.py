"""What a finished run returns: ``lowmem.train`` gives a ``RunResult``, and ``summary.json``
holds the same fields."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunResult:
    """The figures of one finished run. Eval metrics that do not apply to the run's objective
    (perplexity for a classifier, accuracy for a language model) are None, as are the CUDA
    peaks on CPU."""

    model: str
    optimizer: str
    mode: str
    output_dir: str
    steps: int  # optimizer steps taken
    tokens: int  # real (non-padding) input tokens trained on, all processes together
    final_loss: float  # the last step's training loss
    # Wall time of the whole run (model build, data, evaluation and saving included) and of the
    # training steps alone, which tokens_per_second and step_seconds are measured on.
    wall_seconds: float
    train_seconds: float
    tokens_per_second: float
    step_seconds: float
    param_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    trainable_params: int
    total_params: int
    peak_rss_bytes: int  # the process's peak resident set
    peak_allocated_bytes: int | None  # CUDA only
    peak_reserved_bytes: int | None  # CUDA only
    # The peak to compare runs by: CUDA's peak allocation on a GPU, else the peak RSS.
    peak_memory_bytes: int
    world_size: int
    # Held-out metrics; those that do not apply to the run's objective and data stay None.
    eval_loss: float | None = None  # on the tokens the training loss is taken on (SFT: completions)
    eval_perplexity: float | None = None  # language modelling
    eval_accuracy: float | None = None  # classification (MNLI: the matched split)
    eval_f1: float | None = None  # binary classification, positive class 1
    eval_matthews_correlation: float | None = None  # binary classification
    eval_pearson: float | None = None  # regression (one float label)
    eval_spearman: float | None = None  # regression
    eval_accuracy_mismatched: float | None = None  # MNLI's validation_mismatched split
    # param_bytes, grad_bytes, optimizer_state_bytes and peak_memory_bytes are this process's
    # (rank 0's in summary.json; its shards under --parallel fsdp); these are their sums over all
    # processes, and per_process holds each process's own: {"rank", "param_bytes", ...}.
    parallel: str = "ddp"
    world_param_bytes: int | None = None
    world_grad_bytes: int | None = None
    world_optimizer_state_bytes: int | None = None
    world_peak_memory_bytes: int | None = None
    per_process: list[dict[str, int]] | None = None
    # --compile: the seconds of the steps that compiled (each process's first), not in train_seconds
    compile_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def figure(self, key: str) -> float | None:
        """A numeric field as a float, or None when it is missing or not finite."""
        value = getattr(self, key, None)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None
