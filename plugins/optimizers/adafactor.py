"""``adafactor``: transformers' Adafactor (``transformers.optimization.Adafactor``), driven by
lowmem's learning rate and schedule.

Adafactor keeps, per matrix, one running mean of squared gradients per row and one per column
instead of Adam's two full moments (and no first moment unless ``beta1`` > 0). Its own step-size
machinery is off: ``relative_step`` False (the LR comes from ``settings.lr`` and the scheduler
sets it in the groups), ``warmup_init`` False (lowmem's schedule warms up), ``scale_parameter``
False by default (True multiplies the LR by each weight's RMS, as in the paper). Weight decay as in
``baseline``: not on biases and norm weights unless ``decay_norms_and_biases``.
"""

from __future__ import annotations

import math
from typing import Any

import lowmem
from lowmem.plugins.optimizers import plugin_config, quiet_bitsandbytes
from lowmem.plugins.optimizers.extras import check_number, restore_state_dtypes, whole_or_per_layer

# transformers' defaults, except scale_parameter (see above). beta1 0 means no first moment
# (transformers' None: a zero first moment would cost memory and change nothing).
ADAFACTOR_DEFAULTS: dict[str, Any] = {
    "beta1": 0.0,
    "clip_threshold": 1.0,
    "decay_rate": -0.8,
    "eps": [1e-30, 1e-3],
    "scale_parameter": False,
    "per_layer": False,
}


@lowmem.hookimpl
def register_optimizers(register):
    register(Adafactor())


def factored(shape) -> bool:
    """transformers' Adafactor factors the second moment of every tensor with 2 or more dimensions."""
    return len(shape) >= 2


class Adafactor(lowmem.Optimizer):
    name = "adafactor"
    description = "Adafactor (transformers): factored second moments, no first moment by default"
    default_config = dict(ADAFACTOR_DEFAULTS)

    def check_config(self, config):
        check_number(config, "beta1", 0.0, 1.0)
        check_number(config, "clip_threshold", 0.0, low_inclusive=False)
        check_number(config, "decay_rate", -1.0, 0.0)
        eps = config["eps"]
        if len(eps) != 2 or not all(isinstance(e, int | float) and e >= 0 for e in eps):
            raise lowmem.ConfigError(f"'eps' must be two numbers >= 0, got {eps!r}")

    def build(self, model, settings):
        quiet_bitsandbytes()  # transformers.optimization imports bitsandbytes
        from transformers.optimization import Adafactor as HFAdafactor

        from lowmem.plugins.optimizers.decay import decay_groups, trainable_named_parameters

        config = plugin_config(self, settings)
        named = trainable_named_parameters(model)
        if not named:
            raise lowmem.ConfigError("the model has no trainable parameters")
        groups = decay_groups(model, named, settings.weight_decay, settings.decay_norms_and_biases)

        class LowmemAdafactor(HFAdafactor):
            """Adafactor keeps fp32 statistics for 16-bit weights; torch's loader would round them."""

            def load_state_dict(self, state_dict):
                super().load_state_dict(state_dict)
                restore_state_dtypes(self, state_dict)

        def make_optimizer(param_groups):
            return LowmemAdafactor(
                param_groups, lr=settings.lr, eps=tuple(config["eps"]), beta1=config["beta1"] or None,
                clip_threshold=config["clip_threshold"], decay_rate=config["decay_rate"],
                weight_decay=settings.weight_decay, scale_parameter=config["scale_parameter"],
                relative_step=False, warmup_init=False,
            )

        return whole_or_per_layer(settings, config, groups, make_optimizer)

    def state_bytes(self, model, settings):
        """Per trainable tensor: row and column means (factored) or a full second moment, plus a
        first moment when beta1 > 0, all in fp32 for 16-bit parameters (Adafactor computes in
        fp32) and in the parameter's dtype otherwise; plus the 0-dim ``RMS`` of the weight it records
        every step (same dtype). ``step`` is a Python int."""
        import torch

        from lowmem.plugins.optimizers.decay import trainable_named_parameters

        config = plugin_config(self, settings)
        total = 0
        for _, p in trainable_named_parameters(model):
            size = 4 if p.dtype in (torch.float16, torch.bfloat16) else p.element_size()
            shape = tuple(p.shape)
            if factored(shape):
                moment = math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
            else:
                moment = p.numel()
            first = p.numel() if config["beta1"] else 0
            total += (moment + first + 1) * size  # + 1: RMS
        return total
