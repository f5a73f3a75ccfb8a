"""``adalomo``: AdaLomo (lomo-optim), LOMO with Adafactor-style adaptive step sizes: per matrix,
running means of squared gradients per row and per column (per element for 1-D tensors), fp32,
updated inside the backward pass like ``lomo`` (see lomo.py for what that implies and refuses).

lomo-optim's AdaLomo allocates that state with ``.cuda()`` in its constructor, which fails without
a GPU; lomo_backward.py allocates it on each parameter's device instead.
"""

from __future__ import annotations

from typing import Any

import lowmem
from lowmem.plugins.optimizers.extras import check_number
from lowmem.plugins.optimizers.lomo import LOMO_DEFAULTS, Lomo

# AdaLomo's defaults (its loss_scale is lowmem's business: see lomo_backward.py).
ADALOMO_DEFAULTS: dict[str, Any] = {**LOMO_DEFAULTS, "clip_threshold": 1.0, "decay_rate": -0.8,
                                    "eps": [1e-30, 1e-3]}


@lowmem.hookimpl
def register_optimizers(register):
    register(AdaLomo())


class AdaLomo(Lomo):
    name = "adalomo"
    description = "AdaLomo: LOMO with factored adaptive step sizes, fused into backward (lomo-optim)"
    default_config = dict(ADALOMO_DEFAULTS)
    adaptive = True

    def check_config(self, config):
        super().check_config(config)
        check_number(config, "clip_threshold", 0.0, low_inclusive=False)
        check_number(config, "decay_rate", -1.0, 0.0)
        eps = config["eps"]
        if len(eps) != 2 or not all(isinstance(e, int | float) and e >= 0 for e in eps):
            raise lowmem.ConfigError(f"'eps' must be two numbers >= 0, got {eps!r}")

    def make_engine(self, settings, config):
        from lomo_optim import AdaLomo as PackageAdaLomo

        clip_value = config["clip_grad_value"] or None
        # loss_scale 0: the package multiplies the loss by it in fused_backward and divides the
        # gradients by it in the update; lowmem's loop runs backward on the plain loss, so no
        # division may happen.
        return lambda view: PackageAdaLomo(
            view, lr=settings.lr, loss_scale=0, eps=tuple(config["eps"]),
            clip_threshold=config["clip_threshold"], decay_rate=config["decay_rate"], clip_grad_norm=None,
            clip_grad_value=clip_value, weight_decay=0.0,
        )

    def check_shapes(self, named):
        for name, p in named:
            if p.dim() not in (1, 2):
                raise lowmem.ConfigError(
                    f"adalomo handles 1-D and 2-D parameters only; {name} has shape {tuple(p.shape)}"
                )

    def state_bytes(self, model, settings):
        """fp32: one value per element of a 1-D parameter, one per row plus one per column of a matrix."""
        total = 0
        for p in model.parameters():
            if p.requires_grad:
                total += 4 * (p.shape[0] if p.dim() == 1 else p.shape[0] + p.shape[1])
        return total
