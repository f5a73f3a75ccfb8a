"""Progress on stderr: a rich bar on a terminal, plain log lines in CI logs and pipes."""

from __future__ import annotations

import sys
import time
from typing import Any

from lowmem.text import format_bytes


class Progress:
    """Shows step, tokens, loss, lr, tokens/s, memory and ETA. Silent on ranks other than 0."""

    def __init__(self, total_steps: int, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.total = max(1, total_steps)
        self.started = time.perf_counter()
        self.bar: Any = None
        if enabled and self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self.task = self.bar.add_task("train", total=self.total, info="")
            self.bar.start()

    def update(self, step: int, tokens: int, loss: float, lr: float, tokens_per_second: float,
               memory: int) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.started
        info = (
            f"tokens {tokens:,}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_second:,.0f} tok/s  "
            f"mem {format_bytes(memory)}"
        )
        if self.bar is not None:
            self.bar.update(self.task, completed=min(step, self.total), info=info)
            return
        eta = elapsed / max(step, 1) * max(self.total - step, 0)
        print(f"step {step}/{self.total}  {info}  eta {eta:.0f}s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def results_console(stream=None):
    """A rich console for result tables on stdout: when stdout is a file or pipe, tables are
    drawn wide instead of squeezed to 80 columns with truncated cells."""
    from rich.console import Console

    out = stream or sys.stdout
    return Console(file=out, soft_wrap=False, width=None if out.isatty() else 240)
