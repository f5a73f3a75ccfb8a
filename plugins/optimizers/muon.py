"""``muon``: torch's Muon (torch >= 2.9) on the 2-D weights of the attention and MLP layers, AdamW
on everything else (embeddings, heads, norms, biases), behind one optimizer (muon_adamw.py).

Muon keeps one momentum buffer per matrix and orthogonalises the update with a Newton-Schulz
iteration; it is specified for hidden matrices only (torch's accepts nothing but 2-D tensors).
The matrices are the ones GaLore projects (targets.py). ``adjust_lr_fn`` "match_rms_adamw"
(default, from Moonshot AI's "Muon is Scalable for LLM Training") scales Muon's step so its update
RMS matches AdamW's, which lets one learning rate and one schedule drive both halves; "original"
is Keller Jordan's scaling. Weight decay: the Muon
matrices are decayed; the AdamW half as in ``baseline`` (not biases and norm weights unless
``decay_norms_and_biases``).
"""

from __future__ import annotations

from typing import Any

import lowmem
from lowmem.plugins.optimizers import plugin_config
from lowmem.plugins.optimizers.extras import (
    check_choice,
    check_number,
    check_positive_int,
    torch_version,
    whole_or_per_layer,
)

# torch.optim.Muon's defaults, except adjust_lr_fn (see above).
MUON_DEFAULTS: dict[str, Any] = {
    "momentum": 0.95,
    "nesterov": True,
    "ns_steps": 5,
    "adjust_lr_fn": "match_rms_adamw",
    "per_layer": False,
}
ADJUST_LR_FNS = ("match_rms_adamw", "original")
NEEDS_TORCH = (2, 9)


@lowmem.hookimpl
def register_optimizers(register):
    register(Muon())


def require_muon() -> None:
    if torch_version() < NEEDS_TORCH:
        raise lowmem.ConfigError(
            "optimizer 'muon' needs torch >= 2.9 (torch.optim.Muon): pip install 'torch>=2.9'")


class Muon(lowmem.Optimizer):
    name = "muon"
    default_config = dict(MUON_DEFAULTS)

    @property
    def description(self) -> str:  # type: ignore[override]
        text = "Muon (torch) on attention/MLP matrices, AdamW on embeddings, head, norms and biases"
        return text if torch_version() >= NEEDS_TORCH else f"{text} (not installed: needs torch >= 2.9)"

    def check_config(self, config):
        require_muon()
        check_number(config, "momentum", 0.0, 1.0)
        check_positive_int(config, "ns_steps")
        check_choice(config, "adjust_lr_fn", ADJUST_LR_FNS)

    def split(self, model, settings) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
        """(Muon's (name, weight) pairs, AdamW's) over the trainable parameters."""
        from lowmem.plugins.optimizers.decay import trainable_named_parameters
        from lowmem.plugins.optimizers.targets import target_weights

        hidden = target_weights(model, settings.target_modules)
        hidden_ids = {id(p) for _, p in hidden}
        rest = [(n, p) for n, p in trainable_named_parameters(model) if id(p) not in hidden_ids]
        return hidden, rest

    def build(self, model, settings):
        import torch

        from lowmem.plugins.optimizers.baseline import ADAMW_EPS
        from lowmem.plugins.optimizers.decay import decay_groups

        require_muon()
        config = plugin_config(self, settings)
        hidden, rest = self.split(model, settings)
        muon_ids = {id(p) for _, p in hidden}
        groups = [{"params": [p for _, p in hidden], "weight_decay": settings.weight_decay}]
        groups += decay_groups(model, rest, settings.weight_decay, settings.decay_norms_and_biases)
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for _, p in rest)

        def make_muon(param_groups):
            return torch.optim.Muon(
                param_groups, lr=settings.lr, weight_decay=settings.weight_decay, momentum=config["momentum"],
                nesterov=config["nesterov"], ns_steps=config["ns_steps"], adjust_lr_fn=config["adjust_lr_fn"],
            )

        def make_adamw(param_groups):
            return torch.optim.AdamW(param_groups, lr=settings.lr, weight_decay=settings.weight_decay,
                                     eps=ADAMW_EPS, fused=fused)

        def make_optimizer(param_groups):
            """Per-layer: one parameter, Muon's or AdamW's. Whole: both, behind one optimizer."""
            if config["per_layer"]:
                in_muon = id(param_groups[0]["params"][0]) in muon_ids
                return (make_muon if in_muon else make_adamw)(param_groups)
            if len(param_groups) == 1:  # every trainable parameter is a hidden matrix
                return make_muon(param_groups)
            from lowmem.plugins.optimizers.muon_adamw import MuonWithAdamW
            from lowmem.rounding import compensated

            # bf16-pure: each half updates its bf16 weights in fp32 itself (the halves own the state).
            rounding = settings.bf16_rounding
            both = MuonWithAdamW(compensated(make_muon(param_groups[:1]), rounding),
                                 compensated(make_adamw(param_groups[1:]), rounding))
            both.lowmem_rounding = rounding  # type: ignore[attr-defined]
            return both

        return whole_or_per_layer(settings, config, groups, make_optimizer)

    def state_bytes(self, model, settings):
        """Muon: a momentum buffer like each matrix. AdamW: two moments like each parameter plus a
        0-dim fp32 ``step`` (the fused kernel's)."""
        hidden, rest = self.split(model, settings)
        muon = sum(p.numel() * p.element_size() for _, p in hidden)
        return muon + sum(2 * p.numel() * p.element_size() + 4 for _, p in rest)
