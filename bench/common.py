"""Helpers shared by the benchmark sections: machine description, medians, subprocess workers.

Each measured training run happens in its own subprocess so that its peak RSS (its memory's
high-water mark, which only ever grows) belongs to that run alone, and runs of A and B alternate
A B A B so that load from other processes on the machine hits both alike.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = Path(tempfile.gettempdir()) / "lowmem-bench-cache"
MiB = 2**20


def offline_env() -> dict[str, str]:
    env = dict(os.environ)
    for switch in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env[switch] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["LOWMEM_LOAD_PLUGINS"] = ""  # only the built-in plugins are measured
    env["LOWMEM_CACHE_DIR"] = str(CACHE_DIR)
    return env


def machine() -> dict[str, object]:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
    }
    try:
        with open("/proc/loadavg") as handle:
            info["load_average_at_start"] = float(handle.read().split()[0])
    except OSError:
        pass
    return info


def machine_line(info: dict[str, object]) -> str:
    cuda = info.get("cuda_device") or "none"
    return (f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
            f"Python {info['python']}, CUDA device: {cuda}, "
            f"load average at start {info.get('load_average_at_start')}")


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def time_call(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run_worker(spec: dict, timeout: float = 900) -> dict:
    """Run ``bench/worker.py`` on ``spec`` in a fresh process; its last stdout line is JSON."""
    command = [sys.executable, str(BENCH_DIR / "worker.py"), json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, env=offline_env(), timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout)[-2000:]
        return {"error": f"worker exited {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def alternate(specs: dict[str, dict], repeats: int, say) -> dict[str, list[dict]]:
    """Run every spec ``repeats`` times, interleaved (A B C A B C ...), each in its own process."""
    results: dict[str, list[dict]] = {name: [] for name in specs}
    for round_index in range(repeats):
        for name, spec in specs.items():
            started = time.perf_counter()
            result = run_worker(spec)
            results[name].append(result)
            summary = result.get("error", "")[:300] or f"{result.get('tokens_per_second', 0):.0f} tok/s"
            say(f"  [{round_index + 1}/{repeats}] {name}: {summary} ({time.perf_counter() - started:.0f} s)")
    return results


def fmt_ratio(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f}x"


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
