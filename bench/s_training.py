"""Sections 1 and 3: lowmem against Hugging Face Trainer, and each lowmem optimizer against
lowmem's baseline, from real training runs (one process each, alternated)."""

from __future__ import annotations

from common import alternate, fmt_ratio, median, table

MODEL = "llama_60m_small"  # see worker.small_llama_plugin: llama_60m layers, 2 deep, vocab 8000
TRAINER_PAIRS = {  # lowmem optimizer -> Trainer optim
    "baseline": "adamw_torch",
    "galore": "galore_adamw",
}
OPTIMIZERS = {
    "baseline": ("baseline", {}),
    "galore": ("galore", {}),
    "galore8bit": ("galore8bit", {}),
    "lora": ("lora", {}),
    "lora+galore8bit": ("lora+galore8bit", {}),
    "galore8bit per-layer": ("galore8bit", {"per_layer": True}),
}


def _spec(args, **extra) -> dict:
    return {"model": MODEL, "batch_size": 4, "max_length": 256, "warmup": args.warmup, "steps": args.steps,
            "threads": args.threads, **extra}


def _tps(runs: list[dict]) -> float:
    return median([r["tokens_per_second"] for r in runs if "tokens_per_second" in r])


def _rss(runs: list[dict]) -> float:
    return median([r["peak_rss_bytes"] for r in runs if "peak_rss_bytes" in r])


def run(args, say) -> dict:
    specs = {}
    for name, (optimizer, config) in OPTIMIZERS.items():
        specs[f"lowmem {name}"] = _spec(args, kind="lowmem", optimizer=optimizer, config=config)
        if name in TRAINER_PAIRS:
            specs[f"trainer {TRAINER_PAIRS[name]}"] = _spec(args, kind="trainer", optim=TRAINER_PAIRS[name])
    runs = alternate(specs, args.repeats, say)
    errors = {name: r["error"][-400:] for name, rs in runs.items() for r in rs if "error" in r}
    trainer_rows, trainer = [], {}
    for name, optim in TRAINER_PAIRS.items():
        ours, theirs = runs[f"lowmem {name}"], runs[f"trainer {optim}"]
        ratio = _tps(ours) / _tps(theirs)
        memory = _rss(ours) / _rss(theirs)
        trainer[name] = {"lowmem_tokens_per_second": _tps(ours), "trainer_tokens_per_second": _tps(theirs),
                         "throughput_ratio": ratio, "lowmem_peak_rss": _rss(ours),
                         "trainer_peak_rss": _rss(theirs), "memory_ratio": memory,
                         "goal_met": ratio >= 1.1 and memory <= 1.0}
        trainer_rows.append([f"{name} vs {optim}", f"{_tps(ours):.0f}", f"{_tps(theirs):.0f}",
                             fmt_ratio(ratio), f"{_rss(ours) / 2**20:.0f}", f"{_rss(theirs) / 2**20:.0f}",
                             fmt_ratio(memory)])
    base = median([r["step_seconds"] for r in runs["lowmem baseline"] if "step_seconds" in r])
    overhead, overhead_rows = {}, []
    for name in OPTIMIZERS:
        step = median([r["step_seconds"] for r in runs[f"lowmem {name}"] if "step_seconds" in r])
        overhead[name] = {"step_seconds": step, "ratio_to_baseline": step / base,
                          "peak_rss": _rss(runs[f"lowmem {name}"])}
        overhead_rows.append([name, f"{step:.2f}", fmt_ratio(step / base),
                              f"{_rss(runs[f'lowmem {name}']) / 2**20:.0f}"])
    text1 = (f"Model: `{MODEL}` (llama_60m's 512/1376/8-head layers, 2 layers, vocab 8000), batch 4 x 256, "
             f"fp32, {args.warmup} warm-up step(s) then median of {args.steps} steps per run, {args.repeats} "
             f"alternated run(s) per side, torch threads {args.threads or 'default'}. Peak memory = peak RSS "
             "of the run's process.\n\n"
             + table(["pair", "lowmem tok/s", "Trainer tok/s", "ratio", "lowmem peak MiB", "Trainer peak MiB",
                      "memory ratio"], trainer_rows))
    text3 = ("Same runs: median step seconds in lowmem's loop, ratio to baseline.\n\n"
             + table(["optimizer", "s/step", "ratio to baseline", "peak RSS MiB"], overhead_rows))
    return {"trainer": {"table": text1, "results": trainer},
            "overhead": {"table": text3, "results": overhead}, "errors": errors, "raw": runs}
