"""Number formats of a run, in one place for training and ``lowmem estimate``.

* ``fp32``: fp32 weights, fp32 compute.
* ``bf16`` / ``fp16``: fp32 master weights, 16-bit compute under ``torch.autocast``; fp16 also
  scales the loss (``torch.amp.GradScaler``) so small gradients do not flush to zero.
* ``bf16-pure``: the weights themselves (so gradients and optimizer moments too) are bf16, no
  fp32 copy and no autocast: half the weight memory, as in the GaLore paper's 7B set-up.
* ``auto``: bf16 on GPUs that have it (else fp16), bf16 on CPUs with AVX512-BF16/AMX, else fp32.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from lowmem.errors import ConfigError

PURE_BF16 = "bf16-pure"
# Bytes per element of weights and of autocast's copies, per resolved dtype.
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, PURE_BF16: 2}


def choose_dtype(dtype: str, device: Any) -> str:
    """``auto`` picks what runs well on the device; an explicit choice the device cannot do is an error."""
    import torch

    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if dtype == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_bf16 else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if dtype in ("bf16", PURE_BF16) and device.type == "cuda" and not cuda_bf16:
        raise ConfigError("--dtype bf16 is not supported by this GPU; use --dtype fp16 or fp32")
    return dtype


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls are fast on CPUs with AVX512-BF16 or AMX; elsewhere (AVX2 only) autocast to
    bf16 runs several times slower than fp32."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cast_weights(model: Any, dtype: str) -> Any:
    """``bf16-pure`` stores the weights in bf16; every other choice keeps fp32 weights."""
    import torch

    return model.to(torch.bfloat16) if dtype == PURE_BF16 else model


def autocast(dtype: str, device: Any) -> Any:
    """The forward pass's context: autocast for bf16/fp16, nothing where the weights already
    are in the compute format."""
    import torch

    if dtype in ("fp32", PURE_BF16):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def loss_scaler(dtype: str, device: Any) -> Any:
    """fp16 scales the loss before backward and unscales the gradients before the update;
    the scaler is a no-op for every other format."""
    import torch

    return torch.amp.GradScaler(device.type, enabled=dtype == "fp16")


def uses_autocast(dtype: str) -> bool:
    """Whether the forward makes 16-bit copies of the fp32 weights (``lowmem estimate``)."""
    return dtype not in ("fp32", PURE_BF16)


def weight_bytes_per_element(dtype: str) -> int:
    return 2 if dtype == PURE_BF16 else 4
