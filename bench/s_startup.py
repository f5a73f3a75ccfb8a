"""Section 5: start-up: `lowmem --help` and `lowmem list-optimizers` against importing the CLI's
libraries alone (`python -c "import typer, rich, pluggy"`), each in a fresh process."""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import fmt_ratio, median, offline_env, table

GOAL = 2.0
FLOOR = "python -c 'import typer, rich, pluggy'"


def _wall(command: list[str]) -> tuple[float, float]:
    """Wall seconds of ``command`` and the CPU seconds (user + system) its process used: the
    CPU figure does not grow while other jobs hold the cores."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, env=offline_env(), check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def run(args, say) -> dict:
    lowmem = shutil.which("lowmem") or str(Path(sys.executable).with_name("lowmem"))
    commands = {"lowmem --help": [lowmem, "--help"],
                "lowmem list-optimizers": [lowmem, "list-optimizers"],
                FLOOR: [sys.executable, "-c", "import typer, rich, pluggy"]}
    for command in commands.values():  # untimed: warm the page cache and byte-code files
        _wall(command)
    times: dict[str, list[float]] = {name: [] for name in commands}
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.startup_repeats):  # alternated, so load from other jobs hits all alike
        for name, command in commands.items():
            wall, used = _wall(command)
            times[name].append(wall)
            cpu[name].append(used)
    floor, cpu_floor = median(times[FLOOR]), median(cpu[FLOOR])
    results, rows = {}, []
    for name, seconds in times.items():
        ratio, cpu_ratio = median(seconds) / floor, median(cpu[name]) / cpu_floor
        met = None if name == FLOOR else ratio <= GOAL
        results[name] = {"seconds": seconds, "median": median(seconds), "ratio": ratio, "goal_met": met,
                         "cpu_seconds": cpu[name], "cpu_median": median(cpu[name]), "cpu_ratio": cpu_ratio}
        rows.append([f"`{name}`", f"{median(seconds):.3f}", f"{min(seconds):.3f}-{max(seconds):.3f}",
                     fmt_ratio(ratio), f"{median(cpu[name]):.3f} ({fmt_ratio(cpu_ratio)})",
                     "" if met is None else ("met" if met else "NOT met")])
    text = (f"Wall seconds of a fresh process, median of {args.startup_repeats} alternated runs each "
            f"(after one untimed run of each); ratio to the import-only floor; goal <= {GOAL:.1f}x. CPU s: "
            "the process's user + system time, median (it does not grow while other jobs hold the cores)."
            "\n\n" + table(["command", "median s", "range s", "ratio to floor", "CPU s (ratio)",
                             f"goal <= {GOAL:.1f}x"], rows))
    met = all(r["goal_met"] is not False for r in results.values())
    return {"table": text, "results": results, "goal_met": met}
