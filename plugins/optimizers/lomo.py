"""``lomo``: LOMO (lomo-optim), SGD fused into the backward pass: each parameter is updated as soon
as its gradient is complete and the gradient is freed at once, so no optimizer state exists and at
most one gradient is alive (with grad_accum 1).

Updating in backward is what LOMO is, so ``per_layer`` is always true: the loop checks each loss
for NaN/inf before backward, and clipping by the global gradient norm (--max-grad-norm), fp16 loss
scaling and several processes are refused (LOMO's own norm clipping needs a second backward
pass per step; ``clip_grad_value`` clips each gradient element instead). Gradient accumulation is
exact: a parameter is updated on every ``grad_accum``-th micro-batch, from the summed gradient.
The update is the package's own (see lomo_backward.py). Weight decay as in ``baseline``: not on
biases and norm weights unless ``decay_norms_and_biases``. Plain SGD wants a far larger learning
rate than the Adam family.
"""

from __future__ import annotations

from typing import Any

import lowmem
from lowmem.plugins.optimizers import plugin_config
from lowmem.plugins.optimizers.extras import check_number, check_updates_in_backward

LOMO_DEFAULTS: dict[str, Any] = {"clip_grad_value": 0.0, "per_layer": True}


@lowmem.hookimpl
def register_optimizers(register):
    register(Lomo())


class Lomo(lowmem.Optimizer):
    data_parallel = False  # updates inside backward, before DDP could average the gradients
    name = "lomo"
    description = "LOMO: SGD fused into backward, no optimizer state (lomo-optim)"
    default_config = dict(LOMO_DEFAULTS)
    adaptive = False

    def check_config(self, config):
        if config["per_layer"] is not True:
            raise lowmem.ConfigError(
                f"'per_layer' must be true for {self.name}: it always updates each parameter during backward"
            )
        check_number(config, "clip_grad_value", 0.0)

    def make_engine(self, settings, config):
        """A function building the package's optimizer on lomo_backward.PackageView."""
        from lomo_optim import Lomo as PackageLomo

        clip_value = config["clip_grad_value"] or None
        return lambda view: PackageLomo(view, lr=settings.lr, clip_grad_norm=None, clip_grad_value=clip_value,
                                        weight_decay=0.0)

    def prepare_model(self, model, settings):
        # Refused here rather than once the optimizer exists, so that `lowmem estimate --nproc N`
        # refuses what a run would (under FSDP it is refused for not sharding).
        if settings.world_size > 1 and settings.parallel == "ddp":
            raise lowmem.ConfigError(f"optimizer {self.name!r} updates inside backward, before DDP averages "
                                     "the gradients over the processes; use one process")
        return model

    def build(self, model, settings):
        from lowmem.plugins.optimizers.decay import decay_groups, trainable_named_parameters
        from lowmem.plugins.optimizers.lomo_backward import LomoInBackward

        config = plugin_config(self, settings)
        check_updates_in_backward(settings, self.name)
        named = trainable_named_parameters(model)
        if not named:
            raise lowmem.ConfigError("the model has no trainable parameters")
        self.check_shapes(named)
        groups = decay_groups(model, named, settings.weight_decay, settings.decay_norms_and_biases)
        names = {id(p): n for n, p in named}
        return LomoInBackward(groups, names, settings.lr, self.make_engine(settings, config),
                              grad_accum=settings.grad_accum, adaptive=self.adaptive,
                              rounding=settings.bf16_rounding)

    def check_shapes(self, named: list[tuple[str, Any]]) -> None:
        """Refuse parameters the update rule cannot handle (none for plain LOMO)."""

    def state_bytes(self, model, settings):
        return 0  # plain SGD: no state
