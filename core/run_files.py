"""The run folder contract: config.json, metrics.jsonl, summary.json, model/, event files.

Only the main process writes; other ranks get a RunFiles whose writes do nothing.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

from lowmem.config import TrainConfig

LIBRARIES = ("torch", "transformers", "peft", "galore-torch", "bitsandbytes", "accelerate", "datasets",
             "tokenizers")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("lowmem", *LIBRARIES):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class RunFiles:
    def __init__(self, run_dir: Path, is_main: bool = True, report_to: tuple[str, ...] = ()):
        self.dir = Path(run_dir)
        self.is_main = is_main
        self.metrics_path = self.dir / "metrics.jsonl"
        self.tensorboard: Any = None
        self.wandb: Any = None
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._open_reporters(report_to)

    def _open_reporters(self, report_to: tuple[str, ...]) -> None:
        # TensorBoard is written whenever it is installed; wandb only when asked for.
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.dir / "tensorboard"))
        except ImportError:
            if "tensorboard" in report_to:
                raise ImportError(
                    "--report-to tensorboard needs: pip install 'lowmem[tensorboard]'") from None
        if "wandb" in report_to:
            import wandb

            self.wandb = wandb.init(project="lowmem", dir=str(self.dir))

    def write_config(self, config: TrainConfig, extra: dict[str, Any]) -> None:
        if self.is_main:
            _atomic_write_json(self.dir / "config.json", {**config.to_json(), **extra})

    def log(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key in ("step", "tokens") or not isinstance(value, int | float):
                continue
            if self.tensorboard is not None:
                self.tensorboard.add_scalar(key, value, row["step"])
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    def truncate_metrics(self, after_step: int) -> None:
        """On resume: forget rows a killed run logged after its last checkpoint."""
        if not self.is_main or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if row.get("step", 0) <= after_step:
                kept.append(line)
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.is_main:
            _atomic_write_json(self.dir / "summary.json", summary)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def __enter__(self) -> RunFiles:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def logged_losses(self) -> list[float]:
        """The training losses in metrics.jsonl, in order."""
        if not self.metrics_path.exists():
            return []
        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        return [row["loss"] for row in rows if "loss" in row]
