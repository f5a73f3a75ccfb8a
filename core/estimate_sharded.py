"""``lowmem estimate --nproc N --parallel fsdp``: the memory of one of N FSDP processes.

What FSDP changes in the breakdown (``lowmem.sharding`` shards every parameter over the N
processes, each transformer block a unit, the rest of the model the root unit):

* weights, gradients: each process holds 1/N (its slices; rounded up).
* optimizer states: 1/N, except what every process holds whole: the plugin's
  ``replicated_state_bytes`` (GaLore's projection matrices, 8-bit quantisation maps).
* gathered weights, in place of autocast's copies: a unit's weights are gathered whole, in
  the compute format, for its forward and backward. The root unit's stay gathered from its
  forward to its backward; a block's are freed after use, with the next block's prefetched.
  So: the root unit plus two of the largest block.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lowmem.precision import DTYPE_BYTES


def per_process(breakdown: Any, model: Any, optimizer_plugin: Any, settings: Any, world_size: int) -> Any:
    """``breakdown`` (for one process holding everything) as one of ``world_size`` FSDP processes."""
    from lowmem.estimate_overhead import overhead_bytes

    # (An optimizer that does not shard was refused by lowmem.estimate.)
    optimizer_plugin.shard_dims(model, settings)  # refuses what a run would (a split that cannot be even)

    def split(value: int) -> int:
        return -(-value // world_size)

    replicated = min(int(optimizer_plugin.replicated_state_bytes(model, settings) or 0),
                     breakdown.optimizer_states)
    states = replicated + split(breakdown.optimizer_states - replicated)
    gathered = gathered_weight_bytes(model, breakdown.settings["dtype"])
    weights, gradients = split(breakdown.weights), split(breakdown.gradients)
    subtotal = weights + gradients + states + gathered + breakdown.activations
    notes = [*breakdown.notes, f"per process of {world_size} (FSDP): weights, gradients and optimizer states "
             "sliced; 'autocast weight copies' are the weights gathered for compute (root unit and two "
             "blocks)"]
    if replicated:
        notes.append(f"optimizer states: {replicated:,} bytes held whole by every process")
    return dataclasses.replace(
        breakdown, weights=weights, gradients=gradients, optimizer_states=states, weight_copies=gathered,
        overhead=overhead_bytes(subtotal, breakdown.settings["device"]), notes=notes,
        settings={**breakdown.settings, "parallel": "fsdp", "world_size": world_size})


def gathered_weight_bytes(model: Any, dtype: str) -> int:
    """The root unit's weights plus twice the largest block's, in the compute format."""
    from lowmem.sharding import transformer_blocks

    def size(params: list[Any]) -> int:
        return sum(p.numel() * DTYPE_BYTES.get(dtype, p.element_size()) for p in params)

    blocks = transformer_blocks(model)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    root = size([p for p in model.parameters() if id(p) not in in_blocks])
    largest = max((size(list(block.parameters())) for block in blocks), default=0)
    return root + 2 * largest
