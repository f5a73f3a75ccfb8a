"""A causal-LM loss that never holds the whole batch's logits: the output head's matmul, the
log-softmax and their gradient are computed a chunk of tokens at a time, in forward and again
in backward, so the fp32 logits (12 bytes per token and vocabulary entry with their
log-softmax and gradient) shrink to one chunk's.

The model runs its own forward with the output head swapped for the identity for that call,
so DDP, LoRA and checkpointing see their usual forward; the loss then takes the hidden states
and the head's weight. It equals transformers' loss (mean over target tokens, labels shifted
by one) to float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

IGNORE_INDEX = -100
CHUNK_TOKENS = 1024
# Config attributes of models whose logits are more than hidden @ W^T (+ b): not for this loss.
TRANSFORMED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
# Config switches of models whose loss adds a term to the cross-entropy (a mixture of experts'
# router balancing loss): computing only the cross-entropy would silently drop it.
ADDED_LOSSES = ("output_router_logits",)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over targets of cross_entropy(hidden @ weight^T + bias, labels), chunk by chunk."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, chunk: int) -> torch.Tensor:
        valid = labels != IGNORE_INDEX
        count = valid.sum()  # none: 0/0, NaN, as the plain mean over no targets
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            logits = _logits(hidden[start:end], weight, bias)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, labels[start:end].clamp(min=0).unsqueeze(1)).squeeze(1)
            total += ((lse[start:end] - target) * valid[start:end]).sum()
        saved_bias = bias if bias is not None else torch.empty(0)
        ctx.save_for_backward(hidden, weight, saved_bias, labels, lse, count)
        ctx.has_bias, ctx.chunk = bias is not None, chunk
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        hidden, weight, bias, labels, lse, count = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = None
        if ctx.has_bias:
            grad_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
        scale = grad_output / count
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, hidden.shape[0])
            h = hidden[start:end]
            # d loss / d logits = softmax - one_hot(label), on target rows only, times the scale.
            probs = (_logits(h, weight, bias) - lse[start:end, None]).exp()
            valid = labels[start:end] != IGNORE_INDEX
            rows = valid.nonzero().squeeze(1)
            probs[rows, labels[start:end][rows]] -= 1
            probs *= (valid * scale).unsqueeze(1)
            grad_hidden[start:end] = (probs @ weight.float()).to(hidden.dtype)
            grad_weight += probs.t() @ h.float()
            if grad_bias is not None:
                grad_bias += probs.sum(0)
        grad_bias_out = None if grad_bias is None else grad_bias.to(weight.dtype)
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias_out, None, None


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden.float() @ weight.float().t()
    return logits if bias is None else logits + bias.float()


def chunked_causal_lm_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                           chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """transformers' causal-LM loss (position t predicts label t+1) from the last hidden states."""
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    flat = hidden.reshape(-1, hidden.shape[-1])
    return ChunkedLinearCrossEntropy.apply(flat, head.weight, getattr(head, "bias", None),
                                           shifted.reshape(-1), chunk)


def causal_lm_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The lean loss: Liger's fused linear cross-entropy (Triton, same chunking idea, fused
    kernels) on CUDA when ``liger-kernel`` is installed (``pip install 'lowmem[liger]'``),
    lowmem's chunked autograd function elsewhere. Both equal transformers' loss."""
    if hidden.is_cuda and liger_available():
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
        flat = hidden.reshape(-1, hidden.shape[-1])
        bias = getattr(head, "bias", None)
        # One dtype for the kernel: under autocast the hidden states are 16-bit, the head fp32.
        return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)(
            head.weight.to(flat.dtype), flat, shifted, None if bias is None else bias.to(flat.dtype))
    return chunked_causal_lm_loss(hidden, head, labels)


def liger_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def output_head(model: Any) -> tuple[Any, str, Any] | None:
    """(parent module, attribute name, head) of a model's output layer when the lean loss can
    replace it: a plain linear head whose logits nothing transforms; None otherwise."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Linear):
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) for name in TRANSFORMED_LOGITS + ADDED_LOSSES):
        return None
    for module in model.modules():
        for attribute, child in module.named_children():
            if child is head:
                return module, attribute, head
    return None


@contextlib.contextmanager
def hidden_states_out(parent: Any, attribute: str) -> Iterator[None]:
    """For one forward: the model's output head is the identity, so its "logits" are the hidden
    states; the head's parameters stay where they are."""
    head = getattr(parent, attribute)
    setattr(parent, attribute, torch.nn.Identity())
    try:
        yield
    finally:
        setattr(parent, attribute, head)
