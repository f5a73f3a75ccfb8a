"""Assemble a run from its resolved config: tokenizer, data, model, optimizer, schedule and
precision, asked of the registered plugins. lowmem never branches on their names."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowmem import levers, precision
from lowmem.api import (
    CAUSAL_LM,
    CHAT,
    CLASSIFICATION,
    REGRESSION,
    SFT,
    DataRequest,
    ModelRequest,
    Optimizer,
    OptimizerSettings,
)
from lowmem.config import TrainConfig
from lowmem.distributed import DistContext
from lowmem.errors import ConfigError
from lowmem.registry import Registry
from lowmem.rounding import compensated

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from transformers import PreTrainedTokenizerBase

    from lowmem.data import DataSpec


@dataclass
class Run:
    """The assembled pieces the loop works with."""

    config: TrainConfig
    registry: Registry  # names plugins in errors (Registry.guard)
    device: torch.device
    tokenizer: PreTrainedTokenizerBase
    data: DataSpec
    objective: str
    label_names: list[str]
    kind: str  # the dataset's kind: TEXT, SFT, CHAT, CLASSIFICATION or REGRESSION
    target_modules: tuple[str, ...]  # the layers LoRA adapts and GaLore projects
    optimizer_plugin: Optimizer
    model: torch.nn.Module  # the unwrapped model (what is saved)
    train_model: torch.nn.Module  # the model the loop calls (DDP-wrapped when data-parallel)
    trainable_parameters: list[torch.nn.Parameter]  # what the gradient norm is taken over
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    total_steps: int
    warmup_steps: int
    # The optimizer updates inside backward (see lowmem.Optimizer): nothing to unscale or clip.
    steps_in_backward: bool
    max_grad_norm: float  # the clipping applied: --max-grad-norm, or its default for this optimizer
    dtype: str  # the resolved --dtype: bf16, fp16, fp32 or bf16-pure
    grad_bytes: int = 0  # gradient memory, measured at the first step
    # --lean-loss: (parent module, attribute, head) of the output layer the chunked loss replaces.
    lean_head: tuple[Any, str, Any] | None = None
    # --parallel fsdp: builds the unsharded architecture on the meta
    # device, which the exported model is gathered into (``lowmem.checkpoint_sharded``).
    plain_model: Callable[[], Any] | None = None

    def autocast(self) -> Any:
        return precision.autocast(self.dtype, self.device)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def choose_device(name: str, dist: DistContext) -> torch.device:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


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


def plan_steps(config: TrainConfig, data: DataSpec, world_size: int) -> int:
    """Optimizer steps the run will take: from the token budget (pretraining) or the epochs
    (finetuning), capped by --max-steps."""
    per_step = config.batch_size * config.grad_accum * world_size
    if config.mode == "pretraining":
        steps = math.ceil(config.num_training_tokens / (per_step * config.max_length))
    else:
        request = DataRequest("train", source=data.source, cache_dir=data.cache_dir)
        records = sum(1 for _ in data.dataset.records(request))
        batches = math.ceil(records / config.batch_size)
        steps = config.num_epochs * max(1, batches // (config.grad_accum * world_size))
    return max(1, min(steps, config.max_steps or steps))


def optimizer_settings(config: TrainConfig, objective: str, targets: tuple[str, ...],
                       world_size: int, say: Any = None) -> OptimizerSettings:
    return OptimizerSettings(
        lr=config.lr, weight_decay=config.weight_decay, config=dict(config.optimizer_config),
        target_modules=targets, objective=objective, grad_accum=config.grad_accum,
        max_grad_norm=config.max_grad_norm, world_size=world_size,
        decay_norms_and_biases=config.decay_norms_and_biases, say=say, parallel=config.parallel,
        bf16_rounding=config.bf16_rounding,
    )


def assemble(config: TrainConfig, registry: Registry, dist: DistContext, say) -> Run:
    import torch
    from transformers.utils import logging as hf_logging

    from lowmem.data import DataSpec, dataset_kind, label_names
    from lowmem.modeling import choose_targets, find_weights
    from lowmem.tokenizer import load_tokenizer

    hf_logging.disable_progress_bar()  # lowmem shows its own progress; HF's bars would interleave
    device = choose_device(config.device, dist)
    dtype = precision.choose_dtype(config.dtype, device)
    optimizer_plugin = registry.optimizer(config.optimizer)
    model_plugin = registry.model_for(config.model)
    cache_dir = Path(config.cache_dir)

    tokenizer = load_tokenizer(
        tokenizer=config.tokenizer, model_path=config.model_path, model_plugin=model_plugin,
        cache_dir=cache_dir, registry=registry, say=say,
    )
    data = DataSpec(
        dataset=registry.dataset(config.dataset), source=config.dataset_source, objective="",
        tokenizer=tokenizer, max_length=config.max_length, batch_size=config.batch_size,
        seed=config.seed, shuffle=config.shuffle, cache_dir=cache_dir,
        rank=dist.rank, world_size=dist.world_size, packing=config.packing,
    )
    with registry.guard(data.dataset, "kind_of"):
        kind = dataset_kind(data)
    objective = model_plugin.objective(config.mode, kind)
    data = dataclasses.replace(data, objective=objective, kind=kind)
    labels = label_names(data) if objective == CLASSIFICATION and kind != REGRESSION else []
    if objective == CAUSAL_LM and kind in (SFT, CHAT):
        check_examples(data, say)
    elif config.packing and objective != CAUSAL_LM:
        say("note: --packing applies to causal language models; ignored")

    # The same seed before the model exists gives the same initial weights on every run and rank.
    seed_everything(config.seed)
    weights = find_weights(model_plugin, config.mode, config.model_path, config.test, say)
    with registry.guard(model_plugin, "build"):
        request = ModelRequest(
            objective=objective, vocab_size=len(tokenizer),
            num_labels=1 if kind == REGRESSION else len(labels), weights=weights,
            pad_token_id=tokenizer.pad_token_id, trust_remote_code=config.trust_remote_code,
        )
        model = model_plugin.build(request)
    model_config: Any = getattr(model, "config", None)
    if getattr(model_config, "use_cache", None):
        model_config.use_cache = False  # training keeps no key/value cache (and packing needs none)
    targets = choose_targets(model, config.target_modules, model_plugin)
    settings = optimizer_settings(config, objective, targets, dist.world_size, say)
    model = precision.cast_weights(model, dtype)
    if config.activation_checkpointing:
        levers.enable_checkpointing(model)
    with registry.guard(optimizer_plugin, "prepare_model"):
        model = optimizer_plugin.prepare_model(model, settings)
    sharded = config.parallel == "fsdp"
    if sharded:  # the optimizer is built on the shards (one process: a single shard)
        from lowmem.sharding import shard_model

        if dist.world_size == 1:
            say("note: --parallel fsdp on one process holds the whole model as one shard: the run equals a "
                "plain run, with sharded (DCP) checkpoints")
        dist.ensure_group(want_cuda=device.type == "cuda")
        with registry.guard(optimizer_plugin, "shard_dims"):
            dims = optimizer_plugin.shard_dims(model, settings)
        model = shard_model(model, dtype, device, dims)
    else:
        model = model.to(device)
    with registry.guard(optimizer_plugin, "build"):
        optimizer = optimizer_plugin.build(model, settings)
    steps_in_backward = bool(getattr(optimizer, "steps_in_backward", False))
    if not steps_in_backward:  # bf16-pure: updates in fp32 with compensation, whoever built it
        compensated(optimizer, config.bf16_rounding)
    if steps_in_backward and sharded and hasattr(optimizer, "agree_on_every_weight"):
        # Its FSDP processes may each skip the rest of a step on their own slices of a non-finite
        # gradient only when that step ends the run; a skipped step that goes on needs them agreed.
        optimizer.agree_on_every_weight = config.on_nonfinite == "skip"
    if steps_in_backward and config.max_grad_norm:
        raise ConfigError(f"optimizer {config.optimizer!r} updates inside backward, so it cannot clip by the "
                          "global gradient norm; pass --max-grad-norm 0 or leave it unset")
    default_clip = 0.0 if steps_in_backward else 1.0
    max_grad_norm = config.max_grad_norm if config.max_grad_norm is not None else default_clip
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
    # Compile the wrapped model: DDP's hooks stay outside the graph. FSDP shards in place.
    train_model = model if sharded else dist.wrap(model)
    if steps_in_backward and train_model is not model:  # DDP: update only on averaged gradients
        follow = getattr(optimizer, "step_after_reduction", None)
        if follow is None:
            hint = "use --parallel fsdp or one process" if optimizer_plugin.shards else "use one process"
            raise ConfigError(f"optimizer {config.optimizer!r} updates inside backward, before DDP averages "
                              f"the gradients over the processes; {hint}")
        follow(train_model)
    if config.compile:
        train_model = levers.compile_model(train_model, device)
    lean_head = levers.lean_loss_head(model, objective, say) if config.lean_loss else None
    return Run(
        config=config, registry=registry, device=device, tokenizer=tokenizer, data=data, objective=objective,
        label_names=labels, kind=kind, target_modules=targets, optimizer_plugin=optimizer_plugin, model=model,
        train_model=train_model, trainable_parameters=[p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer, scheduler=scheduler,
        scaler=precision.loss_scaler(dtype, device), total_steps=total, warmup_steps=warmup,
        steps_in_backward=steps_in_backward, max_grad_norm=max_grad_norm, dtype=dtype, lean_head=lean_head,
        plain_model=plain_model_builder(model_plugin, optimizer_plugin, request, settings, dtype)
        if sharded else None,
    )


def plain_model_builder(model_plugin: Any, optimizer_plugin: Optimizer, request: ModelRequest,
                        settings: OptimizerSettings, dtype: str) -> Callable[[], Any]:
    """The model as ``assemble`` prepares it, unsharded, on the meta device (no memory)."""

    def build() -> Any:
        model = model_plugin.build(dataclasses.replace(request, device="meta"))
        quiet = dataclasses.replace(settings, say=None)  # its notes were said once already
        return optimizer_plugin.prepare_model(precision.cast_weights(model, dtype), quiet)

    return build


def check_examples(data: DataSpec, say) -> None:
    """Prompt/completion and chat sets: give a chat template to tokenizers without one, and say
    how many examples were cut to fit (or could not keep a single target token)."""
    from lowmem import examples

    if data.kind == CHAT and not data.tokenizer.chat_template:
        say("note: the tokenizer has no chat template; using lowmem's default (<|role|> lines, "
            "EOS ends a turn)")
        data.tokenizer.chat_template = examples.DEFAULT_CHAT_TEMPLATE  # saved with the model
    records = list(data.dataset.records(DataRequest("train", source=data.source, cache_dir=data.cache_dir)))
    total, cut, empty = examples.survey(data.tokenizer, records, data.max_length)
    what = "prompt" if data.kind == SFT else "conversation"
    if cut:
        say(f"note: {cut} of {total} training examples were longer than --max_length {data.max_length}; "
            f"their {what} was cut to fit")
    if empty == total:
        raise ConfigError(f"no training example keeps a target token within --max_length {data.max_length}")
    if empty:
        say(f"note: {empty} training examples keep no target token within --max_length and are left out")


def parameter_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """What the optimizer really holds, for config.json: per distinct group setting, the number
    of tensors and elements (per-layer optimizers have one group per parameter; they are summed)."""
    names = {id(p): n for n, p in model.named_parameters()}
    summary: dict[tuple[Any, ...], dict[str, Any]] = {}
    for group in optimizer.param_groups:
        # The scheduler moves lr: the rest says how the group is treated.
        settings = {k: v for k, v in group.items()
                    if k not in ("params", "lr", "initial_lr") and isinstance(v, int | float | str | bool)}
        row = summary.setdefault(tuple(sorted(settings.items())),
                                 {**settings, "tensors": 0, "elements": 0, "examples": []})
        for p in group["params"]:
            row["tensors"] += 1
            row["elements"] += p.numel()
            if len(row["examples"]) < 3:
                row["examples"].append(names.get(id(p), "?"))
    return list(summary.values())
