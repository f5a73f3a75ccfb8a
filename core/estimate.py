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
* framework overhead: see ``lowmem.estimate_overhead``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lowmem.activations import (
    FALLBACK_FAMILY,
    NO_ADAPTERS,
    Adapters,
    activation_bytes,
    activation_family,
    find_adapters,
)
from lowmem.api import CLASSIFICATION, Model, ModelRequest, Optimizer, OptimizerSettings
from lowmem.errors import ConfigError
from lowmem.estimate_overhead import overhead_bytes
from lowmem.levers import check_checkpointing
from lowmem.modeling import choose_targets
from lowmem.precision import DTYPE_BYTES, cast_weights, uses_autocast, weight_bytes_per_element
from lowmem.rounding import compensation_bytes

GENERIC_GUESS = "generic AdamW-like guess"
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
    model_config: Any = None  # the architecture's config, for at_batch
    adapters: Adapters = NO_ADAPTERS  # LoRA's layers, for at_batch

    def at_batch(self, batch_size: int) -> Breakdown:
        """The same run at another batch size: only the activations (and the overhead on them)
        change."""
        s = self.settings
        activations = activation_bytes(self.model_config, batch_size, s["max_length"], s["dtype"],
                                       s["objective"], s["activation_checkpointing"], s["lean_loss"],
                                       self.adapters, s["device"])
        subtotal = self.weights + self.gradients + self.optimizer_states + self.weight_copies + activations
        return dataclasses.replace(self, activations=activations,
                                   overhead=overhead_bytes(subtotal, s["device"]),
                                   settings={**s, "batch_size": batch_size})

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
    checkpointing: bool = False,
    lean_loss: bool = False,
    world_size: int = 1,
    parallel: str = "ddp",
    bf16_rounding: str = "kahan",
    device: str = "cuda",
) -> Breakdown:
    """The memory breakdown of training ``model_plugin`` with ``optimizer_plugin`` on ``device``
    ("cuda" or "cpu": dropout keeps a bool mask on CUDA, a float one on CPU).

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
    check_combination(dtype, per_layer)
    if parallel == "fsdp" and not optimizer_plugin.shards:  # first, as a run says it
        from lowmem.resolve import fsdp_refusal

        raise ConfigError(fsdp_refusal(optimizer_plugin))
    model = model_plugin.build(ModelRequest(
        objective=objective, vocab_size=model_plugin.vocab_size,
        num_labels=2 if objective == CLASSIFICATION else 0, device="meta",
    ))
    settings = OptimizerSettings(
        lr=1e-3, config=config, target_modules=choose_targets(model, "", model_plugin), objective=objective,
        grad_accum=grad_accum, max_grad_norm=0.0, world_size=world_size, parallel=parallel,
    )
    if checkpointing:
        check_checkpointing(model)  # as a run refuses it
    model = optimizer_plugin.prepare_model(cast_weights(model, dtype), settings)

    parameters = list(model.parameters())  # a tied weight appears once
    trainable = [p for p in parameters if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in parameters)
    gradient_sizes = [p.numel() * p.element_size() for p in trainable]
    # Per-layer updates free each gradient as soon as its weight steps, unless it must be kept:
    # accumulating over micro-batches holds every gradient, and so do DDP's buckets.
    one_at_a_time = per_layer and grad_accum == 1 and (world_size == 1 or parallel == "fsdp")
    gradients = max(gradient_sizes, default=0) if one_at_a_time else sum(gradient_sizes)
    state = optimizer_plugin.state_bytes(model, settings)
    notes = []
    state_source = "plugin"
    if state is None:
        state_source = GENERIC_GUESS
        state = sum(2 * p.numel() * 4 for p in trainable)
        notes.append(f"optimizer states: {GENERIC_GUESS} (two fp32 moments per trainable parameter)")
    compensation = compensation_bytes(trainable, bf16_rounding)
    if compensation:
        state += compensation
        notes.append("optimizer states: + 2 bytes per bf16 trainable weight, the compensation that keeps "
                     "small updates in bf16-pure")
    copies = autocast_weight_copy_bytes(model, dtype)
    adapters = find_adapters(model)
    if lean_loss and not lean_loss_applies(model, objective):
        lean_loss = False
        notes.append("--lean-loss applies to causal LMs with a plain linear output layer: the usual loss "
                     "is counted, as a run would use it")
    model_config = getattr(model, "config", None)
    if model_config is not None and activation_family(model_config) is None:
        notes.append(f"activations: no measured formula for {getattr(model_config, 'model_type', '?')!r}; "
                     f"{FALLBACK_FAMILY}'s is used (the largest: its attention keeps length x length "
                     "scores)")
    activations = activation_bytes(model_config, batch_size, max_length, dtype, objective, checkpointing,
                                   lean_loss, adapters, device)
    subtotal = weights + gradients + state + copies + activations
    if mode == "finetuning" and objective != CLASSIFICATION:
        notes.append("finetuning a language model: activations as for pretraining")
    result = Breakdown(
        model=model_plugin.name, optimizer=optimizer_plugin.name,
        total_params=sum(p.numel() for p in parameters), trainable_params=sum(p.numel() for p in trainable),
        weights=weights, gradients=gradients, optimizer_states=int(state), weight_copies=copies,
        activations=activations, overhead=overhead_bytes(subtotal, device), state_source=state_source,
        per_layer=per_layer, notes=notes, model_config=getattr(model, "config", None), adapters=adapters,
        settings={"mode": mode, "objective": objective, "batch_size": batch_size, "max_length": max_length,
                  "dtype": dtype, "grad_accum": grad_accum, "optimizer_config": config,
                  "activation_checkpointing": checkpointing, "lean_loss": lean_loss,
                  "bf16_rounding": bf16_rounding, "device": device,
                  "torch": torch.__version__},
    )
    if parallel == "fsdp" and world_size > 1:  # one of several sharded processes
        from lowmem.estimate_sharded import per_process

        result = per_process(result, model, optimizer_plugin, settings, world_size)
    return result


def check_combination(dtype: str, per_layer: bool) -> None:
    """What a run refuses before it starts, refused here too: no estimate for a run that cannot be."""
    if per_layer and dtype == "fp16":
        raise ConfigError("per-layer updates happen inside backward, where fp16 loss scaling cannot unscale "
                          "first; use --dtype bf16 or fp32")


def lean_loss_applies(model: Any, objective: str) -> bool:
    from lowmem.api import CAUSAL_LM
    from lowmem.lean_loss import output_head

    return objective == CAUSAL_LM and output_head(model) is not None


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


def state_reduction(state_bytes: int, trainable_params: int, bytes_per_moment: int = 2) -> float:
    """Fraction of optimizer memory saved against Adam with two ``bytes_per_moment`` moments per
    trainable parameter (the GaLore paper compares with bf16 AdamW: 2 bytes)."""
    reference = 2 * bytes_per_moment * trainable_params
    return 1 - state_bytes / reference if reference else 0.0


