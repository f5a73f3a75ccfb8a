"""Every registered optimizer on one small budget (issue #17), and finetuning a Hugging Face
model folder with the five original built-in optimizers (issue #14).

    /work/venv/bin/python bench/s_optimizers.py [--quick]

Writes bench/optimizers.md and bench/optimizers.json. Every training run happens in its own
subprocess (this script called with --worker SPEC): a fresh registry, torch at one thread,
offline, and one LOWMEM_CACHE_DIR shared by all runs so the tokenizer is trained once.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE_DIR = Path(tempfile.gettempdir()) / "lowmem-optbench-cache"
MARK = "@@RESULT@@ "
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
# The science budget of table 1: llama_60m's layers, 2 deep (bench/worker.py's llama_60m_small).
SMALL = {"model": "llama_60m_small", "batch_size": 8, "max_length": 128, "lr": 1e-3, "eval_batches": 4}
ORIGINAL = ["baseline", "lora", "galore", "galore8bit", "lora+galore8bit"]
SVD_SHAPE, SVD_RANK = (4096, 11008), 1024


# ----------------------------------------------------------------------------- worker side

def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    if spec["kind"] == "svd":
        return svd_timing(spec)
    return train_run(spec)


def registry():
    sys.path.insert(0, str(BENCH))
    from worker import small_llama_plugin

    from lowmem.registry import load_registry

    return load_registry("", extra=[small_llama_plugin()])


def train_run(spec: dict) -> dict:
    import lowmem

    plugins = registry()
    out = tempfile.mkdtemp(prefix="lowmem-optbench-")
    config = lowmem.TrainConfig(
        mode=spec["mode"], optimizer=spec["optimizer"], model=spec["model"], dataset=spec["dataset"],
        batch_size=spec["batch_size"], max_length=spec["max_length"], max_steps=spec["steps"],
        num_training_tokens=10**12, num_epochs=1000, dtype="fp32", device="cpu", lr=spec["lr"],
        optimizer_config=spec.get("config", {}), output_dir=out, cache_dir=str(CACHE_DIR),
        log_every=1, eval_batches=spec["eval_batches"], seed=42,
    )
    started = time.perf_counter()
    result = lowmem.train(config, plugins, say=lambda message: None)
    row = {**spec, "process_seconds": time.perf_counter() - started, "result": result.to_json()}
    resolved = json.loads((Path(out) / "config.json").read_text())
    row["max_grad_norm_in_force"] = resolved.get("max_grad_norm")
    metrics = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    row["losses"] = [m["loss"] for m in metrics if "loss" in m and "tokens_per_second" in m]
    if spec.get("estimate"):
        row["estimate_state_bytes"] = estimated_state_bytes(plugins, spec)
    return row


def estimated_state_bytes(plugins, spec: dict) -> int | str:
    """The plugin's state_bytes formula, on the model built on the meta device."""
    from lowmem.estimate_many import estimate_many

    file = None
    if spec.get("config"):
        file = Path(tempfile.mkdtemp(prefix="lowmem-optbench-")) / "optimizer.json"
        file.write_text(json.dumps(spec["config"]))
    found = estimate_many(plugins, spec["model"], spec["optimizer"], mode=spec["mode"],
                          batch_size=spec["batch_size"], max_length=spec["max_length"], dtype="fp32",
                          per_layer=False, grad_accum=1, optimizer_config_file=file)[spec["optimizer"]]
    return found if isinstance(found, str) else found.optimizer_states


def svd_timing(spec: dict) -> dict:
    """One GaLore projection refresh on a random fp32 matrix: full SVD vs torch.svd_lowrank."""
    import torch

    torch.manual_seed(0)
    matrix = torch.randn(*spec["shape"])
    rank = spec["rank"]

    def timed(fn) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    def full():
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank]

    def randomized():
        u, s, v = torch.svd_lowrank(matrix, q=rank + 10, niter=2)
        return u[:, :rank]

    full_times = [timed(full)]
    # The full SVD on one shared core can take minutes: stop at one when it is that slow.
    while len(full_times) < spec["repeats"] and full_times[0] < spec["full_cap_seconds"]:
        full_times.append(timed(full))
    random_times = [timed(randomized) for _ in range(spec["repeats"])]
    return {"shape": spec["shape"], "rank": rank, "q": rank + 10, "niter": 2, "threads": 1,
            "full_seconds": full_times, "randomized_seconds": random_times,
            "full_median": statistics.median(full_times),
            "randomized_median": statistics.median(random_times)}


