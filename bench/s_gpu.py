"""Section 6: GPU. Runs only when CUDA is present (skipped, and marked so, otherwise).

Per optimizer on llama_1b (bf16 autocast, batch 4 x 256): tokens/s and peak allocated memory
through lowmem's real loop, and llama_7b galore8bit per-layer at batch 1 (the paper reports
22.72 GB on an RTX 4090 at rank 1024). Each run is its own process, so its CUDA peak is its own.
"""

from __future__ import annotations

from common import fmt_ratio, median, run_worker, table

RUNS = {
    "llama_1b baseline": ("llama_1b", "baseline", {}, 4),
    "llama_1b galore": ("llama_1b", "galore", {"rank": 512}, 4),
    "llama_1b galore8bit": ("llama_1b", "galore8bit", {"rank": 512}, 4),
    "llama_1b galore8bit per-layer": ("llama_1b", "galore8bit", {"rank": 512, "per_layer": True}, 4),
    "llama_1b lora": ("llama_1b", "lora", {}, 4),
    "llama_7b galore8bit per-layer": ("llama_7b", "galore8bit", {"rank": 1024, "per_layer": True}, 1),
}


def run(args, say) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine",
                "table": "Skipped: no CUDA device on this machine."}
    results, rows = {}, []
    for name, (model, optimizer, config, batch) in RUNS.items():
        spec = {"kind": "lowmem", "device": "cuda", "dtype": "bf16", "model": model, "optimizer": optimizer,
                "config": config, "batch_size": batch, "max_length": 256, "warmup": args.warmup,
                "steps": args.steps}
        runs = [run_worker(spec, timeout=1800) for _ in range(args.repeats)]
        good = [r for r in runs if "error" not in r]
        if not good:
            results[name] = {"error": runs[0]["error"][-500:]}
            rows.append([name, "error", "", ""])
            continue
        tps = median([r["tokens_per_second"] for r in good])
        peak = max(r.get("peak_allocated_bytes", 0) for r in good)
        results[name] = {"tokens_per_second": tps, "peak_allocated_bytes": peak}
        rows.append([name, f"{tps:.0f}", f"{peak / 1e9:.2f}", ""])
        say(f"  {name}: {tps:.0f} tok/s, peak allocated {peak / 1e9:.2f} GB")
    base = results.get("llama_1b baseline", {}).get("tokens_per_second")
    for row, name in zip(rows, RUNS, strict=True):
        tps = results[name].get("tokens_per_second")
        if base and tps and name.startswith("llama_1b"):
            row[3] = fmt_ratio(tps / base)
    text = (f"bf16, {args.warmup} warm-up + {args.steps} steps, {args.repeats} run(s); paper: llama_7b 8-bit "
            "GaLore per-layer 22.72 GB at batch 1.\n\n"
            + table(["run", "tok/s", "peak allocated GB", "throughput vs baseline"], rows))
    return {"table": text, "results": results}
