"""``galore8bit``: GaLore with 8-bit (blockwise, bitsandbytes) Adam moments.

Uses lowmem's own GaLoreAdamW8bit (galore_adamw8bit.py), not galore_torch's, which crashes on
CPU and misbinds bitsandbytes >= 0.45 arguments. Moments with fewer than ``min_8bit_size``
elements stay fp32 (bitsandbytes' rule). Every group uses eps 1e-8 (bitsandbytes' and
galore_torch's AdamW8bit default); weight decay as in ``galore``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lowmem
from lowmem.plugins.optimizers.galore import GALORE_DEFAULTS, GaLore

GALORE8BIT_DEFAULTS: dict[str, Any] = {**GALORE_DEFAULTS, "min_8bit_size": 4096}


@lowmem.hookimpl
def register_optimizers(register):
    register(GaLore8bit())


def make_8bit_factory(settings: lowmem.OptimizerSettings, config: dict[str, Any]):
    """(make_optimizer, on_inner_change) for build_galore with 8-bit states."""
    from lowmem.plugins.optimizers.galore_adamw8bit import GaLoreAdamW8bit, share_quantization_maps

    def make_optimizer(groups):
        return GaLoreAdamW8bit(
            groups, lr=settings.lr, weight_decay=settings.weight_decay, min_8bit_size=config["min_8bit_size"]
        )

    return make_optimizer, share_quantization_maps


class GaLore8bit(GaLore):
    name = "galore8bit"
    description = "GaLore with 8-bit Adam states (bitsandbytes), CPU and GPU"
    default_config = dict(GALORE8BIT_DEFAULTS)
    config_files: ClassVar[tuple[str, ...]] = ("galore",)
    # Under FSDP each process quantises its own slice of the moments; checkpoints add fp32 copies
    # (galore8bit_checkpoint), so they load into any number of processes.

    def make_optimizer_factory(self, settings, config):
        # state_bytes (GaLore's) counts 8-bit moments because the config has min_8bit_size.
        return make_8bit_factory(settings, config)
