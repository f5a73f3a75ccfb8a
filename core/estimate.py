"""``lowmem estimate``: the memory a training run will need, worked out without training.

The model is built on torch's ``meta`` device (shapes, no storage), so even llama_7b is
estimated in seconds on any machine. The optimizer plugin prepares the model exactly as in a
run (LoRA adds its adapters) and reports its own state size through ``state_bytes``.

What lowmem's training loop holds, and so what is counted here:

* weights: fp32 master weights (autocast computes in 16 bits, the parameters stay fp32): 4
  bytes per parameter, frozen ones included; with ``--dtype bf16-pure`` the weights, their
  gradients and the optimizer's moments are bf16 and there is no autocast copy.
* gradients: one fp32 gradient per trainable parameter; in per-layer mode each parameter is
  stepped and its gradient freed inside backward, so only the largest single one is counted.
* optimizer states: the plugin's ``state_bytes`` (projection matrices included), else a
  generic AdamW-like guess of two fp32 moments per trainable parameter.
* autocast weight copies: under bf16/fp16 autocast every matmul weight is cast to 16 bits and
  the copy is saved for backward, so all of them are alive when backward starts.
* activations: see ``activation_bytes``.
* framework overhead: ``FRAMEWORK_OVERHEAD`` of everything above (allocator slack, the
  activation gradients and temporaries of backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lowmem.api import CLASSIFICATION, Model, ModelRequest, Optimizer, OptimizerSettings
from lowmem.errors import ConfigError
from lowmem.modeling import choose_targets
from lowmem.precision import DTYPE_BYTES, cast_weights, uses_autocast, weight_bytes_per_element

GENERIC_GUESS = "generic AdamW-like guess"
FRAMEWORK_OVERHEAD = 0.10
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


@dataclass
class Breakdown:
    """Bytes per category for one model and optimizer; ``rows()`` gives them in display order."""

    model: str
    optimizer: str
    total_params: int
    trainable_params: int
    weights: int
    gradients: int
    optimizer_states: int
    weight_copies: int
    activations: int
    overhead: int
    state_source: str  # "plugin" or GENERIC_GUESS
    per_layer: bool
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def weight_dtype(self) -> str:
        return "bf16" if weight_bytes_per_element(self.settings.get("dtype", "fp32")) == 2 else "fp32"

    @property
    def total(self) -> int:
        return (
            self.weights + self.gradients + self.optimizer_states + self.weight_copies
            + self.activations + self.overhead
        )

    def rows(self) -> list[tuple[str, int]]:
        return [
            (f"weights ({self.weight_dtype})", self.weights),
            (f"gradients ({self.weight_dtype})", self.gradients),
            ("optimizer states", self.optimizer_states),
            ("autocast weight copies", self.weight_copies),
            ("activations", self.activations),
            ("framework overhead", self.overhead),
            ("total", self.total),
        ]

    def fits(self, device_bytes: int | None) -> bool | None:
        return None if device_bytes is None else self.total <= device_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "optimizer": self.optimizer, "total_params": self.total_params,
            "trainable_params": self.trainable_params, "weights": self.weights, "gradients": self.gradients,
            "optimizer_states": self.optimizer_states, "weight_copies": self.weight_copies,
            "activations": self.activations, "overhead": self.overhead, "total": self.total,
            "state_source": self.state_source,
            "per_layer": self.per_layer, "settings": self.settings, "notes": self.notes,
        }


def estimate(
    model_plugin: Model,
    optimizer_plugin: Optimizer,
    *,
    mode: str,
    objective: str,
    batch_size: int,
    max_length: int,
    dtype: str,
    optimizer_config: dict[str, Any] | None,
    per_layer: bool,
    grad_accum: int = 1,
) -> Breakdown:
    """The memory breakdown of training ``model_plugin`` with ``optimizer_plugin``.

    ``optimizer_config`` overrides the plugin's ``default_config``; ``per_layer`` sets its
    ``per_layer`` key (a ConfigError when the optimizer has none).
    """
    import torch

    config = {**optimizer_plugin.default_config, **(optimizer_config or {})}
    if per_layer:
        if "per_layer" not in optimizer_plugin.default_config:
            raise ConfigError(f"optimizer {optimizer_plugin.name!r} has no per-layer mode")
        config["per_layer"] = True
    optimizer_plugin.check_config(config)
    per_layer = bool(config.get("per_layer", False))
    model = model_plugin.build(ModelRequest(
        objective=objective, vocab_size=model_plugin.vocab_size,
        num_labels=2 if objective == CLASSIFICATION else 0, device="meta",
    ))
    settings = OptimizerSettings(
        lr=1e-3, config=config, target_modules=choose_targets(model, "", model_plugin), objective=objective,
        grad_accum=grad_accum, max_grad_norm=0.0,
    )
    model = optimizer_plugin.prepare_model(cast_weights(model, dtype), settings)

    parameters = list(model.parameters())  # a tied weight appears once
    trainable = [p for p in parameters if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in parameters)
    gradient_sizes = [p.numel() * p.element_size() for p in trainable]
    gradients = max(gradient_sizes, default=0) if per_layer else sum(gradient_sizes)
    state = optimizer_plugin.state_bytes(model, settings)
    notes = []
    state_source = "plugin"
    if state is None:
        state_source = GENERIC_GUESS
        state = sum(2 * p.numel() * 4 for p in trainable)
        notes.append(f"optimizer states: {GENERIC_GUESS} (two fp32 moments per trainable parameter)")
    copies = autocast_weight_copy_bytes(model, dtype)
    activations = activation_bytes(model.config if hasattr(model, "config") else None, batch_size,
                                   max_length, dtype, objective)
    subtotal = weights + gradients + state + copies + activations
    if mode == "finetuning" and objective != CLASSIFICATION:
        notes.append("finetuning a language model: activations as for pretraining")
    return Breakdown(
        model=model_plugin.name, optimizer=optimizer_plugin.name,
        total_params=sum(p.numel() for p in parameters), trainable_params=sum(p.numel() for p in trainable),
        weights=weights, gradients=gradients, optimizer_states=int(state), weight_copies=copies,
        activations=activations, overhead=int(FRAMEWORK_OVERHEAD * subtotal), state_source=state_source,
        per_layer=per_layer, notes=notes,
        settings={"mode": mode, "objective": objective, "batch_size": batch_size, "max_length": max_length,
                  "dtype": dtype, "grad_accum": grad_accum, "optimizer_config": config,
                  "torch": torch.__version__},
    )


def estimate_many(registry: Any, model: str, optimizer: str | None, *, mode: str, batch_size: int,
                  max_length: int, dtype: str, per_layer: bool, grad_accum: int,
                  optimizer_config_file: Any = None) -> dict[str, Breakdown | str]:
    """``estimate`` for one optimizer, or (``optimizer`` None) every registered one; an optimizer
    that cannot apply (no per-layer mode, say) maps to its reason instead of a Breakdown."""
    from lowmem.resolve import merge_layers, read_config_file

    model_plugin = registry.model_for(model)
    if max_length > model_plugin.max_positions:
        raise ConfigError(f"--max_length {max_length} is longer than model {model!r} allows "
                          f"({model_plugin.max_positions} positions)")
    file_data = read_config_file(optimizer_config_file) if optimizer_config_file is not None else None
    files = [(str(optimizer_config_file), file_data)] if file_data is not None else []
    dataset = registry.dataset(registry.default_dataset(mode))
    objective = model_plugin.objective(mode, dataset.kind)
    results: dict[str, Breakdown | str] = {}
    for name in [optimizer] if optimizer is not None else sorted(registry.optimizers):
        try:
            optimizer_plugin = registry.optimizer(name)
            results[name] = estimate(
                model_plugin, optimizer_plugin, mode=mode, objective=objective, batch_size=batch_size,
                max_length=max_length, dtype=dtype, optimizer_config=merge_layers(optimizer_plugin, files),
                per_layer=per_layer, grad_accum=grad_accum,
            )
        except ConfigError as exc:
            if optimizer is not None:
                raise
            results[name] = str(exc)  # shown as "n/a" with the reason, the others still shown
    return results


def autocast_weight_copy_bytes(model: Any, dtype: str) -> int:
    """16-bit copies of every matmul weight (nn.Linear, GPT-2's Conv1D, LoRA factors, the LM
    head), which autocast makes in the forward and autograd keeps until that layer's backward."""
    import torch

    if not uses_autocast(dtype):  # no 16-bit copies
        return 0
    seen: dict[int, int] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        is_matmul = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"
        if is_matmul and isinstance(weight, torch.Tensor):
            seen[id(weight)] = weight.numel() * DTYPE_BYTES[dtype]
    return sum(seen.values())


