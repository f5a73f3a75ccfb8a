"""Per-layer GaLore: one optimizer per parameter, stepped from its gradient hook.

Each parameter is stepped (and its gradient freed) as soon as backward has finished
accumulating it, so the full set of gradients never exists at once. Unlike the reference
implementation this respects gradient accumulation: a parameter steps on every
``grad_accum``-th hook call only, so its gradient sums the whole accumulation window first.

The wrapper is a real ``torch.optim.Optimizer`` so the training loop and LR schedulers treat it
like any other: ``step()`` does nothing (the hooks did the work), ``param_groups`` are the inner
optimizers' own group dicts (a scheduler setting ``lr`` there drives every inner optimizer, once
per optimizer step), ``zero_grad()`` drops gradients and restarts the accumulation window, and
``state_dict()`` / ``load_state_dict()`` carry every inner state. Each inner optimizer gets a copy
of its parameter's group (weight_decay 0 for a bias or norm weight, GaLore keys for a projected
weight) and the optimizer's defaults for the rest (eps alike for all).

Imported only from inside plugin methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lowmem.rounding import KAHAN, compensated
from lowmem.sharding import local


def gradient_bytes(tensor: torch.Tensor) -> int:
    part = local(tensor)  # an FSDP slice: this process's part
    return part.numel() * part.element_size()


class GradientTally:
    """The gradient bytes an optimizer that updates inside backward holds (this process's slices
    under FSDP): ``held`` now, ``peak`` the most since construction, which the run reports."""

    def __init__(self) -> None:
        self.held_gradient_bytes = 0
        self.peak_gradient_bytes = 0

    def gradient_arrived(self, grad: torch.Tensor) -> None:
        self.held_gradient_bytes += gradient_bytes(grad)
        self.peak_gradient_bytes = max(self.peak_gradient_bytes, self.held_gradient_bytes)

    def gradient_released(self, grad: torch.Tensor) -> None:
        self.held_gradient_bytes -= gradient_bytes(grad)


def drop_gradients(params: list[torch.Tensor], set_to_none: bool) -> None:
    """``zero_grad`` for optimizers that update inside backward: the gradients a skipped or
    finished window left behind go, freed or zeroed."""
    for p in params:
        if p.grad is not None:
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()


def agreed(finite: bool, grad: Any) -> bool:
    """Whether every FSDP process holding a slice of ``grad`` says ``finite`` (one collective)."""
    import torch.distributed as dist

    flag = torch.tensor([float(finite)], device=grad.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=grad.device_mesh.get_group())
    return bool(flag.item())


class PerLayerOptimizer(torch.optim.Optimizer, GradientTally):
    # Tells the training loop that updates happen inside backward: there is no moment to
    # unscale (fp16) or clip gradients, so it refuses fp16 instead of stepping on scaled grads.
    steps_in_backward = True

    def __init__(
        self,
        param_groups: list[dict[str, Any]],
        make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        grad_accum: int = 1,
        on_inner_change: Callable[[list[torch.optim.Optimizer]], None] | None = None,
        rounding: str = KAHAN,
    ):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        params = [p for group in param_groups for p in group["params"]]
        super().__init__(params, {})
        self.grad_accum = grad_accum
        self.on_inner_change = on_inner_change
        self.parameters_in_order = params
        self.inner_optimizers = [
            compensated(make_optimizer([{**group, "params": [p]}]), rounding)
            for group in param_groups for p in group["params"]
        ]
        self.param_groups = [g for inner in self.inner_optimizers for g in inner.param_groups]
        # Hook calls since each parameter's last step.
        self.micro_batches = [0] * len(params)
        self.norm_squared: torch.Tensor | None = None  # of the gradients stepped on since zero_grad
        self.nonfinite = False  # a gradient of this window was inf/NaN: no weight steps until zero_grad
        # Under FSDP: decide on every weight together (set by lowmem when a skipped step goes on).
        self.agree_on_every_weight = True
        GradientTally.__init__(self)  # under DDP its buckets hold every gradient anyway
        self.hooks = [
            p.register_post_accumulate_grad_hook(self._hook_for(index)) for index, p in enumerate(params)
        ]
        self._inner_changed()

    def _hook_for(self, index: int) -> Callable[[torch.Tensor], None]:
        def after_grad(param: torch.Tensor) -> None:
            self.micro_batches[index] += 1
            if self.micro_batches[index] == 1 and param.grad is not None:  # a new gradient exists
                self.gradient_arrived(param.grad)
            if self.micro_batches[index] < self.grad_accum:
                return
            self.micro_batches[index] = 0
            self._step_one(index, param)

        return after_grad

    def _step_one(self, index: int, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is not None:
            if self.hooks:  # counted by its hook (DDP's buckets are not)
                self.gradient_released(grad)
            square = local(grad).detach().float().pow(2).sum()  # of this process's slice under FSDP
            self.norm_squared = square if self.norm_squared is None else self.norm_squared + square
            if not self._may_step(index, param, square):
                # The non-finite check a normal step makes on the global norm, made weight by
                # weight: an inf/NaN gradient reaches no weight and no state, and nothing after
                # it in this step is updated either (the loop then stops or skips the step).
                self.nonfinite = True
                param.grad = None
                return
        self.inner_optimizers[index].step()
        param.grad = None  # the whole point: this gradient is not kept until the end

    def _may_step(self, index: int, param: torch.Tensor, square: torch.Tensor) -> bool:
        """Whether ``param`` steps: its gradient (``square``, the squared norm of this process's
        slice) and every one before it in this step finite; one host read per weight.

        Under FSDP each process sees its slices only. They decide together (one collective)
        where they must: before a step that makes a collective itself (a GaLore refresh, which
        all of them join or none), and for every weight when a skipped step lets the run go on
        (``agree_on_every_weight``: their states must not part). Otherwise each decides alone and
        the step's summed norm tells them all; the run then stops before anything is saved."""
        finite = not self.nonfinite and bool(torch.isfinite(square).item())
        grad = param.grad
        if not hasattr(grad, "device_mesh"):
            return finite
        communicates = getattr(self.inner_optimizers[index], "step_communicates", None)
        if self.agree_on_every_weight or communicates is None or communicates(param):
            return agreed(finite, grad)
        return finite

    def grad_norm_squared(self) -> torch.Tensor | None:
        """The squared norm of the gradients this process stepped on since ``zero_grad`` (its
        slices of them under FSDP), on their device; lowmem sums it over the processes."""
        return self.norm_squared

    def step_after_reduction(self, ddp_model: Any) -> None:
        """Under DDP: step each parameter once DDP has averaged its gradient over the processes,
        from a communication hook on DDP's gradient buckets, instead of from the gradient hook,
        which fires before the reduction. DDP reduces on the last micro-batch of a step only, so
        each parameter steps once per step on the whole accumulated, averaged gradient."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.remove_hooks()
        index = {id(p): i for i, p in enumerate(self.parameters_in_order)}
        self.peak_gradient_bytes = sum(gradient_bytes(p) for p in self.parameters_in_order)  # the buckets

        def reduce_then_step(state, bucket):  # no annotations: DDP checks them against its own
            def step_bucket(future: Any) -> Any:
                for param, grad in zip(bucket.parameters(), bucket.gradients(), strict=True):
                    if id(param) in index:
                        param.grad = grad  # a view of the averaged bucket
                        self._step_one(index[id(param)], param)
                return future.value()

            return allreduce_hook(state, bucket).then(step_bucket)

        ddp_model.register_comm_hook(None, reduce_then_step)

    def _inner_changed(self) -> None:
        # Expose the inner states as this optimizer's state (tools measure optimizer.state);
        # the dicts are shared, so they stay live until an inner load_state_dict replaces them.
        self.state.clear()
        for p, inner in zip(self.parameters_in_order, self.inner_optimizers, strict=True):
            self.state[p] = inner.state[p]
        if self.on_inner_change is not None:
            self.on_inner_change(self.inner_optimizers)

    def step(self, closure=None):
        """Nothing to do: each parameter was stepped by its hook during backward."""
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients and start a new accumulation window (a loop that skips a
        non-finite batch calls this mid-window)."""
        drop_gradients(self.parameters_in_order, set_to_none)
        self.micro_batches = [0] * len(self.micro_batches)
        self.norm_squared = None
        self.nonfinite = False
        self.held_gradient_bytes = 0

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "inner_optimizers"):
            raise NotImplementedError("per-layer GaLore does not take parameter groups after construction")
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return {
            "per_layer": [inner.state_dict() for inner in self.inner_optimizers],
            "micro_batches": list(self.micro_batches),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["per_layer"]
        if len(saved) != len(self.inner_optimizers):
            raise ValueError(
                f"per-layer state has {len(saved)} optimizers, this model needs {len(self.inner_optimizers)}"
            )
        for inner, inner_state in zip(self.inner_optimizers, saved, strict=True):
            inner.load_state_dict(inner_state)
        self.param_groups = [g for inner in self.inner_optimizers for g in inner.param_groups]
        self.micro_batches = list(state_dict.get("micro_batches", [0] * len(self.inner_optimizers)))
        self._inner_changed()

    def remove_hooks(self) -> None:
        """Detach from the model (another optimizer is about to train it)."""
        for handle in self.hooks:
            handle.remove()
        self.hooks = []
