"""Memory levers besides the optimizer, switched on by the config: activation checkpointing
(recompute each transformer block in backward) and ``torch.compile``."""

from __future__ import annotations

from typing import Any

from lowmem.errors import ConfigError


def enable_checkpointing(model: Any) -> None:
    """The model's own gradient checkpointing, non-reentrant: it recomputes each block in
    backward with the RNG state of the forward, so losses are bitwise those of a run without it,
    and it needs no inputs that require grad (LoRA's frozen embeddings are fine)."""
    check_checkpointing(model)
    settings = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):  # transformers 5's name; the old one warns that it goes in v6
        enable(activation_checkpointing_kwargs=settings)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)


def check_checkpointing(model: Any) -> None:
    """Refuses a model without gradient checkpointing (a run, and an estimate of one)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        name = type(model).__name__
        raise ConfigError(f"--activation-checkpointing: {name} does not support gradient checkpointing")


def lean_loss_head(model: Any, objective: str, say: Any) -> tuple[Any, str, Any] | None:
    """Where the lean loss takes over (``lowmem.lean_loss``), or None with a note where it cannot."""
    from lowmem.api import CAUSAL_LM
    from lowmem.lean_loss import liger_available, output_head

    found = output_head(model) if objective == CAUSAL_LM else None
    if found is None:
        say("note: --lean-loss applies to causal LMs with a plain linear output layer and no added loss "
            "(such as a mixture of experts' router loss); using the usual loss")
    elif next(model.parameters()).is_cuda and liger_available():
        say("note: --lean-loss uses Liger's fused linear cross-entropy (liger-kernel)")
    return found


def compile_model(model: Any, device: Any) -> Any:
    """``torch.compile`` with inductor; refused clearly where this torch cannot compile."""
    import torch

    if not hasattr(torch, "compile"):
        raise ConfigError("--compile needs torch.compile (torch >= 2.0)")
    try:
        from torch._inductor import config as _inductor_config  # noqa: F401 - is inductor there?
    except ImportError as exc:
        raise ConfigError(f"--compile: this torch has no inductor backend ({exc})") from None
    if device.type == "cpu" and not _cpu_compiler_available():
        raise ConfigError("--compile on CPU needs a C++ compiler (inductor generates C++); install g++ "
                          "or drop --compile")
    _trial_compile(device)
    return torch.compile(model)


def _trial_compile(device: Any) -> None:
    """Compile and run a two-operation function first: a compiler inductor cannot use (its
    configured CXX, a missing Triton on CUDA, a Python torch.compile does not support) is bad
    input, found in a second or two, and not a traceback at the model's first step."""
    import torch

    from lowmem.text import first_line

    def scale_and_shift(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    try:
        result = torch.compile(scale_and_shift, fullgraph=True)(torch.ones(4, device=device))
        if not bool((result == 3).all()):
            raise RuntimeError("the compiled test function computed a wrong result")
    except Exception as exc:  # noqa: BLE001 - inductor's failures have many types
        raise ConfigError(f"--compile: inductor cannot compile on {device.type} here: {first_line(exc)}; "
                          "drop --compile") from None


def _cpu_compiler_available() -> bool:
    import shutil

    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))