def activation_bytes(config: Any, batch_size: int, max_length: int, dtype: str, objective: str) -> int:
    """Bytes of the tensors autograd keeps from the forward for the backward, at their peak.

    Per layer and token (16-bit autocast), from ``ACTIVATION_COEFFICIENTS``:
    ``c_h*h + c_i*i + c_a*a*s + c`` (+ 4a for LLaMA's fp32 log-sum-exp), where h is the hidden
    size, i the MLP width, a the heads and s the sequence length. Without autocast (fp32) the
    16-bit tensors are fp32: twice the bytes. Plus the embeddings and the loss: about 11h per
    token, and for a language model the fp32 logits, their log-softmax and gradient (12 bytes
    per token and vocabulary entry; a classifier's logits are negligible).
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
    body = scale * layers * tokens * per_token_layer + tokens * 11 * hidden
    vocab = getattr(config, "vocab_size", 0) or 0
    loss = 12 * tokens * vocab if objective != CLASSIFICATION else 0
    return int(math.ceil(body + loss))


def _config_value(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"model config has none of {', '.join(names)}: cannot estimate activations")


def state_reduction(state_bytes: int, trainable_params: int, bytes_per_moment: int = 2) -> float:
    """Fraction of optimizer memory saved against Adam with two ``bytes_per_moment`` moments per
    trainable parameter (the GaLore paper compares with bf16 AdamW: 2 bytes)."""
    reference = 2 * bytes_per_moment * trainable_params
    return 1 - state_bytes / reference if reference else 0.0


