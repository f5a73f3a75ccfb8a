"""``--parallel fsdp``: the model sharded over the processes with FSDP2 (``fully_shard``).

Each transformer block is one FSDP unit (its weights are gathered for its forward and backward
only, its gradients reduce-scattered as soon as they exist), the rest of the model is the root
unit. Every parameter becomes a DTensor holding 1/N of its rows (or columns, where the optimizer
asks: ``Optimizer.shard_dims``), so weights, gradients and optimizer states are each 1/N per
process. Mixed precision follows ``--dtype`` through FSDP2's own policy: 16-bit weights gathered
for compute, gradients reduced in fp32; fp32 runs have none.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from lowmem.distributed import DistContext


def local(tensor: Any) -> Any:
    """This process's part of ``tensor``: the local shard of a DTensor, a plain tensor as it is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def is_sharded(tensor: Any) -> bool:
    return callable(getattr(tensor, "to_local", None))


def sliced_like(whole: Any, param: Any) -> Any:
    """``whole`` (the same on every process) as a DTensor sliced as ``param`` is: each process
    keeps its own slice, with no communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def mixed_precision(dtype: str) -> Any:
    """FSDP2's policy for a resolved ``--dtype``: compute in the 16-bit format (the autocast
    formats gather their fp32 weights as 16 bits), reduce gradients in fp32."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    if dtype == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model: the classes its ``_no_split_modules`` names
    (LlamaDecoderLayer, GPT2Block, RobertaLayer), wherever a peft wrapper put the model. A
    module holding a tied weight (RoBERTa's embeddings, tied to its LM head) stays in the root
    unit: FSDP shards each parameter in one unit only."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    seen: set[int] = set()
    tied: set[int] = set()
    for _, param in model.named_parameters(remove_duplicate=False):
        (tied if id(param) in seen else seen).add(id(param))
    return [module for module in model.modules() if type(module).__name__ in names
            and not any(id(p) in tied for p in module.parameters())]


def shard_model(model: torch.nn.Module, dtype: str, device: torch.device,
                dims: Mapping[str, int]) -> torch.nn.Module:
    """Shard ``model`` in place over the process group: each transformer block, then the root.
    FSDP moves every parameter to ``device`` as it shards it, so a process never holds more of
    the model on the device than one block at a time plus its own shards."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    names = {id(p): name for name, p in model.named_parameters()}

    def placement(param: torch.nn.Parameter) -> Any:
        dim = dims.get(names.get(id(param), ""), 0)
        return Shard(dim) if dim else None  # None: FSDP's default, rows

    # FSDP2 warns, once per process, when a sharded module returns a view (a PEFT model's logits,
    # the hidden states the lean loss reads): an in-place op on it would skip the gather before
    # backward. lowmem only reads what the model returns, and the two-process runs equal one
    # process (tests/test_fsdp*.py), so the warning would only alarm.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor",
                            category=UserWarning)
    policy = mixed_precision(dtype)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, shard_placement_fn=placement)
    fully_shard(model, mesh=mesh, mp_policy=policy, shard_placement_fn=placement)
    return model


def replicated_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of what every process of a sharded run must hold identically: the model's
    buffers and the optimizer-state tensors that are not sharded (GaLore's projection matrices,
    step counters, quantisation maps), in the same order on every process."""
    from lowmem.memory import iter_tensors

    yield from ((f"buffer {name}", buffer) for name, buffer in model.named_buffers())
    names = {id(p): name for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for i, tensor in enumerate(iter_tensors(state)):
                if not is_sharded(tensor):
                    yield f"optimizer state {names.get(id(param), '?')}[{i}]", tensor


def check_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dist: DistContext) -> None:
    """The consistency check of a sharded run: the shards differ by design, but everything not
    sharded must be bit-identical on every process (an optimizer that derived replicated state
    from its own shard alone, such as a projection from a slice of a gradient, fails here)."""
    named = list(replicated_tensors(model, optimizer))
    dist.compare_across_ranks(named, "state that every process must hold identically differs "
                                     "between ranks after training")
