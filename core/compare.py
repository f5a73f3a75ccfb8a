"""``lowmem compare``: train one model with several optimizers under the same settings, one run
after another, and put their results side by side (compare.json, compare.md, compare.png).

Each run is a ``lowmem.train`` call: its ``RunResult`` gives the figures, and a run that fails
(bad settings for that optimizer, a non-finite loss, an exception such as an out-of-memory
error) is reported with its reason while the other runs still happen.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowmem.config import TrainConfig
from lowmem.errors import ConfigError, Interrupted, LowmemError
from lowmem.registry import Registry
from lowmem.result import RunResult
from lowmem.text import first_line, format_bytes

# (RunResult field, column title, how to show it); the ratio to the reference follows each figure.
COLUMNS: list[tuple[str, str, str]] = [
    ("final_loss", "final loss", "float"),
    ("eval_loss", "eval loss", "float"),
    ("eval_perplexity", "eval perplexity", "float"),
    ("eval_accuracy", "eval accuracy", "float"),
    ("eval_accuracy_mismatched", "eval accuracy (mismatched)", "float"),
    ("eval_f1", "eval F1", "float"),
    ("eval_matthews_correlation", "eval Matthews corr.", "float"),
    ("eval_pearson", "eval Pearson", "float"),
    ("eval_spearman", "eval Spearman", "float"),
    ("tokens_per_second", "tokens/s", "float"),
    ("step_seconds", "step time (s)", "float"),
    ("param_bytes", "param bytes", "bytes"),
    ("grad_bytes", "grad bytes", "bytes"),
    ("optimizer_state_bytes", "optimizer-state bytes", "bytes"),
    ("peak_memory_bytes", "peak memory", "bytes"),
    ("trainable_params", "trainable params", "count"),
]


@dataclass
class CompareRun:
    optimizer: str
    output_dir: str
    result: RunResult | None = None  # None: the run failed, ``reason`` says why
    reason: str = ""

    @property
    def status(self) -> str:
        return "ok" if self.result is not None else "failed"

    def figure(self, key: str) -> float | None:
        return None if self.result is None else self.result.figure(key)


ALL = "all"


def parse_optimizer_list(text: str) -> list[str]:
    """The comma-separated names, or ``["all"]`` for every installed optimizer (``optimizer_names``)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if ALL in names and names != [ALL]:
        raise ValueError(f"'{ALL}' already runs every installed optimizer; give it alone")
    if not names:
        raise ValueError("give at least one optimizer, e.g. baseline,lora,galore")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"listed twice: {', '.join(duplicates)}")
    return names


def installed(entry: Any) -> bool:
    """Whether a registered optimizer can run here: plugins whose package is missing say "not
    installed" in their description (``lowmem list-optimizers`` shows it with the pip command)."""
    return "not installed" not in str(getattr(entry.obj, "description", ""))


def optimizer_names(names: list[str], registry: Registry) -> tuple[list[str], list[str]]:
    """(optimizers to run, optimizers left out as not installed): ``["all"]`` is every registered
    optimizer by name, the reference first; explicit names are checked and run as given."""
    if names != [ALL]:
        for name in names:
            registry.optimizer(name)  # unknown names fail before anything trains
        return names, []
    reference = registry.reference_optimizer()
    every = sorted(registry.optimizers, key=lambda name: (name != reference, name))
    return ([n for n in every if installed(registry.optimizers[n])],
            [n for n in every if not installed(registry.optimizers[n])])


def by_peak_memory(runs: list[CompareRun]) -> list[CompareRun]:
    """Runs by peak memory, smallest first; failed runs (and runs without the figure) last, in run
    order, so the memory/quality trade-off reads from top to bottom."""
    def key(item: tuple[int, CompareRun]) -> tuple[bool, float, int]:
        peak = item[1].figure("peak_memory_bytes")
        return peak is None, peak if peak is not None else 0.0, item[0]

    return [run for _, run in sorted(enumerate(runs), key=key)]


