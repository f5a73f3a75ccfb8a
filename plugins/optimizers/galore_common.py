"""Shared GaLore pieces: parameter grouping, checks, projector state conversion, state bytes.

Imported only from inside plugin methods: it imports torch, galore_torch and (through it)
bitsandbytes at module level.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from lowmem.plugins.optimizers import quiet_bitsandbytes

quiet_bitsandbytes()

import torch  # noqa: E402
from galore_torch import GaLoreAdamW  # noqa: E402
from galore_torch.galore_projector import GaLoreProjector  # noqa: E402

import lowmem  # noqa: E402
from lowmem.plugins.optimizers.galore_sharded import on_local_shards  # noqa: E402
from lowmem.rounding import compensated  # noqa: E402

GALORE_GROUP_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")
# galore_torch.GaLoreAdamW's default eps (transformers' old AdamW's); lowmem's galore keeps it, so
# its updates stay identical to galore_torch's. The 8-bit optimizer uses 1e-8 (GaLoreAdamW8bit).
GALORE_TORCH_EPS = 1e-6
BNB_BLOCK = 256  # bitsandbytes' blockwise quantisation: one fp32 absmax per 256 elements
BNB_QMAP_BYTES = 2 * 256 * 4  # the signed and unsigned 256-entry fp32 maps, shared by all params


# -- grouping and checks ---------------------------------------------------------------------
def largest_rank(rows: int, cols: int, proj_type: str) -> int:
    """The largest rank galore_torch's projector handles for a rows x cols gradient.

    Every proj_type takes up to min(rows, cols) (the SVD has that many directions), except
    reverse_std on a wide matrix (rows < cols): it projects the long side, keeping a rows x rank
    moment, and project_back tells the sides apart by that moment's shape (rows <= rank means
    "left"), so at rank == rows it multiplies the wrong way and raises a shape error."""
    if proj_type == "reverse_std" and rows < cols:
        return rows - 1
    return min(rows, cols)


def check_rank(projected: list[tuple[str, Any]], rank: int, proj_type: str = "std") -> None:
    """Refuse, before training, a rank the projector cannot handle for some projected weight."""
    for name, weight in projected:
        rows, cols = weight.shape
        largest = largest_rank(rows, cols, proj_type)
        if rank <= largest:
            continue
        if rank > min(rows, cols):
            reason = "it is larger than the smaller dimension"
        else:
            reason = "galore_torch's reverse_std projection fails at rank = rows of a wide matrix"
        advice = f"use a rank of at most {largest}" if largest > 0 else "use proj_type std"
        raise lowmem.ConfigError(
            f"'rank' {rank} does not work for {name} ({rows}x{cols}) with proj_type {proj_type}: "
            f"{reason}; {advice}"
        )


def check_per_layer(settings: lowmem.OptimizerSettings) -> None:
    if settings.max_grad_norm is not None and settings.max_grad_norm > 0:
        raise lowmem.ConfigError(
            "'per_layer': each parameter steps during backward, so clipping by the norm over all "
            f"parameters is impossible (max_grad_norm is {settings.max_grad_norm}); pass --max-grad-norm 0"
        )
    # Several processes: FSDP calls the gradient hooks after its reduction, and under DDP
    # lowmem steps from a communication hook instead (PerLayerOptimizer.step_after_reduction).


def galore_groups(
    model: Any,
    projected: list[tuple[str, Any]],
    config: Mapping[str, Any],
    weight_decay: float,
    decay_all: bool = False,
) -> list[dict[str, Any]]:
    """A projected group for ``projected``, then plain groups for every other trainable parameter
    (embeddings, heads, norms, biases): GaLore only pays off, and is only specified, for the 2-D
    weights of attention and MLP layers. The projected weights are decayed; the plain ones are
    split by decay.split_decay (no decay for biases and norm weights unless ``decay_all``).
    Groups carry no eps, lr or betas: the optimizer's defaults apply to all alike."""
    from lowmem.plugins.optimizers.decay import decay_groups

    check_rank(projected, config["rank"], config["proj_type"])
    projected_ids = {id(p) for _, p in projected}
    plain = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in projected_ids]
    groups = [{"params": [p for _, p in projected], "weight_decay": weight_decay}]
    groups[0].update({key: config[key] for key in GALORE_GROUP_KEYS})
    # Only a non-default method is recorded in the group (new_projector reads it there, the one
    # place every GaLore optimizer shares): groups and checkpoints of the default stay galore_torch's.
    if config.get("svd", "full") != "full":
        groups[0]["svd"] = config["svd"]
    return groups + decay_groups(model, plain, weight_decay, decay_all)


