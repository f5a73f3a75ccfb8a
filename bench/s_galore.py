"""Section 2: lowmem's GaLore optimizers against plain galore_torch.GaLoreAdamW: isolated
optimizer.step time on the same parameters and gradients, and the projection refresh (SVD)
cost, full SVD against torch.svd_lowrank, amortised over update_proj_gap."""

from __future__ import annotations

import time

from common import fmt_ratio, median, table

GAP = 200


def _params():
    import torch
    from worker import registry

    from lowmem.api import ModelRequest

    torch.manual_seed(0)
    model = registry().model("llama_60m").build(
        ModelRequest(objective="causal_lm", vocab_size=32000, num_labels=0, weights=None, pad_token_id=0))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def run(args, say) -> dict:
    import torch
    from galore_torch import GaLoreAdamW
    from worker import TARGETS

    from lowmem.plugins.optimizers.galore import GALORE_DEFAULTS
    from lowmem.plugins.optimizers.galore_adamw8bit import GaLoreAdamW8bit
    from lowmem.plugins.optimizers.galore_common import LowmemGaLoreAdamW, galore_groups
    from lowmem.plugins.optimizers.targets import target_weights

    model = _params()
    projected = target_weights(model, TARGETS)
    groups = galore_groups(model, projected, GALORE_DEFAULTS, 0.01)
    makers = {
        "galore_torch.GaLoreAdamW": lambda: GaLoreAdamW(groups, lr=1e-3, weight_decay=0.01,
                                                        no_deprecation_warning=True),
        "lowmem galore": lambda: LowmemGaLoreAdamW(groups, lr=1e-3, weight_decay=0.01),
        "lowmem galore8bit": lambda: GaLoreAdamW8bit(groups, lr=1e-3, weight_decay=0.01),
    }
    built = {}
    for name, make in makers.items():
        optimizer = make()
        optimizer.step()  # step 0: creates the state and does every SVD (timed separately below)
        built[name] = optimizer
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(args.step_repeats):  # A B C A B C: no SVD in these steps (gap 200)
        for name, optimizer in built.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    reference = median(times["galore_torch.GaLoreAdamW"])
    step_rows, steps = [], {}
    for name, values in times.items():
        steps[name] = {"step_seconds": median(values), "ratio_to_galore_torch": median(values) / reference}
        step_rows.append([name, f"{median(values) * 1e3:.0f}", fmt_ratio(median(values) / reference)])
    del built

    # Projection refresh: one SVD per projected weight every GAP steps.
    shapes: dict[tuple[int, int], int] = {}
    for _, weight in projected:
        shapes[tuple(weight.shape)] = shapes.get(tuple(weight.shape), 0) + 1
    svd_rows, svd = [], {}
    rank = GALORE_DEFAULTS["rank"]
    full_total = low_total = 0.0
    for shape, count in shapes.items():
        grad = torch.randn(shape) * 1e-3
        full_t, low_t = [], []
        for _ in range(args.svd_repeats):
            start = time.perf_counter()
            torch.linalg.svd(grad, full_matrices=False)
            full_t.append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.svd_lowrank(grad, q=rank + 10, niter=2)
            low_t.append(time.perf_counter() - start)
        full_total += median(full_t) * count
        low_total += median(low_t) * count
        svd[str(shape)] = {"count": count, "full_seconds": median(full_t), "lowrank_seconds": median(low_t)}
        svd_rows.append([f"{shape[0]}x{shape[1]} (x{count})", f"{median(full_t) * 1e3:.0f}",
                         f"{median(low_t) * 1e3:.0f}"])
    svd_rows.append(["whole model, per refresh", f"{full_total * 1e3:.0f}", f"{low_total * 1e3:.0f}"])
    svd_rows.append([f"amortised per step (gap {GAP})", f"{full_total / GAP * 1e3:.1f}",
                     f"{low_total / GAP * 1e3:.1f}"])
    text = (f"llama_60m parameters (58.07M), random gradients, rank 128, gap {GAP}; step times are "
            f"medians of {args.step_repeats} alternated steps with no refresh in them.\n\n"
            + table(["optimizer", "ms/step", "ratio to galore_torch"], step_rows)
            + f"\n\nProjection refresh (medians of {args.svd_repeats}), ms:\n\n"
            + table(["weight shape", "torch.linalg.svd", f"torch.svd_lowrank(q={rank + 10}, niter=2)"],
                    svd_rows))
    return {"table": text, "results": {"steps": steps, "svd": svd, "svd_full_per_refresh": full_total,
                                       "svd_lowrank_per_refresh": low_total}}
