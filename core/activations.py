"""The activation part of ``lowmem estimate``: bytes of the tensors autograd keeps from the
forward for the backward, per architecture, with or without checkpointing and the lean loss."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lowmem.api import CLASSIFICATION
from lowmem.errors import ConfigError
from lowmem.precision import PURE_BF16

LEAN_CHUNK_TOKENS = 1024  # lowmem.lean_loss.CHUNK_TOKENS (not imported: that module imports torch)
# Bytes per token per layer that autograd saves at 16-bit autocast, as
# (per hidden unit, per intermediate unit, per head and attended position, constant).
# Calibrated by counting the tensors transformers 5 (sdpa attention) hands to
# torch.autograd.graph.saved_tensors_hooks: LLaMA's sdpa path keeps q, k, v and the output in
# 16 bits and a fp32 log-sum-exp per head, so no seq x seq term; GPT-2 and RoBERTa take the
# math path and keep three fp32 seq x seq score tensors per head.
ACTIVATION_COEFFICIENTS: dict[str, tuple[float, float, float, float]] = {
    "llama": (34, 8, 0, 8),  # + 4 bytes per head (fp32 log-sum-exp), added below
    "gpt2": (54, 4, 12, 16),  # GPT-2's MLP is 4h wide: 54h + 4*(4h) = 70h measured
    "roberta": (34, 4, 12, 16),
}
# With every weight of the blocks frozen (LoRA) a matmul keeps its weight for the input's gradient
# but no longer its input: bytes per token per layer saved, as (per hidden unit, per intermediate
# unit), counted the same way as ACTIVATION_COEFFICIENTS.
FROZEN_BODY_SAVINGS: dict[str, tuple[float, float]] = {"llama": (18, 2), "gpt2": (14, 0), "roberta": (10, 2)}
FALLBACK_FAMILY = "gpt2"  # the largest coefficients: unknown architectures are not underestimated
# Architectures whose blocks save exactly LLaMA's tensors (counted the same way at equal sizes).
SAME_ACTIVATIONS_AS = {"mistral": "llama", "qwen2": "llama"}


def activation_family(config: Any) -> str | None:
    """The family whose coefficients apply to ``config``'s architecture; None: none measured
    (``FALLBACK_FAMILY``'s are used)."""
    family = getattr(config, "model_type", "") or ""
    family = SAME_ACTIVATIONS_AS.get(family, family)
    return family if family in ACTIVATION_COEFFICIENTS else None
ACTIVATION_FORMULA = (
    "activations per layer and token (16-bit autocast): LLaMA 34h + 8i + 4a + 8 bytes; "
    "GPT-2 70h + 12as + 16; RoBERTa 34h + 4i + 12as + 16 (h hidden, i intermediate, a heads, "
    "s length; counted from the tensors autograd saves); x2 without autocast (fp32); plus the "
    "loss: fp32 logits, their log-softmax and gradient, 12 bytes per token and vocabulary entry; "
    "LoRA: less for the frozen blocks, plus per adapted layer its dropout mask and the input and "
    "r-wide output of its down-projection (on CPU also a copy of its input that the heap keeps)"
)


@dataclass(frozen=True)
class Adapters:
    """What low-rank adapters change in the activations: whether every weight of the blocks is
    frozen, and per adapted layer (input width, rank, has dropout)."""

    body_frozen: bool = False
    layers: tuple[tuple[int, int, bool], ...] = ()


NO_ADAPTERS = Adapters()


def find_adapters(model: Any) -> Adapters:
    """The peft LoRA layers of ``model`` and whether the weights of its blocks are all frozen
    (the output head and peft's fully trained ``modules_to_save`` do not count)."""
    import sys

    if "peft" not in sys.modules:  # nothing built adapters (importing peft would load bitsandbytes)
        return NO_ADAPTERS
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    layers: list[tuple[int, int, bool]] = []
    adapter_weights: set[int] = set()
    head_weights: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, down in module.lora_A.items():
                dropout: Any = module.lora_dropout[name]
                shape: Any = down.weight.shape  # (rank, input width)
                layers.append((int(shape[1]), int(shape[0]), getattr(dropout, "p", 0) > 0))
            adapter_weights |= {id(p) for part in (module.lora_A, module.lora_B) for p in part.parameters()}
        elif isinstance(module, ModulesToSaveWrapper):
            head_weights |= {id(p) for p in module.parameters()}
    if not layers:
        return NO_ADAPTERS
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weights |= {id(p) for p in output.parameters()} if output is not None else set()
    body = [module.weight for module in model.modules()
            if (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D")
            and isinstance(getattr(module, "weight", None), torch.Tensor)]
    frozen = not any(w.requires_grad for w in body if id(w) not in adapter_weights | head_weights)
    return Adapters(frozen, tuple(layers))


def cpu_adapter_retention(in_features: int, dtype: str) -> int:
    """Bytes per token that glibc's heap keeps on CPU after an adapted layer's forward: about one
    copy of its input at the adapter's dtype (the cast for the adapter and the dropout result are
    short-lived buffers of a few MiB, which glibc serves from its heap and does not hand back).
    Measured on llama_60m at 8 x 512: 3.5 bytes per input unit with fp32 adapters, 2.0 with
    bf16-pure, the same with activation checkpointing; CUDA's ``max_memory_allocated`` counts
    live tensors only, so there it is 0."""
    return (2 if dtype == PURE_BF16 else 4) * in_features


def adapter_layer_bytes(in_features: int, rank: int, dropout: bool, dtype: str, device: str) -> int:
    """Bytes per token one adapted layer keeps: the input of its down-projection (at the compute
    width) and its r-wide output, and with dropout the mask: a bool on CUDA (fused dropout), on
    CPU a float tensor of the adapter's dtype (fp32 unless bf16-pure)."""
    width = 4 if dtype == "fp32" else 2
    mask = 0
    if dropout:
        mask = 1 if device == "cuda" else (2 if dtype == PURE_BF16 else 4)
    return (mask + width) * in_features + width * rank


def activation_bytes(config: Any, batch_size: int, max_length: int, dtype: str, objective: str,
                     checkpointing: bool = False, lean_loss: bool = False,
                     adapters: Adapters = NO_ADAPTERS, device: str = "cuda") -> int:
    """Bytes of the tensors autograd keeps from the forward for the backward, at their peak.

    Per layer and token (16-bit autocast), from ``ACTIVATION_COEFFICIENTS``:
    ``c_h*h + c_i*i + c_a*a*s + c`` (+ 4a for LLaMA's fp32 log-sum-exp), where h is the hidden
    size, i the MLP width, a the heads and s the sequence length. Without autocast (fp32) the
    16-bit tensors are fp32: twice the bytes. Plus the embeddings and the loss: about 11h per
    token, and for a language model the fp32 logits, their log-softmax and gradient (12 bytes
    per token and vocabulary entry; a classifier's logits are negligible).

    With activation checkpointing each block keeps only its input (the residual stream: 4 bytes
    per hidden unit, 2 in pure bf16) and one block's activations exist again while it is
    recomputed. The lean loss holds one chunk's logits (``lean_loss.CHUNK_TOKENS`` tokens) and
    a float per token instead of the whole batch's.

    ``adapters`` (``find_adapters``): frozen blocks keep ``FROZEN_BODY_SAVINGS`` less, and each
    adapted layer adds ``adapter_layer_bytes`` (one layer's worth under checkpointing) and, on
    CPU, ``cpu_adapter_retention``.
    """
    if config is None:
        return 0
    known = activation_family(config)
    family = known or FALLBACK_FAMILY
    c_h, c_i, c_a, constant = ACTIVATION_COEFFICIENTS[family]
    hidden = _config_value(config, "hidden_size", "n_embd")
    layers = _config_value(config, "num_hidden_layers", "n_layer")
    heads = _config_value(config, "num_attention_heads", "n_head")
    intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                    or 4 * hidden)
    per_token_layer = c_h * hidden + c_i * intermediate + c_a * heads * max_length + constant
    if family == "llama":
        per_token_layer += 4 * heads
    if adapters.body_frozen:
        s_h, s_i = FROZEN_BODY_SAVINGS[family] if known else (0, 0)  # unknown: no saving assumed
        per_token_layer -= s_h * hidden + s_i * intermediate
    adapted = sum(adapter_layer_bytes(*layer, dtype, device) for layer in adapters.layers)
    retained = 0
    if device == "cpu":
        retained = sum(cpu_adapter_retention(layer[0], dtype) for layer in adapters.layers)
    tokens = batch_size * max_length
    scale = 2 if dtype == "fp32" else 1
    if checkpointing:
        residual = 2 if dtype == PURE_BF16 else 4
        body = (layers * tokens * hidden * residual + scale * tokens * per_token_layer + tokens * 11 * hidden
                + tokens * adapted / max(layers, 1) + tokens * retained)
    else:
        body = (scale * layers * tokens * per_token_layer + tokens * 11 * hidden
                + tokens * (adapted + retained))
    vocab = getattr(config, "vocab_size", 0) or 0
    loss = 12 * tokens * vocab if objective != CLASSIFICATION else 0
    if lean_loss and objective != CLASSIFICATION:
        loss = 12 * min(tokens, LEAN_CHUNK_TOKENS) * vocab + 4 * tokens
    return int(math.ceil(body + loss))


def _config_value(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"model config has none of {', '.join(names)}: cannot estimate activations")
