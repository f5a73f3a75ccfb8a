"""``lora``: peft LoRA adapters on the attention/MLP layers, AdamW over what is trainable.

Weight decay (baseline's build_adamw) applies to the LoRA factors and the head's weights, not to
biases (the classifier's, under peft's ``modules_to_save``) or norm weights, unless
``decay_norms_and_biases``.

Objective -> peft task type: classification uses SEQ_CLS, which also trains the classifier head
(peft's ``modules_to_save``); causal_lm uses CAUSAL_LM; masked_lm has no peft task type, so the
adapters are added to the bare model and the MLM head stays frozen.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lowmem
from lowmem.plugins.optimizers import plugin_config
from lowmem.plugins.optimizers.baseline import adamw_state_bytes, adamw_step_bytes, build_adamw

LORA_DEFAULTS: dict[str, Any] = {
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    # None: the model plugin's target modules (attention and MLP linear layers).
    "target_modules": None,
}


@lowmem.hookimpl
def register_optimizers(register):
    register(LoRA())


def check_lora_config(config: Mapping[str, Any]) -> None:
    if not isinstance(config["r"], int) or config["r"] <= 0:
        raise lowmem.ConfigError(f"'r' must be a positive integer, got {config['r']!r}")
    if not config["lora_alpha"] > 0:  # also refuses NaN
        raise lowmem.ConfigError(f"'lora_alpha' must be > 0, got {config['lora_alpha']!r}")
    if not 0 <= config["lora_dropout"] < 1:
        raise lowmem.ConfigError(f"'lora_dropout' must be in [0, 1), got {config['lora_dropout']!r}")
    targets = config["target_modules"]
    if targets is not None and (
        not isinstance(targets, list | tuple)
        or not targets
        or not all(isinstance(t, str) and t for t in targets)
    ):
        raise lowmem.ConfigError(
            f"'target_modules' must be a non-empty list of module names, got {targets!r}"
        )


def add_lora_adapters(model: Any, config: Mapping[str, Any], settings: lowmem.OptimizerSettings) -> Any:
    """Wrap ``model`` in a peft model with LoRA adapters on the target modules."""
    from lowmem.plugins.optimizers import quiet_bitsandbytes
    from lowmem.plugins.optimizers.targets import head_modules, target_modules

    quiet_bitsandbytes()
    import peft
    import torch

    names = list(config["target_modules"] or settings.target_modules)
    if not names:
        raise lowmem.ConfigError(
            "'target_modules': the model names no target modules; list them in the lora config"
        )
    targets = target_modules(model, names)
    if not targets:
        raise lowmem.ConfigError(f"'target_modules': no layer of this model is named {', '.join(names)}")
    task_type = {lowmem.CLASSIFICATION: "SEQ_CLS", lowmem.CAUSAL_LM: "CAUSAL_LM"}.get(settings.objective)
    lora_config = peft.LoraConfig(
        r=config["r"],
        lora_alpha=config["lora_alpha"],
        lora_dropout=config["lora_dropout"],
        target_modules=names,
        # Heads share last names with body layers (RoBERTa's lm_head.dense); they stay frozen
        # (masked_lm) or are trained in full (classification, peft's modules_to_save).
        exclude_modules=head_modules(model, names) or None,
        # GPT-2's Conv1D stores its weight as (in, out); telling peft avoids its warning.
        fan_in_fan_out=any(type(m).__name__ == "Conv1D" for _, m in targets),
        task_type=task_type,
    )
    with warnings.catch_warnings():
        # peft calls transformers' deprecated is_gradient_checkpointing: not the user's concern.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        # peft keeps adapters in fp32 by default. On bf16 weights (--dtype bf16-pure) that makes
        # every adapted layer's output fp32 and the activations after it twice the size: a LoRA
        # run then needed more memory than full AdamW (bench/peaks.md). There the adapters are
        # bf16 like the rest, and lowmem's fp32 updates with compensation keep their small steps.
        bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
        return peft.get_peft_model(model, lora_config, autocast_adapter_dtype=not bf16)


def save_lora_model(model: Any, directory: Path) -> None:
    """The adapter into ``directory/adapter`` (PeftModel.from_pretrained loads it) and the merged
    plain model into ``directory``; the merge happens on a copy so training can go on."""
    if not hasattr(model, "merge_and_unload"):
        model.save_pretrained(directory, safe_serialization=True)
        return
    directory = Path(directory)
    model.save_pretrained(directory / "adapter", safe_serialization=True)
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(directory, safe_serialization=True)


class LoRA(lowmem.Optimizer):
    name = "lora"
    description = "LoRA adapters (peft) on attention/MLP layers, AdamW on the adapters"
    default_config = dict(LORA_DEFAULTS)
    config_files = ("lora",)
    shards = True  # torch's AdamW steps DTensor shards elementwise: exact under FSDP

    def check_config(self, config):
        check_lora_config(config)

    def prepare_model(self, model, settings):
        return add_lora_adapters(model, plugin_config(self, settings), settings)

    def build(self, model, settings):
        return build_adamw(model, settings)

    def state_bytes(self, model, settings):
        return adamw_state_bytes(model)

    def replicated_state_bytes(self, model, settings):
        return adamw_step_bytes(model)

    def save_model(self, model, directory):
        save_lora_model(model, directory)
