"""The run folder: which one (``run_folder``), and its contract: config.json, metrics.jsonl,
summary.json, model/, event files.

Only the main process writes; other ranks get a RunFiles whose writes do nothing.

config.json says what was really built, so that nothing falls back silently: the optimizer class
(and a per-layer wrapper's inner classes), per parameter group its settings, tensors, parameters
and which of them are projected or quantised, and the versions of the libraries and plugins.
Whether a state is quantised (8-bit) is known once the optimizer holds state, which most create at
their first step: ``record_after_first_step`` adds it to config.json then.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowmem.config import TrainConfig
from lowmem.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from lowmem.registry import Registry

# The libraries lowmem and its built-in optimizers train with ("not installed" where absent).
LIBRARIES = ("torch", "transformers", "peft", "galore-torch", "bitsandbytes", "accelerate", "datasets",
             "tokenizers", "adam-mini", "lomo-optim", "apollo-torch")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("lowmem", *LIBRARIES):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def plugin_origins(registry: Registry, config: TrainConfig) -> dict[str, str]:
    """Where the run's optimizer, model and dataset come from: "built-in" (lowmem's own version is
    in ``versions``) or the plugin's "<distribution> <version>"."""
    kinds = (("optimizer", registry.optimizers, config.optimizer), ("model", registry.models, config.model),
             ("dataset", registry.datasets, config.dataset))
    return {kind: table[name].origin if name in table else "not registered" for kind, table, name in kinds}


def optimizer_facts(model: Any, optimizer: Any, groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The optimizer class, a per-layer wrapper's inner classes, and ``groups`` (one row per
    distinct group setting, as ``lowmem.assemble.parameter_groups`` gives them) with each group's
    list-valued settings (betas), ``parameters`` (elements), and the names of its parameters that
    are ``projected`` (a group ``rank`` key, GaLore's and APOLLO's convention, or a projector in
    their state) and ``quantised`` (8-bit tensors in their state; null while there is no state)."""
    names = {id(p): n for n, p in model.named_parameters()}
    known = any(len(state) for state in optimizer.state.values())
    counts = ("tensors", "elements", "examples")
    keyed = [({k: v for k, v in row.items() if k not in counts}, row) for row in groups]
    rows = [{**row, "parameters": row.get("elements", 0), "projected": [], "quantised": [] if known else None}
            for _, row in keyed]
    for group in optimizer.param_groups:
        scalars = {k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")
                   and isinstance(v, int | float | str | bool)}
        row = next((rows[i] for i, (settings, _) in enumerate(keyed) if settings == scalars), None)
        if row is None:  # a group ``groups`` does not show: it gets a row of its own
            size = sum(p.numel() for p in group["params"])
            row = {**scalars, "tensors": len(group["params"]), "elements": size, "parameters": size,
                   "projected": [], "quantised": [] if known else None}
            keyed.append((scalars, row))
            rows.append(row)
        row.update({k: list(v) for k, v in group.items() if isinstance(v, list | tuple) and k != "params"
                    and all(isinstance(x, int | float | str | bool) for x in v)})
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "rank" in group or "projector" in state:
                row["projected"].append(names.get(id(p), "?"))
            if row["quantised"] is not None and any(_is_8bit(t) for t in _tensors(state)):
                row["quantised"].append(names.get(id(p), "?"))
    inner = sorted({type(o).__qualname__ for o in getattr(optimizer, "inner_optimizers", [])})
    return {"optimizer_class": type(optimizer).__qualname__,
            "optimizer_class_path": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            "inner_optimizer_classes": inner, "param_groups": rows}


def _tensors(state: Any) -> list[Any]:
    from lowmem.memory import iter_tensors

    return list(iter_tensors(state))


def _is_8bit(tensor: Any) -> bool:
    """int8/uint8 (bitsandbytes) or float8 state; bool flags are not quantised numbers."""
    return tensor.element_size() == 1 and str(tensor.dtype) != "torch.bool"


def record_after_first_step(optimizer: Any, facts: Callable[[], dict[str, Any]], path: Path | None) -> None:
    """Once the optimizer's first step has made its state, merge ``facts()`` into the JSON file
    at ``path`` (None: not the main process, nothing is written). A one-shot step post hook."""

    def after_step(*args: Any) -> None:
        handle.remove()
        if path is not None and path.is_file():
            _atomic_write_json(path, {**json.loads(path.read_text()), **facts()})

    handle = optimizer.register_step_post_hook(after_step)


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

    def truncate_metrics(self, after_step: int, keep_evaluation: bool = True) -> None:
        """On resume: forget rows a killed run logged after its last checkpoint (and, unless
        ``keep_evaluation``, the evaluation rows at that step)."""
        if not self.is_main or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            step = row.get("step", 0)
            if step < after_step or (step == after_step and (keep_evaluation or "loss" in row)):
                kept.append(line)
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def saved_summary(self) -> dict[str, Any] | None:
        """The summary.json a finished run wrote, if any."""
        try:
            return json.loads((self.dir / "summary.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

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


# -- which folder -----------------------------------------------------------------------------
def run_folder(config: TrainConfig, model: str, optimizer: str) -> Path:
    """The run folder: given, the resumed run's, or a new dated one; never an existing run
    unless resuming it, and writable."""
    output_dir = config.output_dir or None
    if config.resume and config.resume != "latest" and output_dir is None:
        output_dir = str(run_dir_of(Path(config.resume)))
    if config.resume == "latest" and output_dir is None:
        raise ConfigError(
            "--resume latest needs --output-dir: the run folder whose newest checkpoint to continue")
    if output_dir is None:
        path = new_run_dir(model, optimizer)
    else:
        path = Path(output_dir)
        if not config.resume and (path / "config.json").exists():
            raise ConfigError(f"{path} already holds a run; choose another --output-dir or continue it "
                              "with --resume latest")
    check_writable_folder(path)
    return path


def new_run_dir(model: str, optimizer: str, root: Path = Path("runs")) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = root / f"{stamp}-{model}-{optimizer.replace('+', '-')}"
    candidate, n = base, 1
    while candidate.exists():  # never silently overwrite an existing run
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def check_writable_folder(path: Path) -> None:
    """The run folder must be (or become) a writable directory: found now, not after the model
    is built."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output-dir {path} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--output-dir {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"--output-dir {path} cannot be written: {existing} is read-only")
    # Some places refuse folders whatever their permissions say (/proc, a read-only mount): try
    # one of a unique name, so that processes checking at once do not meet, and take it back.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lowmem-check-", dir=existing))
    except OSError as exc:
        raise ConfigError(f"--output-dir {path} cannot be created: {exc.strerror or exc}") from None


def run_dir_of(path: Path) -> Path:
    """A checkpoint folder's run folder (``RUN/checkpoints/step-N`` -> ``RUN``), or the folder itself."""
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return path
