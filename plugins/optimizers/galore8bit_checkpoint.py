"""8-bit moments of sliced parameters in FSDP checkpoints: also as fp32 slices, so they re-slice.

Under FSDP each process quantises its own slice of a moment in bitsandbytes' 256-element blocks
(galore_sharded). Those blocks do not re-slice onto another number of processes, so a
checkpoint adds an fp32 copy of each 8-bit moment, sliced like its parameter; on load the saved
blocks come back where the number of processes is the same, and are quantised again from the copy
where it is not.

Imported only from inside plugin methods (bitsandbytes is heavy).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor

import lowmem
from lowmem.plugins.optimizers.galore_sharded import BLOCK, is_dtensor, to_dtensor, to_local
from lowmem.sharding import sliced_like

FP32_COPY = "lowmem_fp32_state"  # + "1" or "2": a checkpoint's fp32 copy of an 8-bit moment


def with_fp32_slices(state_dict: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """``state_dict`` (bitsandbytes' form) with an fp32 copy of each 8-bit moment of a sliced
    parameter, sliced like it. The 8-bit blocks and their scales stay too: they restore the
    moments bit for bit at the same number of processes (a block's scale cannot be recovered
    from its values), while 256-element blocks of one process's slice do not re-slice onto
    another number of processes and the fp32 values do."""
    import bitsandbytes.functional as bnb

    for _, state in _sliced_states(optimizer, state_dict):
        for n in "12":
            moment = state.get(f"state{n}")
            if isinstance(moment, DTensor) and moment.dtype == torch.uint8:
                absmax = to_local(f"absmax{n}", state[f"absmax{n}"], state)
                values = bnb.dequantize_blockwise(moment.to_local().contiguous(), absmax=absmax,
                                                  code=state[f"qmap{n}"], blocksize=BLOCK)
                state[f"{FP32_COPY}{n}"] = _like(values, moment)
    return state_dict


def for_these_slices(state_dict: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """The moments of a checkpoint in the form bitsandbytes keeps for this process's slices: the
    saved 8-bit blocks where the checkpoint has as many processes, else blocks quantised again
    from the fp32 copy (or from a whole moment's values, in a checkpoint written whole), or fp32
    where the whole moment is below ``min_8bit_size``."""
    import bitsandbytes.functional as bnb

    maps = {"1": optimizer.name2qmap["dynamic"], "2": optimizer.name2qmap["udynamic"]}
    for param, state in _sliced_states(optimizer, state_dict):
        world = param.device_mesh.size()
        for n in "12":
            copy, scales = state.pop(f"{FP32_COPY}{n}", None), state.get(f"absmax{n}")
            moment = state.get(f"state{n}")
            if isinstance(moment, torch.Tensor) and not is_dtensor(moment) and moment.dtype == torch.uint8:
                # A whole moment (a checkpoint of one process or of DDP): its fp32 values, sliced.
                whole = bnb.dequantize_blockwise(moment.contiguous(), absmax=scales, blocksize=BLOCK,
                                                 code=state.get(f"qmap{n}", maps[n]))
                copy = sliced_like(whole, param)
                scales = state.pop(f"absmax{n}")
            if isinstance(scales, DTensor) and scales.shape[0] == world:
                continue  # the same slices: the saved blocks, bit for bit
            if copy is None and isinstance(scales, DTensor):  # written before the fp32 copies
                raise lowmem.CheckpointError(
                    f"this checkpoint keeps 8-bit moments per slice of {scales.shape[0]} process(es) "
                    "without fp32 copies: resume it with that many processes")
            values = copy if copy is not None else state.get(f"state{n}")
            if not isinstance(values, DTensor) or values.dtype != torch.float32:
                continue
            local = values.to_local().contiguous()
            state.pop(f"absmax{n}", None)
            if local.numel() == 0 or values.numel() < optimizer.args.min_8bit_size:
                state[f"state{n}"] = values  # a small whole moment stays fp32 (galore_adamw8bit)
                continue
            code = state.setdefault(f"qmap{n}", maps[n])
            quantized, quant_state = bnb.quantize_blockwise(local, code=code, blocksize=BLOCK)
            state[f"state{n}"] = _like(quantized, values)
            state[f"absmax{n}"] = to_dtensor(f"absmax{n}", quant_state.absmax, param,
                                             {f"state{n}": quantized})
    return state_dict


def _sliced_states(optimizer: Any, state_dict: dict[str, Any]) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(parameter, the dict holding its moments) for each sliced parameter with state, in the
    order torch numbers them; bitsandbytes nests the quantised tensors in a dict of their own."""
    nested = getattr(optimizer, "_FSDP_WRAPPED_QUANT_STATE_KEY", None)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, state in state_dict["state"].items():
        if isinstance(state, dict) and is_dtensor(params[index]):
            yield params[index], state.get(nested, state) if nested else state


def _like(local: Any, model: Any) -> Any:
    """``local`` as a DTensor sliced as ``model`` is."""
    return DTensor.from_local(local, model.device_mesh, model.placements, run_check=False,
                              shape=model.shape, stride=model.stride())
