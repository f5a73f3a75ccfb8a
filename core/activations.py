"""The activation part of ``lowmem estimate``: bytes of the tensors autograd keeps from the
forward for the backward, per architecture, with or without checkpointing and the lean loss."""

from __future__ import annotations

import math
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
FALLBACK_FAMILY = "gpt2"  # the largest coefficients: unknown architectures are not underestimated
ACTIVATION_FORMULA = (
    "activations per layer and token (16-bit autocast): LLaMA 34h + 8i + 4a + 8 bytes; "
    "GPT-2 70h + 12as + 16; RoBERTa 34h + 4i + 12as + 16 (h hidden, i intermediate, a heads, "
    "s length; counted from the tensors autograd saves); x2 without autocast (fp32); plus the "
    "loss: fp32 logits, their log-softmax and gradient, 12 bytes per token and vocabulary entry"
)


def activation_bytes(config: Any, batch_size: int, max_length: int, dtype: str, objective: str,
                     checkpointing: bool = False, lean_loss: bool = False) -> int:
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
    """
    if config is None:
        return 0
    family = getattr(config, "model_type", "") or ""
    c_h, c_i, c_a, constant = ACTIVATION_COEFFICIENTS.get(family, ACTIVATION_COEFFICIENTS[FALLBACK_FAMILY])
    hidden = _config_value(config, "hidden_size", "n_embd")
    layers = _config_value(config, "num_hidden_layers", "n_layer")
    heads = _config_value(config, "num_attention_heads", "n_head")
    intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                    or 4 * hidden)
    per_token_layer = c_h * hidden + c_i * intermediate + c_a * heads * max_length + constant
    if family == "llama":
        per_token_layer += 4 * heads
    tokens = batch_size * max_length
    scale = 2 if dtype == "fp32" else 1
    if checkpointing:
        residual = 2 if dtype == PURE_BF16 else 4
        body = layers * tokens * hidden * residual + scale * tokens * per_token_layer + tokens * 11 * hidden
    else:
        body = scale * layers * tokens * per_token_layer + tokens * 11 * hidden
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
