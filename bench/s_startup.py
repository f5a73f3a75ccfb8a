"""Section 5: start-up: `lowmem list-optimizers` against importing its CLI libraries alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

from common import median, offline_env, table


def _wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, env=offline_env(), check=True)
    return time.perf_counter() - start


def run(args, say) -> dict:
    lowmem = shutil.which("lowmem") or str(__import__("pathlib").Path(sys.executable).with_name("lowmem"))
    commands = {"lowmem list-optimizers": [lowmem, "list-optimizers"],
                "python -c 'import typer, rich, pluggy'": [sys.executable, "-c", "import typer, rich, pluggy"]}
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.startup_repeats):  # alternated
        for name, command in commands.items():
            times[name].append(_wall(command))
    ours, floor = median(times["lowmem list-optimizers"]), median(times["python -c 'import typer, rich, pluggy'"])
    ratio = ours / floor
    text = (f"Medians of {args.startup_repeats} alternated subprocess runs.\n\n"
            + table(["command", "median s"], [[name, f"{median(v):.3f}"] for name, v in times.items()])
            + f"\n\nRatio: {ratio:.2f}x (goal <= 2: {'met' if ratio <= 2 else 'NOT met'})")
    return {"table": text, "results": {"seconds": times, "ratio": ratio, "goal_met": ratio <= 2}}
