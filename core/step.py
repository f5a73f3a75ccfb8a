"""One optimizer step: forward and backward over an accumulation group, then the update.

The step reads nothing back from the device per micro-batch. Its figures (loss, tokens, the
non-finite flag, a stop request) travel in one tensor and one collective per step, and the
host reads the few numbers that decide what happens next once per step. The loss itself stays
on the device until the loop writes a log row.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lowmem import memory
from lowmem.data import count_tokens, model_inputs
from lowmem.sharding import local

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from lowmem.assemble import Run
    from lowmem.distributed import DistContext


@dataclass
class StepResult:
    loss: torch.Tensor  # mean loss of the step over micro-batches and ranks, still on the device
    tokens: int  # real input tokens of the step, all ranks together
    grad_norm: torch.Tensor | None  # before clipping; None when the optimizer steps inside backward
    lr: float  # the learning rate the update used
    skipped: str | None  # "loss" or "gradient norm" when non-finite: no update was applied
    stop: bool  # some rank was asked to stop (SIGINT/SIGTERM): every rank stops after this step
    # Skipped by an optimizer that steps inside backward: the weights it stepped before the first
    # non-finite gradient were updated, the rest were not.
    partial: bool = False


def take_step(run: Run, group: list[dict[str, Any]], dist: DistContext, stop_requested: bool) -> StepResult:
    import torch

    device, accum = run.device, len(group)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    nonfinite_before_backward = False
    for i, batch in enumerate(group):
        tokens += count_tokens(batch)  # counted on the host copy: no device read
        seed = batch.get("lowmem_seed")
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "lowmem_seed"}
        # DDP all-reduces gradients only on the group's last backward.
        with dist.no_sync(run.train_model, sync=i == accum - 1), batch_random_stream(seed, device):
            loss = forward_loss(run, batch)
            # An optimizer that updates inside backward must never see a non-finite loss, so it
            # is checked first: one host read per micro-batch, for such optimizers only.
            if run.steps_in_backward and not dist.all_true(torch.isfinite(loss), device):
                nonfinite_before_backward = True
                break
            run.scaler.scale(loss / accum).backward()
        loss_sum += loss.detach()

    # The step's one collective: loss sum, tokens, non-finite loss, stop request, and the squared
    # norm of the gradients an optimizer stepped on inside backward (its slices under FSDP).
    flags = torch.tensor([tokens, nonfinite_before_backward, stop_requested, 0.0], dtype=torch.float64,
                         device=device)
    flags[1] += (~torch.isfinite(loss_sum)).to(torch.float64)
    stepped = getattr(run.optimizer, "grad_norm_squared", None) if run.steps_in_backward else None
    stepped_square = stepped() if stepped is not None else None
    if stepped_square is not None:
        flags[3] += stepped_square.to(torch.float64)
    stats = dist.sum_(torch.cat([loss_sum.reshape(1), flags]))
    grad_norm = None
    if stepped_square is not None and not nonfinite_before_backward:
        # DDP processes all stepped on the same averaged gradients, FSDP processes on slices.
        copies = 1 if run.config.parallel == "fsdp" else dist.world_size
        grad_norm = (stats[4] / copies).sqrt().to(torch.float32)
    if run.steps_in_backward:  # its gradients went as it stepped: the most it held at once
        run.grad_bytes = max(run.grad_bytes, int(getattr(run.optimizer, "peak_gradient_bytes", 0)))
    if not nonfinite_before_backward and not run.steps_in_backward:
        if not run.grad_bytes:
            run.grad_bytes = memory.gradient_bytes(run.model)
        run.scaler.unscale_(run.optimizer)  # fp16: clip the true gradients
        max_norm = run.max_grad_norm if run.max_grad_norm > 0 else math.inf
        # Over sharded (DTensor) gradients the norm is the global one, replicated on every rank.
        grad_norm = local(torch.nn.utils.clip_grad_norm_(run.trainable_parameters, max_norm))
    # With fp16 the loss scaler owns inf/NaN gradients: it skips the step and lowers the scale.
    # (An optimizer that steps inside backward held back every weight from its first non-finite
    # gradient on; its norm, summed over the processes above, tells them all to stop together.)
    bad_norm = stats[:1] * 0
    if grad_norm is not None and not run.scaler.is_enabled():
        bad_norm = (~torch.isfinite(grad_norm)).to(torch.float64).reshape(1)
    # The step's one host read: what happens next depends on these.
    step_tokens, bad_loss, stop, bad_grad = torch.cat([stats[1:4], bad_norm]).tolist()
    mean_loss = stats[0] / (accum * dist.world_size)
    lr = float(run.scheduler.get_last_lr()[0])
    skipped = "loss" if bad_loss else "gradient norm" if bad_grad else None
    if skipped is not None:
        run.optimizer.zero_grad(set_to_none=True)
        partial = bool(bad_grad) and run.steps_in_backward
        return StepResult(mean_loss, int(step_tokens), grad_norm, lr, skipped, bool(stop), partial)

    scale_before = run.scaler.get_scale() if run.scaler.is_enabled() else 0.0
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    # A step the loss scaler skipped (fp16 overflow) does not advance the schedule.
    if not (run.scaler.is_enabled() and run.scaler.get_scale() < scale_before):
        run.scheduler.step()
    return StepResult(mean_loss, int(step_tokens), grad_norm, lr, None, bool(stop))


@contextmanager
def batch_random_stream(seed: Any, device: Any) -> Iterator[None]:
    """Within: random draws (dropout, and its replay by activation checkpointing) come from the
    batch's own seed (a host tensor, or None for the run's stream); the run's stream is left as
    it was, so what draws from it outside (optimizers) stays the same on every process."""
    if seed is None:
        yield
        return
    import torch

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(int(seed))
        yield


def forward_loss(run: Run, batch: dict[str, Any]) -> torch.Tensor:
    """The model's loss on a batch; with the lean loss, from its hidden states, chunk by chunk."""
    if run.lean_head is None:
        with run.autocast():
            return run.train_model(**model_inputs(batch)).loss
    from lowmem.lean_loss import causal_lm_loss, hidden_states_out

    parent, attribute, head = run.lean_head
    inputs = model_inputs(batch)
    labels = inputs.pop("labels")
    with hidden_states_out(parent, attribute), run.autocast():
        hidden = run.train_model(**inputs).logits
    return causal_lm_loss(hidden, head, labels)
