"""apollo_torch's APOLLOAdamW with a state that ``torch.load(weights_only=True)`` reads back and
compact SVD projection matrices (``apollo`` and ``apollo-mini`` plugins).

APOLLO keeps a projector object per projected weight: its projection matrix and, for random
projections, the seed of the next one (it draws a new Gaussian matrix from that seed at every
refresh and advances the seed). The object is saved as that matrix and seed and rebuilt on load,
so a resumed run draws exactly the matrices the uninterrupted one would. With ``proj`` "svd",
APOLLO's projector keeps a rank-r slice (a view) of the whole SVD factor; it is cloned here so
only the r rows / columns stay alive, as lowmem's GaLore does (galore_common.CompactProjector).

Imported only from inside plugin methods (it imports torch and apollo_torch).
"""

from __future__ import annotations

from typing import Any

from lowmem.plugins.optimizers import quiet_bitsandbytes

quiet_bitsandbytes()  # apollo_torch imports bitsandbytes

from apollo_torch import APOLLOAdamW  # noqa: E402
from apollo_torch.random_projector import GradientProjector  # noqa: E402
from apollo_torch.svd_projector import GaLoreProjector as ApolloSVDProjector  # noqa: E402


class CompactSVDProjector(ApolloSVDProjector):
    def get_orthogonal_matrix(self, weights, rank, type):  # noqa: A002 - apollo_torch's signature
        factor = super().get_orthogonal_matrix(weights, rank, type)
        if isinstance(factor, list):
            return [f.clone() for f in factor]
        return factor.clone()


class LowmemAPOLLOAdamW(APOLLOAdamW):
    """APOLLOAdamW (eps 1e-6, its default, in every group) with compact SVD projectors and a
    weights_only-loadable state. ``seeds`` (id(param) -> seed) replaces APOLLO's own numbering,
    which counts parameters within one optimizer: per-layer mode builds one optimizer per
    parameter and passes each its position in the whole model, so both modes draw the same
    random matrices."""

    def __init__(self, params, lr: float, weight_decay: float, scale_front: bool = False,
                 seeds: dict[int, int] | None = None):
        super().__init__(params, lr=lr, weight_decay=weight_decay, scale_front=scale_front,
                         no_deprecation_warning=True)
        for group in self.param_groups:
            for p in group["params"]:
                if seeds is not None and id(p) in seeds:
                    self.state[p]["seed"] = seeds[id(p)]

    def _initialize_projector(self, group, state):
        if group["proj"] == "svd":
            return CompactSVDProjector(group["rank"], update_proj_gap=group["update_proj_gap"],
                                       scale=group["scale"], proj_type=group["proj_type"])
        return super()._initialize_projector(group, state)

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        # torch's state_dict() shares the live per-parameter dicts: build new ones.
        packed = {}
        for key, value in state_dict["state"].items():
            projector = value.get("projector") if isinstance(value, dict) else None
            if isinstance(projector, GradientProjector | ApolloSVDProjector):
                saved = {"ortho_matrix": projector.ortho_matrix}
                if isinstance(projector, GradientProjector):
                    saved["seed"] = projector.seed
                value = {**value, "projector": saved}
            packed[key] = value
        state_dict["state"] = packed
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            if "rank" not in group:
                continue
            for p in group["params"]:
                state = self.state.get(p, {})
                saved = state.get("projector")
                if isinstance(saved, dict):
                    projector = self._initialize_projector(group, state)
                    projector.ortho_matrix = saved["ortho_matrix"]
                    if "seed" in saved:
                        projector.seed = saved["seed"]
                    state["projector"] = projector


def apollo_seeds(groups: list[dict[str, Any]]) -> dict[int, int]:
    """id(param) -> the seed APOLLOAdamW gives it when it holds all of ``groups``: its 1-based
    position among the parameters."""
    params = [p for group in groups for p in group["params"]]
    return {id(p): index for index, p in enumerate(params, start=1)}


def make_apollo_factory(settings, config, groups: list[dict[str, Any]]):
    seeds = apollo_seeds(groups)

    def make_optimizer(param_groups):
        return LowmemAPOLLOAdamW(param_groups, lr=settings.lr, weight_decay=settings.weight_decay,
                                 scale_front=config["scale_front"], seeds=seeds)

    return make_optimizer

