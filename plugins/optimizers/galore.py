"""``galore``: GaLoreAdamW (galore_torch) projecting the 2-D weights of the attention and MLP
layers; every other parameter (embeddings, heads, norms, biases) gets plain AdamW in the
same optimizer. ``per_layer: true`` steps each parameter from its gradient hook.

Weight decay: the projected weights are decayed, and so are the other parameters except biases
and norm weights (unless ``decay_norms_and_biases``). Every group uses galore_torch's eps, 1e-6.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import lowmem
from lowmem.plugins.optimizers import plugin_config

# The reference's defaults (jiaweizzhao/GaLore; Hugging Face Trainer uses the same), except the
# rank: None picks the paper's rank for the model's width (PAPER_RANKS), capped where a projected
# layer is smaller.
GALORE_DEFAULTS: dict[str, Any] = {
    "rank": None,
    "update_proj_gap": 200,
    "scale": 0.25,
    "proj_type": "std",
    "per_layer": False,
    # How the projection is refreshed every update_proj_gap steps: "full" is galore_torch's
    # torch.linalg.svd (the reference's numerics); "randomized" is torch.svd_lowrank, a seeded
    # randomized SVD of the top directions only (galore_common.RandomizedProjector): cheaper on
    # large matrices, close to but not identical with the full SVD's subspace.
    "svd": "full",
}
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
# The GaLore paper's ranks by model width: 60M (512) 128, 130M/350M (768/1024) 256, 1B (2048) 512,
# 7B (4096) 1024.
PAPER_RANKS = ((512, 128), (1024, 256), (2048, 512))
WIDEST_RANK = 1024
GALORE_DEFAULTS_RANK = 128  # a model without a width in its config
SVD_METHODS = ("full", "randomized")


@lowmem.hookimpl
def register_optimizers(register):
    register(GaLore())


def positive_int(config: Mapping[str, Any], key: str) -> None:
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise lowmem.ConfigError(f"'{key}' must be a positive integer, got {value!r}")


def paper_rank(hidden_size: int) -> int:
    return next((rank for width, rank in PAPER_RANKS if hidden_size <= width), WIDEST_RANK)


def model_width(model: Any) -> int | None:
    config = getattr(model, "config", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    return width if isinstance(width, int) else None


def check_galore_config(config: Mapping[str, Any]) -> None:
    if config["rank"] is not None:  # None: chosen from the model's width
        positive_int(config, "rank")
    positive_int(config, "update_proj_gap")
    if not config["scale"] > 0:
        raise lowmem.ConfigError(f"'scale' must be > 0, got {config['scale']!r}")
    if config["proj_type"] not in PROJ_TYPES:
        raise lowmem.ConfigError(
            f"'proj_type' must be one of {', '.join(PROJ_TYPES)}, got {config['proj_type']!r}"
        )
    if config["svd"] not in SVD_METHODS:
        raise lowmem.ConfigError(f"'svd' must be one of {', '.join(SVD_METHODS)}, got {config['svd']!r}")
    if "min_8bit_size" in config:
        positive_int(config, "min_8bit_size")


class GaLore(lowmem.Optimizer):
    name = "galore"
    description = "GaLore: AdamW with low-rank projected gradients on attention/MLP weights"
    default_config = dict(GALORE_DEFAULTS)
    config_files: ClassVar[tuple[str, ...]] = ("galore",)
    shards = True  # FSDP: each process projects its slice with the whole gradient's factor

    def check_config(self, config):
        check_galore_config(config)

    def shard_dims(self, model, settings):
        from lowmem.plugins.optimizers.galore_sharded import shard_dims

        proj_type = plugin_config(self, settings)["proj_type"]
        return shard_dims(self.projected_weights(model, settings), proj_type, settings.world_size)

    def projected_weights(self, model, settings) -> list[tuple[str, Any]]:
        from lowmem.plugins.optimizers.targets import target_weights

        return target_weights(model, settings.target_modules)

    def make_optimizer_factory(self, settings, config):
        """(make_optimizer, on_inner_change) for build_galore."""
        from lowmem.plugins.optimizers.galore_common import LowmemGaLoreAdamW

        def make_optimizer(groups):
            return LowmemGaLoreAdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)

        return make_optimizer, None

    def with_rank(self, model, settings, projected, say=None) -> dict[str, Any]:
        """The settings with a rank: the user's, or the paper's for the model's width, capped at
        the largest rank every projected weight takes (saying so)."""
        from lowmem.plugins.optimizers.galore_common import largest_rank

        config = dict(plugin_config(self, settings))
        if config["rank"] is not None:
            return config
        width = model_width(model)
        rank = paper_rank(width) if width else GALORE_DEFAULTS_RANK
        cap = min((largest_rank(w.shape[0], w.shape[1], config["proj_type"]) for _, w in projected),
                  default=rank)
        if rank > cap:
            if say is not None:
                say(f"note: GaLore rank {rank} (the paper's for width {width}) is capped at {cap}, the "
                    "smallest projected layer's limit; set 'rank' to choose")
            rank = cap
        config["rank"] = rank
        return config

    def build(self, model, settings):
        from lowmem.plugins.optimizers.galore_common import build_galore

        projected = self.projected_weights(model, settings)
        config = self.with_rank(model, settings, projected, settings.say)
        make_optimizer, on_inner_change = self.make_optimizer_factory(settings, config)
        return build_galore(model, settings, config, projected, make_optimizer, on_inner_change)

    def replicated_state_bytes(self, model, settings):
        from lowmem.plugins.optimizers.galore_sharded import replicated_state_bytes

        projected = self.projected_weights(model, settings)
        return replicated_state_bytes(model, projected, self.with_rank(model, settings, projected))

    def state_bytes(self, model, settings):
        from lowmem.plugins.optimizers.galore_common import check_rank, galore_state_bytes

        projected = self.projected_weights(model, settings)
        config = self.with_rank(model, settings, projected)
        check_rank(projected, config["rank"], config["proj_type"])  # what build refuses, estimate does too
        return galore_state_bytes(model, projected, config, min_8bit_size=config.get("min_8bit_size"))
