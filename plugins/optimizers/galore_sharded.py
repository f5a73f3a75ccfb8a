"""GaLore on FSDP shards: the projection of the whole gradient matrix, computed on slices.

FSDP gives each process a slice of every weight and of its (already averaged) gradient. GaLore
keeps one side of a gradient matrix and projects the other: ``std`` projects the columns of a
tall matrix (G·Qᵀ, Q = the top right singular vectors) and the rows of a wide one (Pᵀ·G). A
weight projected on the right is sharded by rows (FSDP's default) and one projected on the left
by columns (``shard_dims``), so each process projects, updates and projects back its own slice
with the shared factor, and Adam's low-rank moments are sliced the same way: no communication.

Only a refresh (every ``update_proj_gap`` steps) needs the whole gradient: its slices are
gathered once (one all-gather of the matrix, the size of one FSDP weight gather), the SVD is the
very one a single process computes, and rank 0's factor is broadcast so every process holds the
same bits. ``proj_type: full`` projects both sides and cannot be sliced: refused.

The optimizers keep running on plain tensors: ``on_local_shards`` wraps their ``step`` so it
sees each process's slices of parameters, gradients and state, and stores state back as
DTensors sliced like their parameter (checkpoints then reshard); bitsandbytes' 8-bit moments
are quantised per slice, 8-bit wherever one process would keep them 8-bit.

Imported only from inside plugin methods.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.tensor import DTensor

import lowmem

REPLICATED = ("qmap1", "qmap2")  # bitsandbytes' quantisation maps: the same constants everywhere
PER_BLOCK = ("absmax1", "absmax2")  # bitsandbytes' per-256-element scales of a quantised moment
BLOCK = 256
# Set on each local slice while an optimizer steps: the elements of the whole parameter's Adam
# moment, so an 8-bit optimizer can pick 8 or 32 bits as one process would (galore_adamw8bit).
WHOLE_MOMENT = "lowmem_whole_moment_numel"


def is_dtensor(tensor: Any) -> bool:
    return isinstance(tensor, DTensor)


def projection_side(shape: tuple[int, ...], proj_type: str) -> str:
    """The side galore_torch projects for a weight of ``shape``: "right" (keep rows), "left"
    (keep columns) or "full"."""
    rows, cols = shape
    if proj_type == "std":
        return "right" if rows >= cols else "left"
    if proj_type == "reverse_std":
        return "left" if rows >= cols else "right"
    return proj_type


def shard_dims(projected: list[tuple[str, Any]], proj_type: str, world_size: int) -> dict[str, int]:
    """Columns (dim 1) for weights projected on the left; rows (FSDP's default) otherwise."""
    dims = {}
    for name, weight in projected:
        shape = tuple(weight.shape)
        side = projection_side(shape, proj_type)
        if side == "full":
            raise lowmem.ConfigError("proj_type 'full' projects both sides of a weight, but FSDP slices one "
                                     "side: use std, reverse_std, left or right with --parallel fsdp")
        if side == "left":
            if shape[1] % world_size:
                raise lowmem.ConfigError(
                    f"GaLore on FSDP slices {name} ({shape[0]}x{shape[1]}) by columns, which needs its "
                    f"{shape[1]} columns to divide among {world_size} processes; use another process "
                    "count or proj_type right")
            dims[name] = 1
    return dims


class Slicing:
    """How a weight is sliced: its whole ``shape``, split along ``placements`` over ``mesh``.
    (Slots, not attributes: memory accounting walks a projector's attributes for tensors.)"""

    __slots__ = ("mesh", "placements", "shape")

    def __init__(self, param: Any):
        self.mesh, self.placements, self.shape = param.device_mesh, param.placements, tuple(param.shape)


class ShardedProjection:
    """Mixed into a GaLore projector: project this process's slice of a gradient matrix."""

    slicing: Slicing
    ortho_matrix: Any  # galore_torch's factor: rank x cols (right) or rows x rank (left)

    @property
    def side(self) -> str:
        return projection_side(self.slicing.shape, self.proj_type)  # type: ignore[attr-defined]

    def project(self, grad: torch.Tensor, iter: int) -> torch.Tensor:  # noqa: A002 - galore_torch's name
        if self.ortho_matrix is None or iter % self.update_proj_gap == 0:  # type: ignore[attr-defined,has-type]
            self.ortho_matrix = self.refresh(grad)
        if self.side == "right":
            return torch.matmul(grad, self.ortho_matrix.t())
        return torch.matmul(self.ortho_matrix.t(), grad)

    def project_back(self, low_rank: torch.Tensor) -> torch.Tensor:
        if self.side == "right":
            return torch.matmul(low_rank, self.ortho_matrix) * self.scale  # type: ignore[attr-defined]
        return torch.matmul(self.ortho_matrix, low_rank) * self.scale  # type: ignore[attr-defined]

    def refresh(self, grad: torch.Tensor) -> torch.Tensor:
        """The factor of the whole gradient: its slices gathered, the single-process SVD, and
        rank 0's result on every process (two collectives, on refresh steps only)."""
        import torch.distributed as dist

        where = self.slicing
        whole = DTensor.from_local(grad, where.mesh, where.placements, run_check=False,
                                   shape=torch.Size(where.shape),
                                   stride=contiguous_strides(where.shape)).full_tensor()
        factor = self.get_orthogonal_matrix(whole, self.rank, type=self.side)  # type: ignore[attr-defined]
        factor = factor.contiguous()
        group = where.mesh.get_group()
        dist.broadcast(factor, src=dist.get_global_rank(group, 0), group=group)
        return factor


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))