def reset_peak_memory() -> None:
    """Restart the process's peak-RSS counter (Linux clear_refs '5'), so each run's result
    reports its own peak, not the largest of all runs so far."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass  # not Linux, or not permitted: peaks are then cumulative (said in the footnote)
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    except ImportError:
        pass


def run_all(base: TrainConfig, optimizers: list[str], parent: Path, registry: Registry,
            say: Callable[[str], None] | None = None) -> list[CompareRun]:
    """Train with each optimizer in turn (output in ``parent/<optimizer>``), same seed and budget."""
    from lowmem.distributed import launcher_group

    # Under torchrun or accelerate, the runs share one process group, joined here once.
    with launcher_group(dict(os.environ), want_cuda=base.device != "cpu"):
        return _run_each(base, optimizers, parent, registry,
                         say or (lambda message: print(message, file=sys.stderr, flush=True)))


def _run_each(base: TrainConfig, optimizers: list[str], parent: Path, registry: Registry,
              say: Callable[[str], None]) -> list[CompareRun]:
    from lowmem.training import train

    runs = []
    for name in optimizers:
        output_dir = parent / name.replace("+", "-")
        run = CompareRun(optimizer=name, output_dir=str(output_dir))
        runs.append(run)
        say(f"compare: {name} -> {output_dir}")
        config = dataclasses.replace(base, optimizer=name, output_dir=str(output_dir), optimizer_config={})
        try:
            reset_peak_memory()
            run.result = train(config, registry, say=say)
        except Interrupted:  # the user stopped it: stop the whole comparison too
            run.reason = "stopped by signal"
            say("compare: stopped by signal; the remaining optimizers were not run")
            break
        except LowmemError as exc:
            kind = "bad input" if isinstance(exc, ConfigError) else type(exc).__name__
            run.reason = str(exc) if isinstance(exc, ConfigError) else f"{kind}: {exc}"
        except (Exception, MemoryError) as exc:  # noqa: BLE001 - one failed run must not stop the rest
            run.reason = f"{type(exc).__name__}: {first_line(exc)}"
        if run.result is None:
            say(f"compare: {name} failed: {run.reason}")
    return runs


def ratio(run: CompareRun, key: str, reference: CompareRun | None) -> float | None:
    if reference is None or reference.result is None:
        return None
    mine, theirs = run.figure(key), reference.figure(key)
    if mine is None or not theirs:
        return None
    return mine / theirs


def shown_columns(runs: list[CompareRun]) -> list[tuple[str, str, str]]:
    """The columns some run has a figure for (perplexity for LMs, accuracy for classifiers)."""
    return [c for c in COLUMNS if any(r.figure(c[0]) is not None for r in runs)]


def format_value(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return format_bytes(int(value))
    if kind == "count":
        return f"{int(value):,}"
    return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def table_rows(runs: list[CompareRun], reference_name: str | None) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per optimizer, by peak memory, failed runs last): each figure, then
    ×ratio to the reference if it ran."""
    reference = next((r for r in runs if r.optimizer == reference_name), None)
    columns = shown_columns(runs)
    header = ["optimizer", "status"] + [title for _, title, _ in columns]
    rows = []
    for run in by_peak_memory(runs):
        cells = [run.optimizer, "ok" if run.result is not None else f"failed: {run.reason}"]
        for key, _, kind in columns:
            text = format_value(run.figure(key), kind)
            factor = ratio(run, key, reference)
            if factor is not None and run is not reference:
                text += f" (×{factor:.2f})"
            cells.append(text)
        rows.append(cells)
    return header, rows


def footnote(reference_name: str | None) -> str:
    return (f"Sorted by peak memory, failed runs last. Ratios (×) are to "
            f"{reference_name or 'the reference optimizer (none ran)'}. Peak memory: "
            "CUDA peak allocation on a GPU, else the process's peak resident set (including Python and torch "
            "themselves), reset before each run where Linux allows.")


def write_reports(parent: Path, runs: list[CompareRun], base: TrainConfig,
                  reference_name: str | None) -> None:
    """compare.json (everything, machine-readable) and compare.md (the table)."""
    parent.mkdir(parents=True, exist_ok=True)
    reference = next((r for r in runs if r.optimizer == reference_name), None)
    settings: dict[str, Any] = {**base.to_json(), "optimizers": [r.optimizer for r in runs],
                                "output_dir": str(parent), "reference": reference_name}
    settings.pop("optimizer")
    data = {
        "settings": settings,
        "runs": [
            {
                "optimizer": r.optimizer, "status": r.status, "reason": r.reason, "output_dir": r.output_dir,
                "figures": {key: r.figure(key) for key, _, _ in COLUMNS},
                "ratio_to_baseline": {key: ratio(r, key, reference) for key, _, _ in COLUMNS},
                "result": None if r.result is None else r.result.to_json(),
            }
            for r in runs
        ],
    }
    (parent / "compare.json").write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    header, rows = table_rows(runs, reference_name)
    lines = [f"# lowmem compare: {base.model} ({base.mode})", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    lines += ["", footnote(reference_name), ""]
    (parent / "compare.md").write_text("\n".join(lines), encoding="utf-8")


def print_table(runs: list[CompareRun], title: str, reference_name: str | None) -> None:
    from rich.table import Table

    from lowmem.progress import results_console

    header, rows = table_rows(runs, reference_name)
    table = Table(title=title, caption=footnote(reference_name))
    for name in header:
        table.add_column(name, justify="left" if name in ("optimizer", "status") else "right")
    for row in rows:
        table.add_row(*row)
    results_console().print(table)
