"""Helpers of the --parallel fsdp tests (the shared 2-process runs are conftest's sharded_runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support_runs import pretrain_args, read_metrics, train_losses

TOKENS = 2560  # 10 steps of 2 x 4 x 32 tokens


def fsdp_args(folder: Path, optimizer: str, out: str, extra=()) -> list[str]:
    """A 10-step run of the tiny LLaMA, checkpoints every 3 steps, data in order."""
    # LoRA keeps its dropout: each batch's masks come from its own seed, on any process.
    return pretrain_args(folder, optimizer, out=out, tokens=TOKENS,
                         extra=["--shuffle", "false", "--save-every", "3", "--keep-checkpoints", "10",
                                *extra])


def assert_close_losses(run: Path, reference: Path, rel: float = 1e-5) -> None:
    """The same steps, each loss within ``rel`` of the reference's."""
    steps = lambda r: [row["step"] for row in read_metrics(r) if "loss" in row]  # noqa: E731
    assert steps(run) == steps(reference) and len(steps(run)) >= 8
    assert train_losses(run) == pytest.approx(train_losses(reference), rel=rel)


def state_bytes(run: Path) -> dict[str, int]:
    summary = json.loads((run / "summary.json").read_text())
    return {key: summary[key] for key in summary if key.endswith("_bytes") and summary[key] is not None}
