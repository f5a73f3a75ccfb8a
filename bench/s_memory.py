"""Section 4: optimizer-state bytes per optimizer. llama_60m: measured (one real step on random
gradients, then lowmem.memory.optimizer_state_bytes) against the plugin's state_bytes formula.
llama_1b (rank 512) and llama_7b (rank 1024): the formula on meta-device models, plus
lowmem estimate's peak for batch 1 x 256."""

from __future__ import annotations

from common import MiB, fmt_ratio, table

MEASURED = ("baseline", "galore", "galore8bit", "lora", "lora+galore8bit")


def _settings(plugin, model_plugin, config):
    from lowmem.api import OptimizerSettings

    return OptimizerSettings(lr=1e-3, weight_decay=0.01, config={**plugin.default_config, **config},
                             target_modules=tuple(model_plugin.target_modules), objective="causal_lm",
                             grad_accum=1, max_grad_norm=1.0, world_size=1)


def _model(model_plugin, device):
    from lowmem.api import ModelRequest

    return model_plugin.build(ModelRequest(objective="causal_lm", vocab_size=model_plugin.vocab_size,
                                           num_labels=0, weights=None, pad_token_id=0, device=device))


def measured_60m(registry, say) -> dict:
    import torch

    from lowmem.memory import optimizer_state_bytes

    model_plugin = registry.model("llama_60m")
    out = {}
    for name in MEASURED:
        plugin = registry.optimizer(name)
        torch.manual_seed(0)
        settings = _settings(plugin, model_plugin, {})
        model = plugin.prepare_model(_model(model_plugin, "cpu"), settings)
        optimizer = plugin.build(model, settings)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.randn_like(p) * 1e-3
        optimizer.step()
        measured = optimizer_state_bytes(optimizer)
        formula = plugin.state_bytes(model, settings)
        out[name] = {"measured": measured, "formula": formula, "equal": measured == formula}
        say(f"  {name}: measured {measured / MiB:.2f} MiB, formula {formula / MiB:.2f} MiB")
        del model, optimizer
    return out


def estimated(registry, model_name: str, rank: int) -> dict:
    from lowmem.estimate import estimate

    model_plugin = registry.model(model_name)
    out = {}
    for name, config in (("baseline", {}), ("galore", {"rank": rank}), ("galore8bit", {"rank": rank}),
                         ("galore8bit per-layer", {"rank": rank, "per_layer": True})):
        plugin = registry.optimizer(name.split()[0])
        settings = _settings(plugin, model_plugin, config)
        model = plugin.prepare_model(_model(model_plugin, "meta"), settings)
        state = plugin.state_bytes(model, settings)
        peak = None
        try:
            breakdown = estimate(model_plugin, plugin, mode="pretraining", objective="causal_lm",
                                 batch_size=1, max_length=256, dtype="bf16", optimizer_config=settings.config,
                                 per_layer=bool(config.get("per_layer")))
            peak = breakdown.total
        except Exception as exc:  # estimate.py is being written alongside: report, don't fail the bench
            peak = f"estimate failed: {exc}"
        out[name] = {"state_bytes": state, "estimated_peak_bytes": peak}
    return out


def run(args, say) -> dict:
    from worker import registry as make_registry

    registry = make_registry()
    sixty = measured_60m(registry, say)
    base = sixty["baseline"]["measured"]
    rows = [[name, f"{v['measured'] / MiB:.2f}", f"{v['formula'] / MiB:.2f}", "yes" if v["equal"] else "NO",
             fmt_ratio(v["measured"] / base)] for name, v in sixty.items()]
    text = ("llama_60m, default ranks (galore 128; lora r 8; lora+galore8bit rank 4), measured after one "
            "step:\n\n"
            + table(["optimizer", "measured MiB", "state_bytes formula MiB", "exact", "ratio to baseline"],
                    rows))
    big = {}
    if args.quick:
        text += "\n\n(--quick: llama_1b / llama_7b estimates skipped)"
    else:
        for model_name, rank in (("llama_1b", 512), ("llama_7b", 1024)):
            big[model_name] = found = estimated(registry, model_name, rank)
            base_state = found["baseline"]["state_bytes"]
            rows = []
            for name, v in found.items():
                peak = v["estimated_peak_bytes"]
                rows.append([name, f"{v['state_bytes'] / 2**30:.2f}",
                             fmt_ratio(v["state_bytes"] / base_state),
                             f"{peak / 2**30:.2f}" if isinstance(peak, int) else peak])
            text += (f"\n\n{model_name}, rank {rank}, estimated on the meta device (state_bytes; peak from "
                     f"lowmem.estimate, bf16, batch 1 x 256):\n\n"
                     + table(["optimizer", "state GiB", "ratio to baseline", "estimated peak GiB"], rows))
    return {"table": text, "results": {"llama_60m": sixty, **big}}
