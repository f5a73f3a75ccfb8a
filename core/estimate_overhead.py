"""What ``lowmem estimate`` adds to the tensors it counts: the framework overhead of a run, as a
share of those tensors, plus on CPU a fixed term for what the process loads."""

from __future__ import annotations

# What training holds beyond the counted tensors, as a share of them: the allocator's slack and
# backward's temporaries. On CUDA an allowance; on CPU set together with CPU_RUNTIME_BYTES from
# bench/peaks.md's measured peaks (58 settings, two runs each: all within 0.91-1.08).
FRAMEWORK_OVERHEAD = {"cuda": 0.10, "cpu": 0.05}
# On CPU the peak is the process's resident set, which also keeps what a run loads before its
# first step and does not free: the libraries it imports on demand (datasets and pyarrow, the
# model's transformers module, bitsandbytes), the tokenizer, the tokenized data and the first
# batches. llama_60m's run holds 180-220 MiB of it above a bare `import lowmem` (55-104 MiB
# above an idle that has the model's code imported: bench/peaks.md's "loaded" column), whatever
# the model's size: a fixed term, not a share. CUDA's max_memory_allocated holds none of it.
CPU_RUNTIME_BYTES = 128 * 2**20


def overhead_share(device: str) -> float:
    """The share of the counted bytes on ``device`` ("cuda" or "cpu"; anything else as CUDA)."""
    return FRAMEWORK_OVERHEAD.get(device, FRAMEWORK_OVERHEAD["cuda"])


def overhead_bytes(subtotal: int, device: str) -> int:
    """The framework overhead on ``subtotal`` counted bytes on ``device``."""
    return int(overhead_share(device) * subtotal) + (CPU_RUNTIME_BYTES if device == "cpu" else 0)


def overhead_note(device: str) -> str:
    """The footnote that says how ``overhead_bytes`` counts on ``device``."""
    loaded = (f" plus {CPU_RUNTIME_BYTES // 2**20} MiB that a CPU run's process loads (libraries, tokenizer, "
              "data)" if device == "cpu" else "")
    return (f"framework overhead: {overhead_share(device):.0%} of the rest (allocator slack, backward "
            f"temporaries){loaded}")