# ----------------------------------------------------------------------------- driver side

def run_worker(spec: dict, timeout: float = 600) -> dict:
    env = {**os.environ, **OFFLINE, "LOWMEM_CACHE_DIR": str(CACHE_DIR), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {**spec, "error": f"exit {done.returncode}: " + " | ".join(tail)}
    row = json.loads(lines[-1][len(MARK):])
    row["subprocess_seconds"] = time.perf_counter() - started
    return row


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def every_optimizer(steps: int) -> list[dict]:
    sys.path.insert(0, str(BENCH))
    os.environ.update(OFFLINE)
    names = sorted(registry().optimizers)
    names.remove("baseline")
    runs = [("baseline", {})] + [(name, {}) for name in names]
    runs.insert(runs.index(("galore", {})) + 1, ("galore", {"svd": "randomized"}))
    rows = []
    for name, config in runs:
        spec = {"kind": "train", "mode": "pretraining", "dataset": "stdlib-docs", "optimizer": name,
                "config": config, "steps": steps, "estimate": True, **SMALL}
        row = run_worker(spec)
        rows.append(row)
        label = name + (" (svd randomized)" if config else "")
        if "error" in row:
            say(f"  {label}: {row['error']}")
        else:
            result = row["result"]
            say(f"  {label}: eval_loss {result['eval_loss']:.4f}  step {result['step_seconds']:.2f} s  "
                f"state {result['optimizer_state_bytes']:,} (estimate {row['estimate_state_bytes']})")
    return rows


def sft_rows(count: int) -> list[dict]:
    """Prompts of random words; the answer depends on the prompt ("yes" when it names a colour)."""
    from support_models import sentences

    colours = {"green", "yellow", "silver"}
    return [{"prompt": f"question: does '{s}' name a colour?\nanswer:",
             "completion": " yes" if colours & set(s.split()) else " no"}
            for s in sentences(count, seed=1)]


def finetuning(steps: int, work: Path) -> tuple[list[dict], dict]:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "tests"))
    from support_models import qwen2_folder, write_jsonl

    folder = qwen2_folder(work / "qwen2")
    rows = sft_rows(400)
    data = write_jsonl(work / "sft.jsonl", rows)
    setup = {"model_folder": "tests/support_models.py qwen2_folder (Qwen2, width 32, 2 layers)",
             "examples": len(rows), "yes_fraction": sum(r["completion"] == " yes" for r in rows) / len(rows)}
    results = []
    for name in ORIGINAL:
        spec = {"kind": "train", "mode": "finetuning", "dataset": str(data), "model": str(folder),
                "optimizer": name, "steps": steps, "batch_size": 8, "max_length": 64, "lr": 1e-3,
                "eval_batches": 8}
        row = run_worker(spec)
        results.append(row)
        if "error" in row:
            say(f"  {name}: {row['error']}")
        else:
            say(f"  {name}: eval_loss {row['result']['eval_loss']:.4f}")
    return results, setup


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": sys.version.split()[0], "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "load_average": list(os.getloadavg())}


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def label_of(row: dict) -> str:
    config = row.get("config") or {}
    return row["optimizer"] + "".join(f" ({k}={v})" for k, v in config.items())


def table_one(rows: list[dict]) -> list[str]:
    base = next((r for r in rows if r["optimizer"] == "baseline" and "result" in r), None)
    base_step = base["result"]["step_seconds"] if base else None
    lines = ["| optimizer | state bytes (measured) | state bytes (plugin formula, meta) | equal | "
             "step s | vs baseline | clip (config) | first loss | eval loss |",
             "|---|---:|---:|:-:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {label_of(row)} | error: {row['error'][:80]} | | | | | | | |")
            continue
        result, estimate = row["result"], row.get("estimate_state_bytes")
        measured = result["optimizer_state_bytes"]
        equal = "yes" if estimate == measured else "**no**"
        ratio = f"{result['step_seconds'] / base_step:.2f}x" if base_step else "-"
        first = f"{row['losses'][0]:.3f}" if row["losses"] else "-"
        estimate_text = f"{estimate:,}" if isinstance(estimate, int) else str(estimate)
        lines.append(f"| {label_of(row)} | {measured:,} | {estimate_text} | {equal} | "
                     f"{result['step_seconds']:.3f} | {ratio} | {row['max_grad_norm_in_force']} | {first} | "
                     f"{result['eval_loss']:.4f} |")
    return lines


