"""``lora+galore8bit``: LoRA adapters whose factor matrices are trained by 8-bit GaLore.

What the combination means: LoRA freezes the model and trains, per target layer, A (r x in) and
B (out x r). GaLore then projects each factor's gradient onto ``rank`` directions of its short
side, the LoRA ``r``; Adam's 8-bit moments are rank x in / out x rank instead of r x in /
out x r. That saves memory only when rank < r, so rank >= r is refused (the seed ran rank 128
on r = 8 factors: no compression, just SVD cost). Hence the default rank 4 for r = 8.
Parameters outside the adapters that train (the classifier head for classification) get plain
8-bit AdamW. Weight decay applies to the factors and the head's weights, not to biases or norm
weights (unless ``decay_norms_and_biases``); eps is 1e-8 everywhere, as in galore8bit. A factor's
projector is created at its first non-zero gradient (A's gradient is zero until B moves off its
zero init). Saving writes the adapter and a merged model, like lora.
"""

from __future__ import annotations

from typing import Any

import lowmem
from lowmem.plugins.optimizers import plugin_config
from lowmem.plugins.optimizers.galore import check_galore_config
from lowmem.plugins.optimizers.galore8bit import GALORE8BIT_DEFAULTS, GaLore8bit
from lowmem.plugins.optimizers.lora import (
    LORA_DEFAULTS,
    add_lora_adapters,
    check_lora_config,
    save_lora_model,
)


@lowmem.hookimpl
def register_optimizers(register):
    register(LoRAGaLore8bit())


def lora_factor_weights(model: Any) -> list[tuple[str, Any]]:
    """(name, weight) of the trainable LoRA A and B matrices of a peft model."""
    factors = [
        (name, p)
        for name, p in model.named_parameters()
        if p.requires_grad and p.dim() == 2 and (".lora_A." in name or ".lora_B." in name)
    ]
    if not factors:
        raise lowmem.ConfigError("the model has no trainable LoRA factors (was prepare_model called?)")
    return factors


class LoRAGaLore8bit(GaLore8bit):
    name = "lora+galore8bit"
    description = "LoRA adapters whose factors are trained by 8-bit GaLore (rank < LoRA r)"
    default_config = {**LORA_DEFAULTS, **GALORE8BIT_DEFAULTS, "rank": 4}
    config_files = ("lora", "galore")

    def check_config(self, config):
        check_lora_config(config)
        check_galore_config(config)
        if config["rank"] >= config["r"]:
            raise lowmem.ConfigError(
                f"'rank' {config['rank']} must be smaller than the LoRA 'r' {config['r']}: GaLore on a "
                f"LoRA factor (whose short side is r) saves memory only with rank < r; "
                f"try rank {max(1, config['r'] // 2)}"
            )

    def prepare_model(self, model, settings):
        return add_lora_adapters(model, plugin_config(self, settings), settings)

    def projected_weights(self, model, settings):
        return lora_factor_weights(model)

    def save_model(self, model, directory):
        save_lora_model(model, directory)
