"""``apollo``: APOLLO (apollo-torch's APOLLOAdamW), an optional extra: ``pip install 'lowmem[apollo]'``.

APOLLO projects the gradient of each attention/MLP weight (the weights GaLore projects,
targets.py) onto ``rank`` random directions (``proj`` "random"; "svd" uses the gradient's SVD
like GaLore), runs Adam on that small projection only to learn a scaling factor per channel
(``scale_type`` "channel") or per tensor ("tensor"), and applies the scaled raw gradient to the
full weight; ``scale`` multiplies the update by its square root. Other parameters (embeddings,
heads, norms, biases) get APOLLO's plain AdamW. eps is APOLLO's default, 1e-6, in every group.
Weight decay: projected weights are decayed, the rest as in ``baseline``.

apollo-torch is licensed CC BY-NC 4.0 (non-commercial), unlike lowmem's other dependencies, so
it is an extra rather than a dependency: without it ``lowmem list-optimizers`` marks apollo "not
installed" with the pip command, and using it is a ConfigError naming that command.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lowmem
from lowmem.plugins.optimizers import plugin_config
from lowmem.plugins.optimizers.extras import (
    check_choice,
    check_number,
    check_positive_int,
    require,
    whole_or_per_layer,
    with_install_note,
)

# Hugging Face Trainer's apollo_adamw defaults (rank 128 is GaLore's, a quarter of LLaMA 60M's width).
APOLLO_DEFAULTS: dict[str, Any] = {
    "rank": 128,
    "proj": "random",
    "scale_type": "channel",
    "update_proj_gap": 200,
    "scale": 1.0,
    "proj_type": "std",
    "scale_front": False,
    "per_layer": False,
}
# APOLLO's step reads these from the projected group.
APOLLO_GROUP_KEYS = ("rank", "proj", "scale_type", "update_proj_gap", "scale", "proj_type")
PROJS = ("random", "svd")
SCALE_TYPES = ("channel", "tensor")
# APOLLO's random projector has no "full" (it raises NotImplementedError).
PROJ_TYPES = ("std", "reverse_std", "left", "right")
MODULE, EXTRA = "apollo_torch", "apollo"


@lowmem.hookimpl
def register_optimizers(register):
    register(Apollo())


def check_ranks(projected: list[tuple[str, Any]], rank: int) -> None:
    for name, weight in projected:
        rows, cols = weight.shape
        if rank > min(rows, cols):
            raise lowmem.ConfigError(
                f"'rank' {rank} is larger than the smaller dimension of {name} ({rows}x{cols}): "
                f"use a rank of at most {min(rows, cols)}"
            )


class Apollo(lowmem.Optimizer):
    name = "apollo"
    summary = "APOLLO: AdamW with channel-wise scaling learnt in a random rank-128 projection"
    default_config = dict(APOLLO_DEFAULTS)
    config_files: ClassVar[tuple[str, ...]] = ()

    @property
    def description(self) -> str:  # type: ignore[override]
        return with_install_note(self.summary, MODULE, EXTRA)

    def check_config(self, config):
        require(MODULE, EXTRA, self.name)
        check_positive_int(config, "rank")
        check_positive_int(config, "update_proj_gap")
        check_number(config, "scale", 0.0, low_inclusive=False)
        check_choice(config, "proj", PROJS)
        check_choice(config, "scale_type", SCALE_TYPES)
        check_choice(config, "proj_type", PROJ_TYPES)
        if config["scale_type"] == "channel" and config["proj_type"] != "std":
            # APOLLO scales along the side std keeps; other sides broadcast wrongly or fail.
            raise lowmem.ConfigError(
                f"'proj_type' {config['proj_type']} needs 'scale_type' tensor: channel-wise scaling "
                "works with proj_type std only"
            )

    def projected_weights(self, model, settings) -> list[tuple[str, Any]]:
        from lowmem.plugins.optimizers.targets import target_weights

        return target_weights(model, settings.target_modules)

    def groups(self, model, settings, config) -> tuple[list[dict[str, Any]], list[tuple[str, Any]]]:
        """(groups: the projected weights with APOLLO's keys, then plain decay groups; the projected
        (name, weight) pairs)."""
        from lowmem.plugins.optimizers.decay import decay_groups, trainable_named_parameters

        projected = self.projected_weights(model, settings)
        check_ranks(projected, config["rank"])
        projected_ids = {id(p) for _, p in projected}
        plain = [(n, p) for n, p in trainable_named_parameters(model) if id(p) not in projected_ids]
        first = {"params": [p for _, p in projected], "weight_decay": settings.weight_decay}
        first.update({key: config[key] for key in APOLLO_GROUP_KEYS})
        rest = decay_groups(model, plain, settings.weight_decay, settings.decay_norms_and_biases)
        return [first, *rest], projected

    def build(self, model, settings):
        require(MODULE, EXTRA, self.name)
        from lowmem.plugins.optimizers.apollo_impl import make_apollo_factory

        config = plugin_config(self, settings)
        groups, _ = self.groups(model, settings, config)
        return whole_or_per_layer(settings, config, groups, make_apollo_factory(settings, config, groups))

    def state_bytes(self, model, settings):
        """Projected weight: the projection matrix, Adam's two moments of the projected gradient
        and the 0-dim norm of the last scaled gradient (the norm-growth limiter's), all in the
        weight's dtype. Other parameters: two moments like the parameter. ``step`` and ``seed``
        are Python ints."""
        import math

        from lowmem.plugins.optimizers.decay import trainable_named_parameters
        from lowmem.plugins.optimizers.galore_common import low_rank_shapes

        config = plugin_config(self, settings)
        projected = self.projected_weights(model, settings)
        check_ranks(projected, config["rank"])
        projected_ids = {id(p) for _, p in projected}
        total = 0
        for _, p in trainable_named_parameters(model):
            if id(p) in projected_ids:
                rows, cols = p.shape
                moment_shape, projector = low_rank_shapes(rows, cols, config["rank"], config["proj_type"])
                total += (projector + 2 * math.prod(moment_shape) + 1) * p.element_size()
            else:
                total += 2 * p.numel() * p.element_size()
        return total
