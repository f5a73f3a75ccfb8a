"""Which trainable parameters weight decay applies to. Light: no torch import at module level.

As in Hugging Face Trainer (``get_decay_parameter_names``), biases and the weights of
normalisation layers are not decayed by default: decay would pull a LayerNorm / RMSNorm gain
towards 0 and a bias towards 0, neither of which is a sensible prior. Everything else
(linear weights, embeddings, LoRA factors, heads) is. ``decay_norms_and_biases`` (lowmem's
``OptimizerSettings`` field) decays every trainable parameter instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def is_norm_module(module: Any) -> bool:
    """nn.LayerNorm (and subclasses) and any module whose class name contains "Norm"
    (LlamaRMSNorm, GroupNorm, ...)."""
    return any("Norm" in cls.__name__ for cls in type(module).__mro__)


def norm_parameter_ids(model: Any) -> set[int]:
    """ids of the parameters held directly by normalisation modules of ``model`` (peft's wrapped
    copies included: they are modules of the model too)."""
    return {
        id(p)
        for module in model.modules()
        if is_norm_module(module)
        for p in module.parameters(recurse=False)
    }


def split_decay(
    model: Any, named_parameters: Iterable[tuple[str, Any]], decay_all: bool = False
) -> tuple[list[Any], list[Any]]:
    """(decayed, not decayed) parameters of the ``(name, parameter)`` pairs, each in the given
    order. Not decayed: names ending in ``bias`` and parameters of normalisation modules,
    unless ``decay_all``. Names may carry any prefix (peft's ``base_model.model.``)."""
    pairs = list(named_parameters)
    if decay_all:
        return [p for _, p in pairs], []
    norms = norm_parameter_ids(model)
    decayed: list[Any] = []
    not_decayed: list[Any] = []
    for name, p in pairs:
        (not_decayed if name.endswith("bias") or id(p) in norms else decayed).append(p)
    return decayed, not_decayed


def decay_groups(
    model: Any, named_parameters: Iterable[tuple[str, Any]], weight_decay: float, decay_all: bool = False
) -> list[dict[str, Any]]:
    """Parameter groups: the decayed parameters with ``weight_decay``, then the others with 0.0;
    an empty group is left out. Only ``params`` and ``weight_decay`` keys, which every
    optimizer understands (lr, eps and betas come from the optimizer's defaults)."""
    decayed, not_decayed = split_decay(model, named_parameters, decay_all)
    groups = []
    if decayed:
        groups.append({"params": decayed, "weight_decay": weight_decay})
    if not_decayed:
        groups.append({"params": not_decayed, "weight_decay": 0.0})
    return groups


def trainable_named_parameters(model: Any) -> list[tuple[str, Any]]:
    """``(name, parameter)`` of the trainable parameters; a tied weight (GPT-2's wte / lm_head)
    appears once, under its first name."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]
