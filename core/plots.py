"""Plots for ``lowmem compare`` and ``lowmem plot``: loss curves from each run's metrics.jsonl and
a stacked bar chart of the memory each optimizer used (matplotlib, a regular dependency)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# RunResult fields stacked in the memory bar chart, bottom to top.
MEMORY_PARTS = (("param_bytes", "weights"), ("grad_bytes", "gradients"),
                ("optimizer_state_bytes", "optimizer states"))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none touched
    import matplotlib.pyplot as plt

    return plt


def read_losses(run_dir: Path) -> tuple[list[int], list[float]]:
    """(steps, training losses) logged in ``run_dir/metrics.jsonl`` (eval rows have no ``loss``)."""
    path = Path(run_dir) / "metrics.jsonl"
    steps: list[int] = []
    losses: list[float] = []
    if not path.is_file():
        return steps, losses
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill: the rest still plots
            continue
        if "loss" in row and "step" in row:
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
    return steps, losses


def run_label(run_dir: Path) -> str:
    """The optimizer name from the run's config.json, else the folder name."""
    config = Path(run_dir) / "config.json"
    try:
        return str(json.loads(config.read_text(encoding="utf-8"))["optimizer"])
    except (OSError, ValueError, KeyError, TypeError):
        return Path(run_dir).name


def draw_loss_curves(axes: Any, run_dirs: list[Path], labels: list[str] | None = None) -> int:
    """Plot each run's loss curve on ``axes``; returns how many runs had losses."""
    drawn = 0
    for index, run_dir in enumerate(run_dirs):
        steps, losses = read_losses(run_dir)
        if not steps:
            continue
        label = labels[index] if labels else run_label(run_dir)
        axes.plot(steps, losses, marker="." if len(steps) < 30 else None, label=label)
        drawn += 1
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.set_title("loss")
    axes.grid(alpha=0.3)
    if drawn:
        axes.legend()
    return drawn


def draw_memory_bars(axes: Any, names: list[str], results: list[Any]) -> None:
    """One stacked bar per optimizer: weights, gradients and optimizer states, in MiB."""
    bottoms = [0.0] * len(names)
    for key, label in MEMORY_PARTS:
        heights = [float(r.figure(key) or 0) / 2**20 for r in results]
        axes.bar(names, heights, bottom=bottoms, label=label)
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    axes.set_ylabel("MiB")
    axes.set_title("memory by part")
    axes.legend()
    axes.tick_params(axis="x", labelrotation=20)


def write_loss_plot(run_dirs: list[Path], output: Path) -> int:
    """The loss curves of ``run_dirs`` into ``output`` (PNG); returns the number of curves."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 5))
    drawn = draw_loss_curves(axes, run_dirs)
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return drawn


def write_compare_plot(runs: list[Any], output: Path) -> None:
    """Loss curves of every run and the memory breakdown of the runs that finished."""
    plt = _pyplot()
    figure, (loss_axes, memory_axes) = plt.subplots(1, 2, figsize=(13, 5))
    finished = [r for r in runs if r.result is not None]
    draw_loss_curves(loss_axes, [Path(r.output_dir) for r in runs], [r.optimizer for r in runs])
    draw_memory_bars(memory_axes, [r.optimizer for r in finished], [r.result for r in finished])
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