def sharded_projector(projector: Any, param: Any) -> Any:
    """``projector`` (a galore_common projector, with its matrix if it has one) made the same kind
    of projector on ``param``'s slices. In place, the same object: whoever holds it (bf16-pure's
    fp32 update swaps its matrix for an fp32 copy and back, lowmem.rounding) still holds it."""
    if isinstance(projector, ShardedProjection):
        return projector
    kind = type(projector)
    if kind not in _SHARDED:
        _SHARDED[kind] = type(f"Sharded{kind.__name__}", (ShardedProjection, kind), {})
    projector.__class__ = _SHARDED[kind]
    projector.slicing = Slicing(param)
    return projector


_SHARDED: dict[type, type] = {}  # a projector class -> its sharded kind (made once per class)


def replicated_state_bytes(model: Any, projected: list[tuple[str, Any]], config: Mapping[str, Any]) -> int:
    """What every FSDP process holds whole: the projection matrices, and bitsandbytes' two
    quantisation maps when some moment is 8-bit."""
    from lowmem.plugins.optimizers.galore_common import BNB_QMAP_BYTES, low_rank_shapes

    total, largest_moment = 0, 0
    shapes = {id(weight): weight.shape for _, weight in projected}
    for param in (p for p in model.parameters() if p.requires_grad):
        moment_numel = param.numel()
        if id(param) in shapes:
            rows, cols = shapes[id(param)]
            moment, projector = low_rank_shapes(rows, cols, config["rank"], config["proj_type"])
            total += projector * param.element_size()
            moment_numel = math.prod(moment)
        largest_moment = max(largest_moment, moment_numel)
    quantised = "min_8bit_size" in config and largest_moment >= config["min_8bit_size"]
    return total + (BNB_QMAP_BYTES if quantised else 0)


# -- running an optimizer's own step on the slices -----------------------------------------------
def on_local_shards(cls: type) -> type:
    """Class decorator: ``step`` runs on each process's slices when the parameters are DTensors
    (``local_shards``); unchanged otherwise."""
    inner = cls.step  # type: ignore[attr-defined]

    @functools.wraps(inner)
    def step(self: Any, closure: Any = None) -> Any:
        with local_shards(self):
            return inner(self, closure)

    cls.step = step  # type: ignore[attr-defined]
    cls.step_communicates = step_communicates  # type: ignore[attr-defined]
    return cls


def step_communicates(optimizer: Any, param: Any) -> bool:
    """Whether ``optimizer``'s next step of ``param`` makes a collective: only a sliced projected
    weight's, on a step that refreshes its projection, or while (8-bit GaLore) its projector
    waits for a first non-zero gradient. (Per-layer updates ask, to agree on a non-finite
    gradient only where they must: ``per_layer``.)"""
    if not is_dtensor(param):
        return False
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None or "rank" not in group:
        return False
    state = optimizer.state.get(param, {})
    projector = state.get("projector")
    if projector is None or getattr(projector, "ortho_matrix", None) is None:
        return True
    # galore_torch's test: a refresh when the step count before this step is a multiple of the gap.
    return int(state.get("step", 0)) % projector.update_proj_gap == 0


