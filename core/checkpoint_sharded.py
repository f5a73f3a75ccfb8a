"""The model and optimizer part of ``--parallel fsdp`` checkpoints, and the gathered export.

Every process writes its own shards with ``torch.distributed.checkpoint`` (DCP) into the
checkpoint's temporary folder, under ``shards/``: safetensors files through DCP's Hugging Face
storage writer, which keeps each slice's position in the safetensors header, so nothing is
pickled (DCP's default writer pickles its metadata). Rank 0 then adds the other files, the
manifest last, and renames the folder as for every checkpoint (``lowmem.checkpoint_files``).

The model state is ``get_model_state_dict``'s: DTensors, saved as slices of the whole tensors.
The optimizer's ``state_dict()`` is split into its tensors (in ``shards/`` as well) and the rest,
written as JSON (``optimizer_layout.json``) with each tensor's whole shape, dtype and the
dimension it is sharded on. Loading builds tensors of that layout on the current processes and
lets DCP read each process's slices: a checkpoint loads into any number of processes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lowmem.errors import CheckpointError
from lowmem.sharding import is_sharded, sliced_like
from lowmem.text import first_line

SHARDS = "shards"
LAYOUT = "optimizer_layout.json"


def save_shards(run: Any, folder: Path) -> dict[str, Any]:
    """Every process: write its shards into ``folder/shards``; returns the optimizer layout
    (rank 0 writes it with ``write_layout``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    tensors: dict[str, Any] = {}
    layout = {"optimizer": split_state(run.optimizer.state_dict(), tensors)}
    state = {"model": untied(run.model, get_model_state_dict(run.model)), "optimizer": tensors}
    with plain_errors():
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(folder / SHARDS), save_distributed=True))
    return layout


def write_layout(folder: Path, layout: dict[str, Any]) -> None:
    (folder / LAYOUT).write_text(json.dumps(layout))


