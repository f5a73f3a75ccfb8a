"""``adamw8bit``: bitsandbytes' 8-bit AdamW over every trainable parameter, the GaLore paper's
8-bit Adam comparison point.

Moments are blockwise-quantised uint8 (plus one fp32 absmax per 256 elements) for tensors of at
least ``min_8bit_size`` elements, fp32 below that (bitsandbytes' rule). Constructed with keyword
arguments only: bitsandbytes' signatures have moved between releases, and positional arguments
have silently landed in the wrong parameters before (see galore_adamw8bit.py). Weight decay as in
``baseline``: not on biases and norm weights unless ``decay_norms_and_biases``.
"""

from __future__ import annotations

from typing import Any

import lowmem
from lowmem.plugins.optimizers import plugin_config, quiet_bitsandbytes
from lowmem.plugins.optimizers.extras import check_positive_int, whole_or_per_layer

# bitsandbytes' own defaults.
ADAMW8BIT_DEFAULTS: dict[str, Any] = {"betas": [0.9, 0.999], "eps": 1e-8, "min_8bit_size": 4096,
                                      "per_layer": False}


@lowmem.hookimpl
def register_optimizers(register):
    register(AdamW8bit())


def check_betas(config) -> None:
    betas = config["betas"]
    if len(betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas):
        raise lowmem.ConfigError(f"'betas' must be two numbers in [0, 1), got {betas!r}")


class AdamW8bit(lowmem.Optimizer):
    name = "adamw8bit"
    description = "8-bit AdamW (bitsandbytes) over all parameters, the GaLore paper's 8-bit baseline"
    default_config = dict(ADAMW8BIT_DEFAULTS)

    def check_config(self, config):
        check_positive_int(config, "min_8bit_size")
        check_betas(config)
        if not config["eps"] > 0:
            raise lowmem.ConfigError(f"'eps' must be > 0, got {config['eps']!r}")

    def build(self, model, settings):
        quiet_bitsandbytes()
        from bitsandbytes.optim import AdamW8bit as BnbAdamW8bit

        from lowmem.plugins.optimizers.decay import decay_groups, trainable_named_parameters
        from lowmem.plugins.optimizers.galore_adamw8bit import share_quantization_maps

        config = plugin_config(self, settings)
        named = trainable_named_parameters(model)
        if not named:
            raise lowmem.ConfigError("the model has no trainable parameters")
        groups = decay_groups(model, named, settings.weight_decay, settings.decay_norms_and_biases)

        def make_optimizer(param_groups):
            return BnbAdamW8bit(
                param_groups, lr=settings.lr, betas=tuple(config["betas"]), eps=config["eps"],
                weight_decay=settings.weight_decay, min_8bit_size=config["min_8bit_size"], is_paged=False,
            )

        # Per-layer: one pair of quantisation maps for all inner optimizers, not one per parameter.
        return whole_or_per_layer(settings, config, groups, make_optimizer, share_quantization_maps)

    def state_bytes(self, model, settings):
        from lowmem.plugins.optimizers.galore_common import galore_state_bytes

        config = plugin_config(self, settings)
        # No projected weights: bitsandbytes' 8-bit / fp32 rule on every trainable tensor.
        return galore_state_bytes(model, [], config, min_8bit_size=config["min_8bit_size"])
