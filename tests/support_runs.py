"""Helpers the end-to-end test modules share (plain functions; fixtures live in conftest.py):
CLI arguments for tiny runs, reading a run folder, comparing two runs bit for bit, and
starting lowmem in a fresh process."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def small_configs(tmp_path: Path) -> list[str]:
    """Settings that fit width-32 models: GaLore rank 4 (below LoRA's r 8), frequent refresh."""
    galore = tmp_path / "galore.json"
    galore.write_text(json.dumps({"rank": 4, "update_proj_gap": 5, "scale": 1.0}))
    return ["--galore_config", str(galore)]


def pretrain_args(
    tmp_path: Path, optimizer: str, out: str = "run", tokens: int = 3000, extra=()
) -> list[str]:
    return ["train", "--mode", "pretraining", "--optimizer", optimizer, "--model", "tiny-llama",
            "--batch_size", "4", "--max_length", "32", "--num_training_tokens", str(tokens), "--lr", "3e-3",
            "--dtype", "fp32", "--log-every", "1", "--eval-batches", "2", "--output-dir", str(tmp_path / out),
            *small_configs(tmp_path), *extra]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_losses(run: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run) if "loss" in row]


def assert_loss_falls(run: Path) -> None:
    losses = train_losses(run)
    assert all(math.isfinite(loss) for loss in losses)
    head, tail = losses[: max(1, len(losses) // 4)], losses[-max(1, len(losses) // 4):]
    assert sum(tail) / len(tail) < sum(head) / len(head), losses


def final_tensors(run: Path):
    import safetensors.torch

    from lowmem.checkpoint_files import complete_checkpoints, load_tensors

    last = complete_checkpoints(run)[-1]
    return safetensors.torch.load_file(str(last / "model.safetensors")), load_tensors(last / "optimizer.pt")


def assert_same_tensors(a, b, where=""):
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_runs_identical(reference: Path, resumed: Path) -> None:
    losses = lambda run: [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]  # noqa: E731
    assert losses(resumed) == losses(reference)
    (weights_a, optim_a), (weights_b, optim_b) = final_tensors(reference), final_tensors(resumed)
    assert_same_tensors(weights_a, weights_b, "model")
    assert_same_tensors(optim_a, optim_b, "optimizer")


def interrupted_copy(reference: Path, target: Path, step: int) -> Path:
    """What a run killed right after checkpoint ``step`` leaves behind: its files and that checkpoint."""
    target.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(reference / name, target / name)
    (target / "checkpoints").mkdir()
    shutil.copytree(reference / "checkpoints" / f"step-{step}", target / "checkpoints" / f"step-{step}")
    return target


def resume_args(args: list[str], out: Path) -> list[str]:
    args = list(args)
    args[args.index("--output-dir") + 1] = str(out)
    return [*args, "--resume", "latest"]


LAUNCH_TIMEOUT = 300


def launch(env, *args, launcher=("-m", "lowmem")) -> subprocess.CompletedProcess:
    """lowmem (or another launcher) in a fresh process with ``env`` (conftest's launch_env)."""
    return subprocess.run([sys.executable, *launcher, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT)


def run_workers(worker, args: tuple, nprocs: int = 2, timeout: float = LAUNCH_TIMEOUT) -> None:
    """``worker(rank, *args)`` in ``nprocs`` freshly spawned processes; killed and failed after
    ``timeout`` seconds. Spawned, not forked: a fork copies the parent's thread pools and any lock
    a thread held at that moment, and CI once hung there for good."""
    import time

    import pytest
    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{worker.__name__} did not finish in {timeout:.0f} s")


def run_lowmem(args: list[str], fault: str = "", **popen) -> subprocess.Popen:
    """lowmem's CLI in a fresh process with the tiny test models registered; ``fault`` is a
    ``tests/fault_injection.py`` instruction such as ``kill:manifest@6``."""
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import fault_injection; "
            "fault_injection.main(sys.argv[1], sys.argv[2:])")
    return subprocess.Popen([sys.executable, "-c", code, fault, *args], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
