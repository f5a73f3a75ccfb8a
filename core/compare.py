"""``lowmem compare``: train one model with several optimizers under the same settings, one run
after another, and put their results side by side (compare.json, compare.md, compare.png).

A run that fails (bad settings for that optimizer, a non-zero exit, an exception such as an
out-of-memory error) is reported with its reason; the other runs still happen.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowmem.api import ConfigError
from lowmem.registry import Registry
from lowmem.text import first_line, format_bytes

EXIT_REASONS = {2: "bad input", 3: "non-finite loss or gradient", 130: "interrupted", 143: "terminated"}

# (summary key, column title, how to show it); the ratio to baseline follows each figure.
COLUMNS: list[tuple[str, str, str]] = [
    ("final_loss", "final loss", "float"),
    ("eval_loss", "eval loss", "float"),
    ("eval_perplexity", "eval perplexity", "float"),
    ("eval_accuracy", "eval accuracy", "float"),
    ("tokens_per_second", "tokens/s", "float"),
    ("step_seconds", "step time (s)", "float"),
    ("param_bytes", "param bytes", "bytes"),
    ("grad_bytes", "grad bytes", "bytes"),
    ("optimizer_state_bytes", "optimizer-state bytes", "bytes"),
    ("peak_memory_bytes", "peak memory", "bytes"),
    ("trainable_params", "trainable params", "count"),
]
BASELINE = "baseline"


@dataclass
class RunResult:
    optimizer: str
    output_dir: str
    status: str = "ok"  # "ok" or "failed"
    reason: str = ""
    summary: dict[str, Any] = field(default_factory=dict)

    def figure(self, key: str) -> float | None:
        value = self.summary.get(key)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def parse_optimizer_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("give at least one optimizer, e.g. baseline,lora,galore")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"listed twice: {', '.join(duplicates)}")
    return names


def run_dir_name(optimizer: str) -> str:
    return optimizer.replace("+", "-")


def reset_peak_memory() -> None:
    """Restart the process's peak-RSS counter (Linux clear_refs '5'), so each run's
    summary reports its own peak, not the largest of all runs so far."""
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


def run_all(
    base_params: Mapping[str, Any],
    optimizers: list[str],
    parent: Path,
    registry: Registry,
    environ: Mapping[str, str],
    say: Callable[[str], None] | None = None,
) -> list[RunResult]:
    """Train with each optimizer in turn (output in ``parent/<optimizer>``), same seed and budget."""
    from lowmem.loop import run_training
    from lowmem.resolve import build_train_config

    say = say or (lambda message: print(message, file=sys.stderr, flush=True))
    results = []
    for name in optimizers:
        output_dir = parent / run_dir_name(name)
        result = RunResult(optimizer=name, output_dir=str(output_dir))
        results.append(result)
        say(f"compare: {name} -> {output_dir}")
        try:
            config = build_train_config({**base_params, "optimizer": name, "output_dir": output_dir},
                                        registry, environ=environ, note=say)
            reset_peak_memory()
            errors = ErrorLines(sys.stderr)
            with contextlib.redirect_stderr(errors):
                code = run_training(config, registry, environ=dict(environ))
        except ConfigError as exc:
            result.status, result.reason = "failed", str(exc)
        except (Exception, MemoryError) as exc:  # noqa: BLE001 - one failed run must not stop the rest
            result.status, result.reason = "failed", f"{type(exc).__name__}: {first_line(exc)}"
        else:
            if code in (130, 143):  # the user stopped it: stop the whole comparison too
                result.status, result.reason = "failed", "stopped by signal"
                say("compare: stopped by signal; the remaining optimizers were not run")
                break
            if code != 0:
                result.status = "failed"
                result.reason = f"exit code {code} ({EXIT_REASONS.get(code, 'error')})"
                if errors.last:
                    result.reason += f": {errors.last}"
        if result.status == "ok":
            result.summary = read_summary(output_dir)
        else:
            say(f"compare: {name} failed: {result.reason}")
    return results


class ErrorLines:
    """A stderr that passes everything through and remembers the last ``error:`` line, which
    the training loop prints before it returns a non-zero exit code."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.startswith("error: "):
                self.last = line.removeprefix("error: ").strip()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, encoding, fileno: the real stream's
        return getattr(self.stream, name)


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A run's summary.json, with the figures compare adds: step time and one peak-memory figure
    (CUDA peak allocation when there is one, else the process's peak RSS)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text(encoding="utf-8"))
    steps = summary.get("steps") or 0
    if steps and summary.get("wall_seconds") is not None:
        summary["step_seconds"] = summary["wall_seconds"] / steps
    summary["peak_memory_bytes"] = summary.get("peak_allocated_bytes", summary.get("peak_rss_bytes"))
    return summary


def ratio(result: RunResult, key: str, baseline: RunResult | None) -> float | None:
    if baseline is None or baseline.status != "ok":
        return None
    mine, theirs = result.figure(key), baseline.figure(key)
    if mine is None or not theirs:
        return None
    return mine / theirs


def shown_columns(results: list[RunResult]) -> list[tuple[str, str, str]]:
    """The columns some run has a figure for (perplexity for LMs, accuracy for classifiers)."""
    return [c for c in COLUMNS if any(r.figure(c[0]) is not None for r in results)]


def format_value(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return format_bytes(int(value))
    if kind == "count":
        return f"{int(value):,}"
    return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def table_rows(results: list[RunResult]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (one per optimizer): each figure, then ×ratio to baseline if it ran."""
    baseline = next((r for r in results if r.optimizer == BASELINE), None)
    columns = shown_columns(results)
    header = ["optimizer", "status"] + [title for _, title, _ in columns]
    rows = []
    for result in results:
        status = "ok" if result.status == "ok" else f"failed: {result.reason}"
        cells = [result.optimizer, status]
        for key, _, kind in columns:
            text = format_value(result.figure(key), kind)
            factor = ratio(result, key, baseline)
            if factor is not None and result is not baseline:
                text += f" (×{factor:.2f})"
            cells.append(text)
        rows.append(cells)
    return header, rows


FOOTNOTE = (
    "Ratios (×) are to baseline. Peak memory: CUDA peak allocation on a GPU, else the process's peak "
    "resident set (including Python and torch themselves), reset before each run where Linux allows."
)


def write_reports(parent: Path, results: list[RunResult], settings: Mapping[str, Any]) -> None:
    """compare.json (everything, machine-readable) and compare.md (the table)."""
    parent.mkdir(parents=True, exist_ok=True)
    baseline = next((r for r in results if r.optimizer == BASELINE), None)
    data = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()},
        "runs": [
            {
                "optimizer": r.optimizer, "status": r.status, "reason": r.reason, "output_dir": r.output_dir,
                "figures": {key: r.figure(key) for key, _, _ in COLUMNS},
                "ratio_to_baseline": {key: ratio(r, key, baseline) for key, _, _ in COLUMNS},
                "summary": r.summary,
            }
            for r in results
        ],
    }
    (parent / "compare.json").write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    header, rows = table_rows(results)
    lines = [
        f"# lowmem compare: {settings.get('model')} ({settings.get('mode')})",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    lines += ["", FOOTNOTE, ""]
    (parent / "compare.md").write_text("\n".join(lines), encoding="utf-8")


def print_table(results: list[RunResult], title: str) -> None:
    from rich.table import Table

    from lowmem.progress import results_console

    header, rows = table_rows(results)
    table = Table(title=title, caption=FOOTNOTE)
    for name in header:
        table.add_column(name, justify="left" if name in ("optimizer", "status") else "right")
    for row in rows:
        table.add_row(*row)
    results_console().print(table)


