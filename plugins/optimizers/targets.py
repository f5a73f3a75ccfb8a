"""Which weights LoRA adapts and GaLore projects. Light: no torch import at module level."""

from __future__ import annotations

from typing import Any

import lowmem


def backbone(model: Any) -> Any:
    """The transformer body of a Hugging Face model (``model.base_model``), without its heads.

    Heads (lm head, classifier) are trained in full, never projected or adapted: RoBERTa's
    classifier and MLM head contain modules named ``dense``, the same last name as the
    encoder's MLP layers.
    """
    body = getattr(model, "base_model", None)
    return model if body is None else body


def named(qualified: str, names: tuple[str, ...]) -> bool:
    """Whether a module's qualified name is one of ``names`` or ends with ``.<name>`` (peft's rule)."""
    return any(qualified == name or qualified.endswith("." + name) for name in names)


def target_modules(model: Any, names: tuple[str, ...] | list[str]) -> list[tuple[str, Any]]:
    """``(qualified name, module)`` for modules of the backbone named by ``names`` (a name
    matches a qualified name or its ending: ``q_proj``, ``self_attn.q_proj``) and that hold a
    2-D weight: ``nn.Linear`` and GPT-2's ``Conv1D`` (whose weight is (in, out)); embeddings are
    never targets."""
    wanted = tuple(names)
    body_ids = {id(m) for m in backbone(model).modules()}
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (
            named(name, wanted)
            and id(module) in body_ids
            and weight is not None
            and weight.dim() == 2
            and not hasattr(module, "embedding_dim")
        ):
            found.append((name, module))
    return found


def head_modules(model: Any, names: tuple[str, ...] | list[str]) -> list[str]:
    """Qualified names of modules called like a target but outside the backbone (heads)."""
    inside = {name for name, _ in target_modules(model, names)}
    return [
        name
        for name, module in model.named_modules()
        if named(name, tuple(names))
        and name not in inside
        and getattr(module, "weight", None) is not None
    ]


def target_weights(model: Any, names: tuple[str, ...] | list[str]) -> list[tuple[str, Any]]:
    """``(name, weight)`` of the trainable target weights GaLore projects; ConfigError if none."""
    found = [
        (f"{name}.weight", m.weight) for name, m in target_modules(model, names) if m.weight.requires_grad
    ]
    if not found:
        raise lowmem.ConfigError(
            f"no trainable 2-D weights found in modules named {', '.join(names) or '(none)'}; "
            "the model plugin's target_modules do not match this model"
        )
    return found