def table_two(rows: list[dict]) -> list[str]:
    lines = ["| optimizer | trainable params | total params | trainable % | state bytes | state MiB | "
             "step s | eval loss (completions) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['optimizer']} | error: {row['error'][:80]} | | | | | | |")
            continue
        r = row["result"]
        lines.append(f"| {row['optimizer']} | {r['trainable_params']:,} | {r['total_params']:,} | "
                     f"{100 * r['trainable_params'] / r['total_params']:.1f} | "
                     f"{r['optimizer_state_bytes']:,} | "
                     f"{mib(r['optimizer_state_bytes'])} | {r['step_seconds']:.3f} | {r['eval_loss']:.4f} |")
    return lines


def svd_lines(svd: dict, rows: list[dict]) -> list[str]:
    if "error" in svd:
        lines = [f"SVD timing failed: {svd['error']}"]
    else:
        shape = "x".join(map(str, svd["shape"]))
        lines = [f"One projection refresh of a {shape} fp32 random matrix at rank {svd['rank']}, one thread:",
                 "",
                 "| method | runs (s) | median s |", "|---|---|---:|",
                 f"| torch.linalg.svd (full, full_matrices=False) | "
                 f"{', '.join(f'{t:.1f}' for t in svd['full_seconds'])} | {svd['full_median']:.2f} |",
                 f"| torch.svd_lowrank(q={svd['q']}, niter={svd['niter']}) | "
                 f"{', '.join(f'{t:.1f}' for t in svd['randomized_seconds'])} | "
                 f"{svd['randomized_median']:.2f} |",
                 "", f"Randomized is {svd['full_median'] / svd['randomized_median']:.1f}x faster here."]
    galore = [r for r in rows if r["optimizer"] == "galore" and "result" in r]
    full = next((r for r in galore if not r.get("config")), None)
    fast = next((r for r in galore if r.get("config")), None)
    if full and fast:
        a, b = full["result"]["eval_loss"], fast["result"]["eval_loss"]
        lines += ["", f"On the small llama (table above): eval loss full SVD {a:.4f}, randomized {b:.4f}, "
                      f"difference (randomized - full) {b - a:+.4f}."]
    return lines


def write_report(data: dict, path_md: Path, path_json: Path) -> None:
    path_json.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    m, small = data["machine"], SMALL
    lines = ["# Optimizers: every registered one, and finetuning a model folder", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}; "
             f"{m['date']}; load average at start {', '.join(f'{x:.2f}' for x in m['load_average'])}"
             + (f", at end {', '.join(f'{x:.2f}' for x in data['load_average_end'])}"
                if data.get("load_average_end") else "") + ".",
             f"Produced by `bench/s_optimizers.py{' --quick' if data['quick'] else ''}` "
             f"in {data.get('script_seconds', 0):.0f} s. Raw numbers: `bench/optimizers.json`.", "",
             "## 1. Every optimizer (issue #17)", "",
             f"`{small['model']}` (llama_60m layers, 2 deep, vocab 8000; bench/worker.py) pretrained on "
             f"stdlib-docs: batch {small['batch_size']} x {small['max_length']} tokens, "
             f"{data['steps_pretrain']} steps, lr {small['lr']} (default warm-up 10% and cosine), seed 42, "
             "fp32, CPU, one torch thread, "
             f"default max_grad_norm (None: 1.0, or 0 for optimizers that step inside backward; the `clip` "
             f"column is what config.json recorded), eval loss on {small['eval_batches']} held-out batches. "
             "Measured state bytes are RunResult.optimizer_state_bytes; the formula column is "
             "`lowmem.estimate_many.estimate_many(...)[name].optimizer_states` on the meta-device model. "
             "Step seconds are RunResult.step_seconds (train_seconds / steps, the first step included).", ""]
    lines += table_one(data["every_optimizer"])
    lines += ["", "### GaLore refresh: full vs randomized SVD", ""]
    lines += svd_lines(data.get("svd", {"error": "not run"}), data["every_optimizer"])
    setup = data.get("finetuning_setup", {})
    lines += ["", "## 2. Finetuning a model folder (issue #14)", "",
              f"{setup.get('model_folder')}, saved with save_pretrained and loaded by path "
              f"(`mode=finetuning, model=<folder>`); {setup.get('examples')} prompt/completion JSONL rows "
              f"(answer ' yes' when the random words contain a colour, else ' no'; "
              f"{100 * setup.get('yes_fraction', 0):.0f}% yes), lowmem's automatic held-out split; batch 8, "
              f"max_length 64, {data['steps_finetune']} steps, lr 1e-3, default optimizer settings "
              "(GaLore's rank caps itself at the small width). Eval loss is on completion tokens only.", ""]
    lines += table_two(data.get("finetuning", []))
    lines += ["", "## Notes", ""] + [f"- {note}" for note in data["notes"]]
    path_md.write_text("\n".join(lines) + "\n", encoding="utf-8")


