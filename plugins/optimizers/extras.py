"""Helpers shared by the optimizers built on third-party packages (adamw8bit, adafactor, apollo,
apollo-mini, adam-mini, muon, lomo, adalomo). Light: no torch import at module level, so the plugin
modules that import this still register without torch.

- Optional packages: ``installed`` asks importlib where a module would come from without
  importing it, so ``lowmem list-optimizers`` can say "not installed" with the pip command, and
  ``require`` turns a missing package into a ``ConfigError`` naming that command.
- Config checks that name the key and the valid values.
- ``whole_or_per_layer``: one optimizer over the groups, or per_layer.PerLayerOptimizer (one
  optimizer per parameter, stepped from its gradient hook) when the config says ``per_layer``.
- ``model_dims``: hidden size and head counts from a Hugging Face config, under LLaMA, RoBERTa
  or GPT-2 names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.util import find_spec
from typing import Any

import lowmem
from lowmem.rounding import compensated


# -- optional packages -----------------------------------------------------------------------
def installed(module: str) -> bool:
    """Whether ``module`` (a top-level name) can be imported; nothing is imported."""
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def install_hint(extra: str) -> str:
    return f"pip install 'lowmem[{extra}]'"


def with_install_note(description: str, module: str, extra: str) -> str:
    """``description``, plus "(not installed: pip install 'lowmem[extra]')" while ``module`` is missing."""
    if installed(module):
        return description
    return f"{description} (not installed: {install_hint(extra)})"


def require(module: str, extra: str, optimizer: str) -> None:
    """ConfigError naming the pip command when ``module`` is missing."""
    if not installed(module):
        raise lowmem.ConfigError(
            f"optimizer {optimizer!r} needs the {module} package, which is not installed: "
            f"{install_hint(extra)}"
        )


def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch, read from its version.py: neither torch nor
    importlib.metadata (~25 ms) is imported, so `lowmem list-optimizers` stays quick."""
    import re
    from pathlib import Path

    spec = find_spec("torch")
    try:
        text = (Path(spec.origin).parent / "version.py").read_text(encoding="utf-8")  # type: ignore[union-attr, arg-type]
    except (AttributeError, TypeError, OSError):
        return (0, 0)
    found = re.search(r"__version__\s*=\s*['\"](\d+)\.(\d+)", text)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


# -- config checks ---------------------------------------------------------------------------
def check_positive_int(config: Mapping[str, Any], key: str) -> None:
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise lowmem.ConfigError(f"'{key}' must be a positive integer, got {value!r}")


def check_number(config: Mapping[str, Any], key: str, low: float, high: float | None = None,
                 low_inclusive: bool = True) -> None:
    """``low <= value`` (``low < value`` unless ``low_inclusive``) and ``value < high``."""
    value = config[key]
    above = value >= low if low_inclusive else value > low
    if isinstance(value, bool) or not isinstance(value, int | float) or not above or (
            high is not None and value >= high):
        bounds = f"{'>=' if low_inclusive else '>'} {low}" + ("" if high is None else f" and < {high}")
        raise lowmem.ConfigError(f"'{key}' must be a number {bounds}, got {value!r}")


def check_choice(config: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> None:
    if config[key] not in choices:
        raise lowmem.ConfigError(f"'{key}' must be one of {', '.join(choices)}, got {config[key]!r}")


# -- building --------------------------------------------------------------------------------
def check_updates_in_backward(settings: lowmem.OptimizerSettings, what: str) -> None:
    """Refuse what cannot combine with updating each parameter from its gradient hook."""
    if settings.max_grad_norm is not None and settings.max_grad_norm > 0:
        raise lowmem.ConfigError(
            f"{what}: each parameter steps during backward, so clipping by the norm over all "
            f"parameters is impossible (max_grad_norm is {settings.max_grad_norm}); pass --max-grad-norm 0"
        )
    # Several processes: lowmem refuses an optimizer that cannot step after DDP's reduction
    # (PerLayerOptimizer can: step_after_reduction; LOMO's fused backward cannot, and its plugin
    # says so in prepare_model).


def whole_or_per_layer(
    settings: lowmem.OptimizerSettings,
    config: Mapping[str, Any],
    groups: list[dict[str, Any]],
    make_optimizer: Callable[[list[dict[str, Any]]], Any],
    on_inner_change: Callable[[list[Any]], None] | None = None,
) -> Any:
    """``make_optimizer(groups)``, or one optimizer per parameter stepped from its gradient hook
    when ``config["per_layer"]`` (honouring ``settings.grad_accum``)."""
    if not config["per_layer"]:
        return compensated(make_optimizer(groups), settings.bf16_rounding)
    check_updates_in_backward(settings, "'per_layer'")
    from lowmem.plugins.optimizers.per_layer import PerLayerOptimizer

    return PerLayerOptimizer(groups, make_optimizer, settings.grad_accum, on_inner_change=on_inner_change,
                             rounding=settings.bf16_rounding)


def restore_state_dtypes(optimizer: Any, state_dict: Mapping[str, Any]) -> None:
    """After torch's ``Optimizer.load_state_dict``, put back every saved state tensor whose dtype
    torch changed. torch casts floating-point state to its parameter's dtype on load, which
    rounds an optimizer's fp32 statistics of a bf16 weight (bf16-pure) to bf16: the resumed run
    would then differ from the uninterrupted one."""
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, p in zip(saved_ids, params, strict=True):
        for key, value in state_dict["state"].get(index, {}).items():
            live = optimizer.state[p].get(key)
            if hasattr(value, "dtype") and hasattr(live, "dtype") and live.dtype != value.dtype:
                optimizer.state[p][key] = value.to(device=p.device, copy=True)


def model_dims(model: Any) -> tuple[int, int, int]:
    """(hidden size, attention heads, key/value heads) from the model's Hugging Face config, under
    LLaMA / RoBERTa names (hidden_size, num_attention_heads, num_key_value_heads) or GPT-2's
    (n_embd, n_head); key/value heads default to the attention heads."""
    config = getattr(model, "config", None)

    def first(*names: str) -> Any:
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    dim = first("hidden_size", "n_embd", "d_model")
    heads = first("num_attention_heads", "n_head", "num_heads")
    if dim is None or heads is None:
        raise lowmem.ConfigError(
            "the model's config names no hidden size and head count (hidden_size / num_attention_heads, "
            "or GPT-2's n_embd / n_head), which this optimizer partitions the weights by"
        )
    kv_heads = first("num_key_value_heads", "n_kv_heads") or heads
    return dim, heads, kv_heads
