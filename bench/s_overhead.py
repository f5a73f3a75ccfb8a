"""Section 7: lowmem's step overhead against a plain torch loop on the same model and batches.

Both sides run in fresh worker processes (bench/worker.py kinds "lowmem" and "plain"),
alternated lowmem, plain, lowmem (log_every 10) per round. Each side takes ``warmup`` untimed
steps, then ``steps`` timed ones; a run's figure is the mean seconds per step over those steps
(lowmem: from its metrics.jsonl rows; plain: time.perf_counter at each step end), and the
section reports medians over the runs. The plain loop gets lowmem's own batches, so lowmem's
figure also carries its data pipeline (measured apart, per batch, in the plain workers).
"""

from __future__ import annotations

from common import alternate, fmt_ratio, median, table

MODEL = "llama_tiny"  # see worker.small_llama_plugin: width 256, MLP 688, 4 heads, 2 layers, vocab 8000
BATCH, LENGTH = 8, 128
GOAL = 1.03
PLAIN, LOG1, LOG10 = "plain torch loop", "lowmem baseline, log_every 1", "lowmem baseline, log_every 10"
VARIANTS = {  # name -> worker spec fields, in the order each round runs them
    LOG1: {"kind": "lowmem", "optimizer": "baseline", "log_every": 1},
    PLAIN: {"kind": "plain"},
    LOG10: {"kind": "lowmem", "optimizer": "baseline", "log_every": 10},
}


def _figures(runs: list[dict], key: str) -> list[float]:
    return [r[key] for r in runs if key in r and r[key] == r[key]]


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}" if values else "n/a"


def run(args, say) -> dict:
    base = {"model": MODEL, "batch_size": BATCH, "max_length": LENGTH, "warmup": args.overhead_warmup,
            "steps": args.overhead_steps, "threads": args.threads}
    specs = {name: {**base, **fields} for name, fields in VARIANTS.items()}
    runs = alternate(specs, args.overhead_repeats, say)
    errors = {name: r["error"][-400:] for name, rs in runs.items() for r in rs if "error" in r}
    plain_window = median(_figures(runs[PLAIN], "window_step_seconds"))
    plain_median = median([median(r["step_times"]) for r in runs[PLAIN] if r.get("step_times")])
    rows, results = [], {}
    for name in (PLAIN, LOG1, LOG10):
        windows = _figures(runs[name], "window_step_seconds")
        step_medians = [median(r["step_times"]) for r in runs[name] if r.get("step_times")]
        window, step_median = median(windows), median(step_medians)
        paired = [mine / theirs for mine, theirs in zip(
            [r.get("window_step_seconds", float("nan")) for r in runs[name]],
            [r.get("window_step_seconds", float("nan")) for r in runs[PLAIN]], strict=False)
            if mine == mine and theirs == theirs]
        ratio = window / plain_window
        results[name] = {"window_step_seconds": windows, "step_medians": step_medians, "median_window": window,
                         "median_step": step_median, "ratio": ratio, "step_median_ratio": step_median / plain_median,
                         "paired_ratios": paired, "goal_met": ratio <= GOAL if name != PLAIN else None,
                         "result_step_seconds": _figures(runs[name], "result_step_seconds")}
        goal = "" if name == PLAIN else ("met" if ratio <= GOAL else "NOT met")
        rows.append([name, f"{window * 1000:.1f}", _spread([w * 1000 for w in windows]).replace(".000", ""),
                     f"{step_median * 1000:.1f}", fmt_ratio(ratio), fmt_ratio(step_median / plain_median),
                     _spread(paired), goal])
    data = median(_figures(runs[PLAIN], "data_seconds"))
    same = _same_losses(runs)
    plain = next((r for r in runs[PLAIN] if "decayed_tensors" in r), {})
    text = (f"Model `{MODEL}` (LLaMA width 256, MLP 688, 4 heads, 2 layers, vocab 8000, "
            f"{plain.get('parameters', 0) / 1e6:.2f}M parameters), batch {BATCH} x {LENGTH}, fp32, torch threads {args.threads or 'default'}; "
            f"{args.overhead_warmup} untimed warm-up steps, then {args.overhead_steps} timed steps per run; "
            f"{args.overhead_repeats} alternated fresh-process runs per row. Both sides: fused AdamW lr 4e-4, "
            f"weight decay 0.01 except norm weights ({plain.get('decayed_tensors', '?')} decayed tensors, "
            f"{plain.get('undecayed_tensors', '?')} not), clip_grad_norm_ 1.0, cosine LambdaLR, the same "
            f"batches from lowmem's pipeline, the same seed-42 initial weights. ms/step: the run's mean over its "
            f"timed steps, median over runs (range in the next column); per-step median: median over runs of "
            f"each run's median step. Goal: lowmem <= {GOAL:.2f}x the plain loop.\n\n"
            + table(["loop", "ms/step", "range ms", "per-step median ms", "ratio to plain",
                     "ratio (per-step medians)", "paired ratios (range)", f"goal <= {GOAL:.2f}x"], rows)
            + f"\n\nlowmem's data pipeline alone: {data * 1000:.2f} ms per batch (inside lowmem's figure, "
              f"outside the plain loop's). Training losses, lowmem (log_every 1) vs plain, first run: {same}.")
    return {"table": text, "results": results, "errors": errors, "raw": runs, "data_seconds_per_batch": data}



def _same_losses(runs: dict[str, list[dict]]) -> str:
    mine = next((r["losses"] for r in runs[LOG1] if r.get("losses")), None)
    theirs = next((r["losses"] for r in runs[PLAIN] if r.get("losses")), None)
    if not mine or not theirs:
        return "n/a"
    count = min(len(mine), len(theirs))
    gap = max(abs(a - b) for a, b in zip(mine[:count], theirs[:count], strict=False))
    return f"largest difference over {count} steps {gap:.2g} (first {mine[0]:.4f} vs {theirs[0]:.4f})"