def build_galore(
    model: Any,
    settings: lowmem.OptimizerSettings,
    config: Mapping[str, Any],
    projected: list[tuple[str, Any]],
    make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    on_inner_change: Callable[[list[torch.optim.Optimizer]], None] | None = None,
) -> torch.optim.Optimizer:
    """One optimizer over the GaLore groups, or the per-layer wrapper when ``per_layer`` is set."""
    if config["per_layer"]:
        check_per_layer(settings)
    groups = galore_groups(model, projected, config, settings.weight_decay, settings.decay_norms_and_biases)
    if not config["per_layer"]:
        return compensated(make_optimizer(groups), settings.bf16_rounding)
    from lowmem.plugins.optimizers.per_layer import PerLayerOptimizer

    return PerLayerOptimizer(groups, make_optimizer, settings.grad_accum, on_inner_change=on_inner_change,
                             rounding=settings.bf16_rounding)


# -- projector -------------------------------------------------------------------------------
class CompactProjector(GaLoreProjector):
    """galore_torch's projector, keeping only the rank-r factor it uses.

    galore_torch returns ``Vh[:rank]`` / ``U[:, :rank]``, views that keep the whole
    min(m, n)-wide SVD factor alive (4x the memory at rank 128 on 512-wide layers, and 4x
    the checkpoint size, since torch.save writes whole storages).
    """

    def get_orthogonal_matrix(self, weights, rank, type):  # noqa: A002 - galore_torch's signature
        factor = super().get_orthogonal_matrix(weights, rank, type)
        if isinstance(factor, list):
            return [f.clone() for f in factor]
        return factor.clone()


# torch.svd_lowrank settings for svd "randomized": a few extra directions sampled beyond the
# rank and two power iterations, the usual choice for quickly decaying spectra (Halko et al.);
# a fixed seed makes every refresh a function of the gradient alone, so resumed runs (which save
# no random state) and per-layer runs refresh exactly like uninterrupted whole-model ones.
RANDOMIZED_OVERSAMPLING = 8
RANDOMIZED_NITER = 2
RANDOMIZED_SEED = 0


class RandomizedProjector(CompactProjector):
    """CompactProjector whose refresh is torch.svd_lowrank's randomized SVD of the gradient: the
    top ``rank`` singular directions from a sketch of rank + RANDOMIZED_OVERSAMPLING columns,
    instead of a full SVD. Same shapes and dtypes as galore_torch's factors."""

    def get_orthogonal_matrix(self, weights, rank, type):  # noqa: A002 - galore_torch's signature
        matrix = weights.data
        original_dtype = matrix.dtype
        if original_dtype != torch.float:
            matrix = matrix.float()
        sketch = min(rank + RANDOMIZED_OVERSAMPLING, *matrix.shape)
        # svd_lowrank draws its test matrix from the global generator: fork it (the training RNG
        # stream is left untouched) and seed only the generator of the matrix's device.
        cuda = [matrix.device] if matrix.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            if cuda:
                with torch.cuda.device(matrix.device):
                    torch.cuda.manual_seed(RANDOMIZED_SEED)
            else:
                torch.default_generator.manual_seed(RANDOMIZED_SEED)
            u, _, v = torch.svd_lowrank(matrix, q=sketch, niter=RANDOMIZED_NITER)
        left = u[:, :rank].contiguous().to(original_dtype)
        right = v[:, :rank].t().contiguous().to(original_dtype)
        if type == "right":
            return right
        if type == "left":
            return left
        if type == "full":
            return [left, right]
        raise ValueError("type should be left, right or full")


def new_projector(group: Mapping[str, Any]) -> CompactProjector:
    kind = RandomizedProjector if group.get("svd", "full") == "randomized" else CompactProjector
    return kind(
        group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
        proj_type=group["proj_type"],
    )


def pack_projector(projector: GaLoreProjector) -> dict[str, Any]:
    """Tensors and numbers only, so torch.load(weights_only=True) accepts the state. proj_type
    is not stored: torch's state loader rebuilds every iterable in state, strings included
    ("std" would come back as "<generator ...>"); it is read back from the param group."""
    return {
        "ortho_matrix": projector.ortho_matrix,
        "rank": projector.rank,
        "update_proj_gap": projector.update_proj_gap,
        "scale": projector.scale,
    }


