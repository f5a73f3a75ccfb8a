"""Exact memory accounting of a model and its optimizer, measured from the tensors themselves."""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterable
from typing import Any


def _storage_key(tensor) -> tuple[str, int]:
    storage = tensor.untyped_storage()
    return (str(tensor.device), storage.data_ptr() if tensor.device.type != "meta" else id(storage))


def unique_tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors``: shared tensors (bitsandbytes' quantile
    maps, tied embeddings) count once; a sharded tensor (DTensor) counts its local shard."""
    from lowmem.sharding import local

    seen: dict[tuple[str, int], int] = {}
    for tensor in map(local, tensors):
        key = _storage_key(tensor)
        seen[key] = max(seen.get(key, 0), tensor.untyped_storage().nbytes())
    return sum(seen.values())


def iter_tensors(value: Any, _depth: int = 0) -> Iterable[Any]:
    """Every tensor inside nested dicts, lists, tuples and plain objects (GaLore keeps its
    projection matrix on a projector object inside the optimizer state)."""
    import torch

    if _depth > 8:
        return
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_tensors(item, _depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from iter_tensors(item, _depth + 1)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        yield from iter_tensors(vars(value), _depth + 1)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held in ``optimizer.state``: distinct tensor storages, projector objects included,
    storages shared by several entries (bitsandbytes' quantile maps) counted once."""
    return unique_tensor_bytes(iter_tensors(list(optimizer.state.values())))


def parameter_bytes(model) -> int:
    return unique_tensor_bytes(p for p in model.parameters())


def gradient_bytes(model) -> int:
    return unique_tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


def run_figures(model, optimizer, grad_bytes: int, peak_memory_bytes: int, gather) -> dict[str, Any]:
    """This process's parameter, gradient and optimizer-state bytes (its shards under FSDP) and
    peak memory; as ``world_...``, their sums over every process; and as ``per_process``, each
    process's own (``gather``: DistContext.gather, rank order)."""
    mine = {"param_bytes": parameter_bytes(model), "grad_bytes": grad_bytes,
            "optimizer_state_bytes": optimizer_state_bytes(optimizer), "peak_memory_bytes": peak_memory_bytes}
    every = gather(mine)
    return {**mine, **{f"world_{key}": sum(figures[key] for figures in every) for key in mine},
            "per_process": [{"rank": rank, **figures} for rank, figures in enumerate(every)]}


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared parameters once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def peak_rss_bytes() -> int:
    """Peak resident set size of this process. On Linux its memory's own high-water mark
    (VmHWM): getrusage's ru_maxrss keeps, across exec, the peak of the process it was started
    from, so a run launched from a large parent reported that parent's size. Elsewhere ru_maxrss
    (macOS reports bytes)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def cuda_peaks(device) -> dict[str, int]:
    import torch

    if device.type != "cuda":
        return {}
    return {
        "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
        "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
    }


def now_bytes(device) -> int:
    """Memory in use now: CUDA's allocation on a GPU, else the process's resident set."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.memory_allocated(device))
    return current_rss_bytes()