@contextmanager
def local_shards(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Within: every DTensor parameter of ``optimizer`` is replaced in its group by its local
    slice (a view: updates land in the parameter), with the local gradient and the local views
    of its state; projected weights get sharded projectors. After: state created inside is
    stored back as DTensors sliced like the parameter (or, replicated, as it is), in the
    parameter's state dict itself."""
    swaps = []
    for group in optimizer.param_groups:
        for index, param in enumerate(group["params"]):
            if not is_dtensor(param):
                continue
            state = optimizer.state[param]
            if "rank" in group and param.grad is not None:
                make_projector(optimizer, group, param, state)
            # Detached: a leaf sharing the slice's storage (an fp32 stand-in's to_local() is not one).
            local = param.to_local().detach()
            local.grad = None if param.grad is None else param.grad.to_local()
            setattr(local, WHOLE_MOMENT, whole_moment_numel(group, param))
            optimizer.state[local] = {key: to_local(key, value, state) for key, value in state.items()}
            group["params"][index] = local
            swaps.append((group, index, param, local))
    try:
        yield
    finally:
        for group, index, param, local in swaps:
            group["params"][index] = param
            state = optimizer.state.pop(local)
            # Into the parameter's own dict, not a new one: the per-layer wrapper exposes these
            # dicts as its state (and tools measure that), so they must stay the same objects.
            kept = optimizer.state[param]
            kept.clear()
            kept.update({key: to_dtensor(key, value, param, state) for key, value in state.items()})
            local.grad = None


def whole_moment_numel(group: Mapping[str, Any], param: Any) -> int:
    """Elements of Adam's moments for the whole ``param``: low-rank for a projected weight."""
    if "rank" not in group:
        return param.numel()
    from lowmem.plugins.optimizers.galore_common import low_rank_shapes

    rows, cols = param.shape
    moment, _ = low_rank_shapes(rows, cols, group["rank"], group["proj_type"])
    return math.prod(moment)


def make_projector(optimizer: Any, group: Mapping[str, Any], param: Any, state: dict[str, Any]) -> None:
    from lowmem.plugins.optimizers.galore_common import new_projector

    if "projector" in state:
        state["projector"] = sharded_projector(state["projector"], param)
        return
    if getattr(optimizer, "projector_waits_for_gradient", False):
        # Only once the whole gradient is non-zero anywhere (a zero slice here is not enough).
        import torch.distributed as dist

        nonzero = param.grad.to_local().any().to(torch.float32).reshape(1)
        dist.all_reduce(nonzero, group=param.device_mesh.get_group())
        if not nonzero.item():
            return
    state["projector"] = sharded_projector(new_projector(group), param)


def to_local(key: str, value: Any, state: Mapping[str, Any]) -> Any:
    if not is_dtensor(value):
        return value
    local = value.to_local()
    if key in PER_BLOCK:  # stored as one padded row per process: this process's row, unpadded
        moment = state[f"state{key[-1]}"]
        return local[0, :math.ceil(moment.to_local().numel() / BLOCK)]
    return local


def to_dtensor(key: str, value: Any, param: Any, state: Mapping[str, Any]) -> Any:
    """Per-slice state as a DTensor: sliced like the parameter along the same dimension (Adam's
    moments, whole or low-rank), or, for bitsandbytes' block scales, one padded row per process."""
    from torch.distributed.tensor import Shard

    if not isinstance(value, torch.Tensor) or is_dtensor(value) or key in REPLICATED or value.dim() == 0:
        return value
    mesh, world, dim = param.device_mesh, param.device_mesh.size(), param.placements[0].dim
    if key in PER_BLOCK:
        moment = state[f"state{key[-1]}"]  # the quantised moment these scale, sliced along dim
        largest = -(-param.shape[dim] // world) * (moment.numel() // max(1, moment.shape[dim]))
        padded = torch.zeros((1, math.ceil(largest / BLOCK)), dtype=value.dtype, device=value.device)
        padded[0, :value.numel()] = value
        blocks = torch.Size((world, padded.shape[1]))
        return DTensor.from_local(padded, mesh, [Shard(0)], run_check=False, shape=blocks,
                                  stride=contiguous_strides(tuple(blocks)))
    shape = torch.Size(param.shape[dim] if i == dim else size for i, size in enumerate(value.shape))
    return DTensor.from_local(value, mesh, param.placements, run_check=False, shape=shape,
                              stride=contiguous_strides(tuple(shape)))