def load_shards(run: Any, path: Path) -> None:
    """Every process: read its slices of the model and optimizer state from checkpoint ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    layout = json.loads((path / LAYOUT).read_text())
    mesh = next((p.device_mesh for p in run.model.parameters() if is_sharded(p)), None)
    tensors: dict[str, Any] = {}
    skeleton = join_state(layout["optimizer"], tensors, mesh, run.device)
    model_state = untied(run.model, get_model_state_dict(run.model))
    state = {"model": model_state, "optimizer": tensors}
    try:
        with plain_errors():
            dcp.load(state, storage_reader=HuggingFaceStorageReader(str(path / SHARDS)))
    except Exception as exc:  # noqa: BLE001 - DCP wraps every rank's failure alike
        raise CheckpointError(f"cannot load the shards of {path}: {first_line(exc)}") from None
    set_model_state_dict(run.model, model_state, options=StateDictOptions(strict=False))
    run.optimizer.load_state_dict(rebuild(skeleton, state["optimizer"]))


def load_whole(run: Any, path: Path) -> None:
    """Every process: its slices of a checkpoint written whole (by one process, or by DDP): the
    model's tensors and the optimizer's state sliced as this run's parameters are
    (``whole_to_slices``), so a run can move from one process to several sharded ones."""
    import safetensors.torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from lowmem.checkpoint_files import load_tensors

    model_state: dict[str, Any] = safetensors.torch.load_file(str(path / "model.safetensors"),
                                                              device=str(run.device))
    try:
        set_model_state_dict(run.model, model_state,
                             options=StateDictOptions(full_state_dict=True, strict=False))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path / 'model.safetensors'} does not fit the model: "
                              f"{first_line(exc)}") from None
    state = packed(load_tensors(path / "optimizer.pt"))
    run.optimizer.load_state_dict(whole_to_slices(state, run.optimizer))


def packed(value: Any) -> Any:
    """``value`` with its tensors contiguous: a whole checkpoint keeps views as they were (a
    projection matrix cut from an SVD's factor), and sharded checkpoints refuse to write them."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.contiguous()
    if isinstance(value, dict):
        return {key: packed(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(packed(item) for item in value)
    return value


# bitsandbytes' quantisation maps (constants) and block scales: not element-wise state.
NOT_SLICED = ("qmap1", "qmap2", "absmax1", "absmax2")


def whole_to_slices(state_dict: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """A whole optimizer ``state_dict`` (torch's form, or per-layer's list of them) with every
    element-wise state tensor of a sliced parameter (a float tensor as many-dimensional as the
    parameter and as long along its sliced dimension: Adam's moments, whole or low-rank) made a
    DTensor sliced like it. Scalars, projection matrices and 8-bit blocks stay as they are: the
    optimizer's own ``load_state_dict`` re-slices what needs more (8-bit GaLore re-quantises)."""
    import torch

    inner = getattr(optimizer, "inner_optimizers", None)
    if "per_layer" in state_dict and inner is not None:
        return {**state_dict, "per_layer": [whole_to_slices(s, o) for s, o in zip(state_dict["per_layer"],
                                                                                  inner, strict=True)]}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, state in state_dict.get("state", {}).items():
        param = params[index]
        if not is_sharded(param) or not isinstance(state, dict):
            continue
        dim = param.placements[0].dim
        # bitsandbytes nests its moments in a dict of their own, under a key it names.
        nested = state.get(getattr(optimizer, "_FSDP_WRAPPED_QUANT_STATE_KEY", None) or "", None)
        for holder in [state, *([nested] if isinstance(nested, dict) else [])]:
            for key, value in holder.items():
                if (key not in NOT_SLICED and isinstance(value, torch.Tensor) and value.is_floating_point()
                        and value.dim() == param.dim() and value.shape[dim] == param.shape[dim]):
                    holder[key] = sliced_like(value, param)
    return state_dict


@contextmanager
def plain_errors() -> Iterator[None]:
    """DCP reports a failure on any rank as a ``CheckpointException``, a BaseException holding
    every rank's error: re-raise the first of them as an ordinary exception."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as exc:
        failures = getattr(exc, "failures", {}) or {}
        first = next(iter(failures.values()), None)
        error = first[0] if isinstance(first, tuple) else first
        raise RuntimeError(first_line(error) if error is not None else str(exc)) from None


def untied(model: Any, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the second name of a tied weight (GPT-2's lm_head is its embedding):
    safetensors refuses to write one tensor twice, and loading the first name loads both."""
    seen: set[int] = set()
    duplicates = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            duplicates.append(name)
        seen.add(id(param))
    return {key: value for key, value in state.items() if key not in duplicates}


# -- the optimizer state as tensors + JSON -----------------------------------------------------
def split_state(value: Any, tensors: dict[str, Any]) -> Any:
    """``value`` with every tensor put into ``tensors`` (key ``t<N>``) and replaced by its
    layout; tuples and dicts with non-string keys are tagged so they come back as they were."""
    import torch

    if isinstance(value, torch.Tensor):
        # A tensor held twice (bitsandbytes' shared quantisation maps) is saved once and comes
        # back shared.
        key = next((k for k, t in tensors.items() if t is value), f"t{len(tensors)}")
        tensors[key] = value
        placement = getattr(value, "placements", [None])[0]
        return {"tensor": key, "shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."),
                "shard_dim": getattr(placement, "dim", None)}
    if isinstance(value, dict):
        return {"dict": [[split_state(k, tensors), split_state(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [split_state(item, tensors) for item in value]}
    if isinstance(value, list):
        return [split_state(item, tensors) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise CheckpointError(f"the optimizer state holds a {type(value).__name__}: only tensors and plain "
                          "values can be checkpointed")


def join_state(layout: Any, tensors: dict[str, Any], mesh: Any, device: Any) -> Any:
    """The skeleton of ``split_state``'s output with an empty tensor of the saved layout for
    every tensor (sharded on the current ``mesh`` where it was sharded), also put in ``tensors``."""
    import torch

    if isinstance(layout, list):
        return [join_state(item, tensors, mesh, device) for item in layout]
    if not isinstance(layout, dict):
        return layout
    if "tuple" in layout:
        return tuple(join_state(item, tensors, mesh, device) for item in layout["tuple"])
    if "dict" in layout:
        return {join_state(k, tensors, mesh, device): join_state(v, tensors, mesh, device)
                for k, v in layout["dict"]}
    if layout["tensor"] in tensors:  # the same tensor again
        return _Slot(layout["tensor"])
    dtype = getattr(torch, layout["dtype"])
    tensor: Any
    if layout["shard_dim"] is not None and mesh is not None:
        from torch.distributed.tensor import Shard, zeros

        placements = [Shard(layout["shard_dim"])]
        tensor = zeros(layout["shape"], dtype=dtype, device_mesh=mesh, placements=placements)
    else:
        tensor = torch.zeros(layout["shape"], dtype=dtype, device=device)
    tensors[layout["tensor"]] = tensor
    return _Slot(layout["tensor"])


class _Slot(str):
    """Where a loaded tensor goes back into the skeleton."""


def rebuild(skeleton: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(skeleton, _Slot):
        return tensors[skeleton]
    if isinstance(skeleton, list):
        return [rebuild(item, tensors) for item in skeleton]
    if isinstance(skeleton, tuple):
        return tuple(rebuild(item, tensors) for item in skeleton)
    if isinstance(skeleton, dict):
        return {k: rebuild(v, tensors) for k, v in skeleton.items()}
    return skeleton


# -- the exported model ------------------------------------------------------------------------
def gathered_model(run: Any) -> Any:
    """Every process: gather the whole model; rank 0 gets it as a plain (unsharded) model on
    the CPU, the others None."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not torch.distributed.get_rank() == 0:
        return None
    plain = run.plain_model()
    missing, unexpected = plain.load_state_dict(full, strict=False, assign=True)
    # Buffers outside the state dict (rotary frequencies) are the same on every process.
    for name, buffer in run.model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = plain.get_submodule(owner)
        if module._buffers.get(leaf) is not None and module._buffers[leaf].is_meta:
            module._buffers[leaf] = buffer.detach().to("cpu", copy=True)
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    still_meta = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if unexpected or still_meta:
        raise CheckpointError(f"the gathered model does not fit its architecture ({len(still_meta)} tensors "
                              f"missing, {len(unexpected)} unexpected)")
    del missing  # tied weights are missing from the gathered state and tied again above
    return plain