class ProjectorStateMixin(torch.optim.Optimizer):
    """state_dict()/load_state_dict() for optimizers keeping a GaLoreProjector per parameter:
    the projector is saved as its matrix and numbers, and rebuilt on load, so a resumed run
    projects with the saved matrix until its next scheduled refresh. Mixed in before a
    ``torch.optim.Optimizer`` subclass."""

    def state_dict(self):
        state_dict = super().state_dict()
        # torch's state_dict() shares the live per-parameter dicts: build new ones.
        state_dict["state"] = {
            key: {**value, "projector": pack_projector(value["projector"])}
            if isinstance(value, dict) and isinstance(value.get("projector"), GaLoreProjector)
            else value
            for key, value in state_dict["state"].items()
        }
        return state_dict

    def load_state_dict(self, state_dict, *args, **kwargs):
        super().load_state_dict(state_dict, *args, **kwargs)
        for group in self.param_groups:
            for p in group["params"]:
                packed = self.state.get(p, {}).get("projector")
                if "rank" in group and isinstance(packed, dict):
                    projector = new_projector(group)
                    projector.rank = packed["rank"]
                    projector.update_proj_gap = packed["update_proj_gap"]
                    projector.scale = packed["scale"]
                    projector.ortho_matrix = packed["ortho_matrix"]
                    self.state[p]["projector"] = projector


@on_local_shards  # FSDP: steps each process's slices (galore_sharded)
class LowmemGaLoreAdamW(ProjectorStateMixin, GaLoreAdamW):
    """galore_torch's GaLoreAdamW with compact projectors and a weights_only-loadable state.
    eps is galore_torch's default, for the projected and the plain groups alike."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, eps: float = GALORE_TORCH_EPS):
        # mypy resolves this to torch's Optimizer (galore_torch has no type information).
        super().__init__(params, lr=lr, eps=eps, weight_decay=weight_decay,  # type: ignore[call-arg]
                         no_deprecation_warning=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # galore_torch creates a projector only where none exists: put ours there first.
        for group in self.param_groups:
            if "rank" in group:
                for p in group["params"]:
                    if p.grad is not None and "projector" not in self.state[p]:
                        self.state[p]["projector"] = new_projector(group)
        super().step()
        return loss


# -- state bytes -----------------------------------------------------------------------------
def low_rank_shapes(rows: int, cols: int, rank: int, proj_type: str) -> tuple[tuple[int, int], int]:
    """(shape of the Adam moments, elements of the projection matrix) for a rows x cols weight,
    following GaLoreProjector.project: 'std' keeps the long side and projects the short one
    (moments rank x max, projector rank x min), 'reverse_std' the opposite."""
    if proj_type == "std":
        side = "right" if rows >= cols else "left"
    elif proj_type == "reverse_std":
        side = "left" if rows >= cols else "right"
    else:
        side = proj_type
    if side == "right":
        return (rows, rank), rank * cols
    if side == "left":
        return (rank, cols), rows * rank
    return (rank, rank), rows * rank + rank * cols  # full: both sides


def galore_state_bytes(
    model: Any, projected: list[tuple[str, Any]], config: Mapping[str, Any], min_8bit_size: int | None = None
) -> int:
    """Exact optimizer-state bytes, from shapes only. ``min_8bit_size`` None: GaLoreAdamW (moments
    in the parameter's dtype); otherwise the 8-bit optimizer (bitsandbytes rules: uint8 moments
    plus an fp32 absmax per 256-element block from ``min_8bit_size`` elements on, fp32 moments
    below it, and the two shared quantisation maps once)."""
    projected_ids = {id(p) for _, p in projected}
    total = 0
    any_8bit = False
    for p in model.parameters():
        if not p.requires_grad:
            continue
        moment_numel = p.numel()
        if id(p) in projected_ids:
            rows, cols = p.shape
            moment_shape, projector_numel = low_rank_shapes(rows, cols, config["rank"], config["proj_type"])
            moment_numel = math.prod(moment_shape)
            total += projector_numel * p.element_size()
        if min_8bit_size is None:
            total += 2 * moment_numel * p.element_size()
        elif moment_numel >= min_8bit_size:
            any_8bit = True
            total += 2 * moment_numel + 2 * 4 * math.ceil(moment_numel / BNB_BLOCK)
        else:
            total += 2 * moment_numel * 4
    return total + (BNB_QMAP_BYTES if any_8bit else 0)

