"""Assemble a run from its config: tokenizer, data, model, optimizer, schedule, precision.

Everything here is plugin-driven: lowmem asks the registered model, dataset and optimizer
for their parts and never branches on their names.
"""

from __future__ import annotations

import dataclasses
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowmem.api import CLASSIFICATION, ConfigError, DataRequest, ModelRequest, OptimizerSettings
from lowmem.config import TrainConfig
from lowmem.distributed import DistContext
from lowmem.registry import Registry


@dataclass
class Run:
    """The assembled pieces the loop works with."""

    config: TrainConfig
    device: Any
    tokenizer: Any
    data: Any  # lowmem.data.DataSpec
    objective: str
    label_names: list[str]
    optimizer_plugin: Any
    model: Any  # the unwrapped model (what is saved)
    train_model: Any  # the model the loop calls (DDP-wrapped when data-parallel)
    optimizer: Any
    scheduler: Any
    scaler: Any
    total_steps: int
    warmup_steps: int
    # Some optimizers (per-layer GaLore) update inside backward: nothing to unscale or clip.
    steps_in_backward: bool
    dtype: str  # the resolved --dtype: bf16, fp16 or fp32

    def autocast(self):
        import torch

        if self.dtype in ("fp32", PURE_BF16):  # nothing to cast: the weights are in the compute dtype
            return nullcontext()
        dtype = torch.bfloat16 if self.dtype == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


PURE_BF16 = "bf16-pure"


def cast_weights(model, dtype: str):
    """``bf16-pure`` keeps the weights themselves in bf16 (no fp32 master copy); the other
    choices train fp32 weights, under autocast for bf16/fp16."""
    import torch

    return model.to(torch.bfloat16) if dtype == PURE_BF16 else model


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str, dist: DistContext):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls are fast on CPUs with AVX512-BF16 or AMX; elsewhere (AVX2 only) autocast to
    bf16 runs several times slower than fp32."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device) -> str:
    """``auto`` picks what runs well on the device; an explicit choice the device cannot do is an error."""
    import torch

    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if dtype == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_bf16 else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if dtype in ("bf16", PURE_BF16) and device.type == "cuda" and not cuda_bf16:
        raise ConfigError("--dtype bf16 is not supported by this GPU; use --dtype fp16 or fp32")
    return dtype


def warmup_cosine(total: int, warmup: int, period: int | None, min_ratio: float):
    """LR factor per optimizer step: linear warm-up, then a cosine from 1 down to ``min_ratio``
    over ``period`` steps (default: the rest of the run), held at ``min_ratio`` afterwards."""
    span = max(1, period if period is not None else total - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def count_train_records(data) -> int:
    request = DataRequest("train", source=data.source, cache_dir=data.cache_dir)
    return sum(1 for _ in data.dataset.records(request))


def plan_steps(config: TrainConfig, data, world_size: int) -> int:
    """Optimizer steps the run will take: from the token budget (pretraining) or the epochs
    (finetuning), capped by --max-steps."""
    per_step = config.batch_size * config.grad_accum * world_size
    if config.mode == "pretraining":
        steps = math.ceil(config.num_training_tokens / (per_step * config.max_length))
    else:
        batches = math.ceil(count_train_records(data) / config.batch_size)
        steps = config.num_epochs * max(1, batches // (config.grad_accum * world_size))
    return max(1, min(steps, config.max_steps or steps))


def assemble(config: TrainConfig, registry: Registry, dist: DistContext, warn) -> Run:
    import torch
    from transformers.utils import logging as hf_logging

    from lowmem.data import DataSpec, dataset_kind, label_names
    from lowmem.modeling import resolve_weights
    from lowmem.tokenizer import load_tokenizer

    hf_logging.disable_progress_bar()  # lowmem shows its own progress; HF's bars would interleave
    device = resolve_device(config.device, dist)
    dtype = resolve_dtype(config.dtype, device)
    optimizer_plugin = registry.optimizer(config.optimizer)
    model_plugin = registry.model(config.model)
    cache_dir = Path(config.cache_dir)

    tokenizer = load_tokenizer(
        tokenizer=config.tokenizer, model_path=config.model_path, model_plugin=model_plugin,
        cache_dir=cache_dir, registry=registry, warn=warn,
    )
    data = DataSpec(
        dataset=registry.dataset(config.dataset), source=config.dataset_source, objective="",
        tokenizer=tokenizer, max_length=config.max_length, batch_size=config.batch_size,
        seed=config.seed, shuffle=config.shuffle, cache_dir=cache_dir,
        rank=dist.rank, world_size=dist.world_size,
    )
    objective = model_plugin.objective(config.mode, dataset_kind(data))
    data = dataclasses.replace(data, objective=objective)
    labels = label_names(data) if objective == CLASSIFICATION else []

    # The same seed before the model exists gives the same initial weights on every run and rank.
    seed_everything(config.seed)
    weights = resolve_weights(model_plugin, config.mode, config.model_path, config.test, warn)
    with registry.guard(model_plugin, "build"):
        model = model_plugin.build(ModelRequest(
            objective=objective, vocab_size=len(tokenizer), num_labels=len(labels), weights=weights,
            pad_token_id=tokenizer.pad_token_id, trust_remote_code=config.trust_remote_code,
        ))
    settings = OptimizerSettings(
        lr=config.lr, weight_decay=config.weight_decay, config=dict(config.optimizer_config),
        target_modules=tuple(model_plugin.target_modules), objective=objective,
        grad_accum=config.grad_accum, max_grad_norm=config.max_grad_norm, world_size=dist.world_size,
    )
    model = cast_weights(model, dtype)
    with registry.guard(optimizer_plugin, "prepare_model"):
        model = optimizer_plugin.prepare_model(model, settings).to(device)
    with registry.guard(optimizer_plugin, "build"):
        optimizer = optimizer_plugin.build(model, settings)
    steps_in_backward = bool(getattr(optimizer, "steps_in_backward", False))
    if steps_in_backward and dtype == "fp16":
        raise ConfigError(
            f"optimizer {config.optimizer!r} updates inside backward, where fp16 loss scaling cannot "
            "unscale first; use --dtype bf16 or fp32"
        )

    total = plan_steps(config, data, dist.world_size)
    warmup = config.warmup_steps if config.warmup_steps is not None else total // 10
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, warmup, config.tmax, config.min_lr_ratio)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")
    return Run(
        config=config, device=device, tokenizer=tokenizer, data=data, objective=objective,
        label_names=labels, optimizer_plugin=optimizer_plugin, model=model,
        train_model=dist.wrap(model), optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        total_steps=total, warmup_steps=warmup, steps_in_backward=steps_in_backward, dtype=dtype,
    )
