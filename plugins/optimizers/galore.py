"""``galore``: GaLoreAdamW (galore_torch) projecting the 2-D weights of the attention and MLP
layers; every other parameter (embeddings, heads, norms, biases) gets plain AdamW in the
same optimizer. ``per_layer: true`` steps each parameter from its gradient hook."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import lowmem

# The reference's defaults (jiaweizzhao/GaLore; Hugging Face Trainer uses the same).
GALORE_DEFAULTS: dict[str, Any] = {
    "rank": 128,
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "per_layer": False,
}
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


@lowmem.hookimpl
def register_optimizers(register):
    register(GaLore())


def check_galore_config(config: Mapping[str, Any]) -> None:
    if not isinstance(config["rank"], int) or config["rank"] <= 0:
        raise lowmem.ConfigError(f"'rank' must be a positive integer, got {config['rank']!r}")
    if not isinstance(config["update_proj_gap"], int) or config["update_proj_gap"] <= 0:
        raise lowmem.ConfigError(f"'update_proj_gap' must be a positive integer, got {config['update_proj_gap']!r}")
    if not config["scale"] > 0:
        raise lowmem.ConfigError(f"'scale' must be > 0, got {config['scale']!r}")
    if config["proj_type"] not in PROJ_TYPES:
        raise lowmem.ConfigError(f"'proj_type' must be one of {', '.join(PROJ_TYPES)}, got {config['proj_type']!r}")
    if "min_8bit_size" in config and (not isinstance(config["min_8bit_size"], int) or config["min_8bit_size"] < 1):
        raise lowmem.ConfigError(f"'min_8bit_size' must be a positive integer, got {config['min_8bit_size']!r}")


class GaLore(lowmem.Optimizer):
    name = "galore"
    description = "GaLore: AdamW with low-rank projected gradients on attention/MLP weights"
    default_config = dict(GALORE_DEFAULTS)
    config_files: ClassVar[tuple[str, ...]] = ("galore",)

    def full_config(self, settings: lowmem.OptimizerSettings) -> dict[str, Any]:
        config = {**self.default_config, **settings.config}
        self.check_config(config)
        return config

    def check_config(self, config):
        check_galore_config(config)

    def projected_weights(self, model, settings, config) -> list[tuple[str, Any]]:
        from lowmem.plugins.optimizers.targets import target_weights

        return target_weights(model, settings.target_modules)

    def build(self, model, settings):
        from lowmem.plugins.optimizers.galore_common import LowmemGaLoreAdamW, build_galore

        config = self.full_config(settings)

        def make_optimizer(groups):
            return LowmemGaLoreAdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)

        return build_galore(model, settings, config, self.projected_weights(model, settings, config), make_optimizer)

    def state_bytes(self, model, settings):
        from lowmem.plugins.optimizers.galore_common import galore_state_bytes

        config = self.full_config(settings)
        return galore_state_bytes(model, self.projected_weights(model, settings, config), config)