def notes(data: dict) -> list[str]:
    found = ["Timings are from a shared 2-core machine that other jobs were loading (see the load "
             "averages): step times and their ratios are indicative only, a few tens of percent of "
             "noise is normal here; one run per optimizer, no repeats.",
             "Eval losses after this few steps on a tiny model rank how fast each optimizer gets "
             "going at one shared lr (1e-3), not where it ends; each optimizer's best lr differs "
             "(LoRA and LOMO in particular are usually run at other rates).",
             "lomo/adalomo were run with the default max_grad_norm (None). The `clip (config)` column "
             "is config.json's max_grad_norm, which records the setting (None), not the value in force: "
             "core/assemble.py resolves None to 0.0 (no clipping) when the built optimizer has "
             "steps_in_backward (lomo, adalomo) and to 1.0 otherwise, so no explicit 0 is needed.",
             "Finetuning eval losses are after only a few dozen steps on a randomly initialised "
             "39k-parameter model: none has learned the yes/no rule yet; they compare early progress."]
    svd = data.get("svd", {})
    if len(svd.get("full_seconds", [])) == 1:
        found.append(f"The full SVD took {svd['full_seconds'][0]:.0f} s on one thread, over the script's "
                     "45 s cap, so it was timed once (not a median of 3); the randomized one 3 times.")
    rows = [r for r in data["every_optimizer"] if "result" in r]
    unequal = [label_of(r) for r in rows
               if r.get("estimate_state_bytes") != r["result"]["optimizer_state_bytes"]]
    found.append("Measured state bytes equal the plugin formula for every optimizer." if not unequal else
                 f"Measured state bytes differ from the plugin formula for: {', '.join(unequal)}.")
    failed = [label_of(r) for r in data["every_optimizer"] + data.get("finetuning", []) if "error" in r]
    if failed:
        found.append(f"Runs that failed: {', '.join(failed)} (the error is in the table and the JSON).")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, one SVD timing: a smoke run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    args = parser.parse_args()
    if args.report_only:
        data = json.loads((BENCH / "optimizers.json").read_text())
        data["notes"] = notes(data)
        write_report(data, BENCH / "optimizers.md", BENCH / "optimizers.json")
        return
    if args.worker:
        os.environ.update(OFFLINE)
        print(MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    os.environ.update(OFFLINE)
    os.environ["LOWMEM_CACHE_DIR"] = str(CACHE_DIR)
    started = time.perf_counter()
    data: dict = {"quick": args.quick, "machine": machine(), "steps_pretrain": 8 if args.quick else 40,
                  "steps_finetune": 6 if args.quick else 30, "small": SMALL, "cache_dir": str(CACHE_DIR)}
    md, js = BENCH / "optimizers.md", BENCH / "optimizers.json"
    say(f"table 1: every optimizer, {data['steps_pretrain']} steps each")
    data["every_optimizer"] = every_optimizer(data["steps_pretrain"])
    with tempfile.TemporaryDirectory(prefix="lowmem-optbench-ft-") as work:
        say(f"table 2: finetuning a Qwen2 folder, {data['steps_finetune']} steps each")
        data["finetuning"], data["finetuning_setup"] = finetuning(data["steps_finetune"], Path(work))
    say("GaLore refresh: full vs randomized SVD")
    data["svd"] = run_worker({"kind": "svd", "shape": list(SVD_SHAPE), "rank": SVD_RANK,
                              "repeats": 1 if args.quick else 3, "full_cap_seconds": 45}, timeout=900)
    data["script_seconds"] = time.perf_counter() - started
    data["load_average_end"] = list(os.getloadavg())
    data["notes"] = notes(data)
    write_report(data, md, js)
    say(f"wrote {md.relative_to(ROOT)} and {js.relative_to(ROOT)} in {data['script_seconds']:.0f} s")


if __name__ == "__main__":
    main()
