"""LOMO and AdaLomo (lomo-optim) updating from gradient hooks under lowmem's training loop
(``lomo`` and ``adalomo`` plugins).

lomo-optim's optimizers own the backward pass: ``fused_backward(loss, lr)`` scales the loss, runs
backward, and tensor hooks update every parameter whose gradient is ready. lowmem's loop runs
backward itself (``steps_in_backward``), so this wrapper never calls ``fused_backward``. It keeps
the package's update rule, the closure its ``fuse_update()`` returns, and calls it from a
post-accumulate-grad hook per parameter, once that parameter's gradient is complete, on every
``grad_accum``-th micro-batch only: the gradient it sees is the whole accumulation window's, as
in a normal optimizer step. The closure walks the package's ``model.named_parameters()``; the
package is given ``PackageView`` as its model, which lists no parameter while the package is
constructed (so it registers no hooks of its own and allocates nothing) and, during an update,
just the parameter being updated.

AdaLomo's constructor allocates its state with ``.cuda()``, which fails on a CPU-only torch and
would put the state on the wrong device for CPU training anyway. The view lists nothing at that
time, and ``allocate_adalomo_state`` creates the same fp32 tensors on each parameter's device.

Per update the package's learning rate, weight decay and (AdaLomo) step number are set from this
optimizer's param groups and step count, so lowmem's LR schedule and decay rule drive it.

Imported only from inside plugin methods (it imports torch and lomo_optim).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from lowmem.plugins.optimizers.per_layer import GradientTally, drop_gradients
from lowmem.rounding import COMPENSATION, KAHAN, NEAREST, ROUNDINGS_DONE, fp32_update


class PackageView:
    """What lomo-optim iterates as "the model"."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.current: list[tuple[str, torch.Tensor]] = []

    def named_parameters(self):
        return iter(self.current)

    def parameters(self):
        return iter(self.params)


def adalomo_state(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """AdaLomo's second-moment statistics for ``p``: per element for a 1-D tensor, per row and per
    column for a matrix, fp32 on the parameter's device (the package: fp32, on CUDA)."""
    if p.dim() == 1:
        return {"exp_avg_sq": torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)}
    return {"exp_avg_sq_row": torch.zeros(p.shape[0], dtype=torch.float32, device=p.device),
            "exp_avg_sq_col": torch.zeros(p.shape[1], dtype=torch.float32, device=p.device)}


class LomoInBackward(torch.optim.Optimizer, GradientTally):
    # The training loop: updates happen inside backward; step() does nothing.
    steps_in_backward = True

    def __init__(self, groups: list[dict[str, Any]], names: dict[int, str], lr: float,
                 make_engine: Callable[[PackageView], Any], grad_accum: int = 1, adaptive: bool = False,
                 rounding: str = KAHAN):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        super().__init__(groups, {"lr": lr})
        self.parameters_in_order = [p for group in self.param_groups for p in group["params"]]
        self.group_of = [group for group in self.param_groups for _ in group["params"]]
        self.names = [names[id(p)] for p in self.parameters_in_order]
        self.view = PackageView(self.parameters_in_order)
        self.engine = make_engine(self.view)
        self.grad_accum = grad_accum
        self.adaptive = adaptive
        self.rounding = rounding
        self.micro_batches = [0] * len(self.parameters_in_order)
        self.steps = 0  # optimizer steps that updated; AdaLomo's step number
        self.window_updated = False
        self.norm_squared: torch.Tensor | None = None  # of the gradients updated from since zero_grad
        self.nonfinite = False  # a gradient of this window was inf/NaN: no weight changes until zero_grad
        GradientTally.__init__(self)  # one gradient at a time, or all of them while accumulating
        if adaptive:
            for p in self.parameters_in_order:
                self.state[p] = adalomo_state(p)
            self._share_state()
        self.hooks = [p.register_post_accumulate_grad_hook(self._hook_for(index))
                      for index, p in enumerate(self.parameters_in_order)]

    def _share_state(self) -> None:
        """Point the package's name-keyed state dicts at this optimizer's tensors."""
        for name, p in zip(self.names, self.parameters_in_order, strict=True):
            for key, tensor in self.state[p].items():
                if key not in (COMPENSATION, ROUNDINGS_DONE):
                    getattr(self.engine, key)[name] = tensor

    def _hook_for(self, index: int) -> Callable[[torch.Tensor], None]:
        def after_grad(param: torch.Tensor) -> None:
            self.micro_batches[index] += 1
            if self.micro_batches[index] == 1 and param.grad is not None:  # a new gradient exists
                self.gradient_arrived(param.grad)
            if self.micro_batches[index] < self.grad_accum:
                return
            self.micro_batches[index] = 0
            if param.grad is not None:
                self.gradient_released(param.grad)
                if not self._finite(param.grad):
                    # The non-finite check a normal step makes on the global norm, weight by weight:
                    # an inf/NaN gradient reaches no weight, nor does any after it in this window.
                    self.nonfinite = True
                    param.grad = None
                    return
            if not self.window_updated:
                self.steps += 1
                self.window_updated = True
            self._update(index, param)

        return after_grad

    def _update(self, index: int, param: torch.Tensor) -> None:
        group, engine = self.group_of[index], self.engine
        engine.lr = group["lr"]
        engine.weight_decay = group["weight_decay"]
        engine.do_weight_decay = group["weight_decay"] > 0.0
        engine.step_num = self.steps  # AdaLomo's bias schedule; unused by Lomo
        # bf16-pure: the package adds the update in fp32 but rounds the weight to nearest; an fp32
        # stand-in (lowmem.rounding) carries the weight through it and keeps small updates.
        lowered = param.dtype == torch.bfloat16 and self.rounding != NEAREST
        update = fp32_update(self, param, self.rounding, index) if lowered else nullcontext(param)
        with update as target:
            self.view.current = [(self.names[index], target)]
            try:
                engine.grad_func(0)  # updates the weight from its .grad, then drops the gradient
            finally:
                self.view.current = []
        param.grad = None

    def _finite(self, grad: torch.Tensor) -> bool:
        """Adds ``grad`` to the window's squared norm; whether it and every one before it in this
        window were finite (one host read per weight)."""
        square = grad.detach().float().pow(2).sum()
        self.norm_squared = square if self.norm_squared is None else self.norm_squared + square
        return not self.nonfinite and bool(torch.isfinite(square).item())

    def grad_norm_squared(self) -> torch.Tensor | None:
        """The squared norm of the gradients this window updated from (or met non-finite), which
        the loop logs as the step's gradient norm."""
        return self.norm_squared

    def step(self, closure=None):
        """Nothing to do: each parameter was updated by its hook during backward."""
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients and start a new accumulation window."""
        drop_gradients(self.parameters_in_order, set_to_none)
        self.micro_batches = [0] * len(self.micro_batches)
        self.window_updated = False
        self.held_gradient_bytes = 0
        self.norm_squared = None
        self.nonfinite = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "engine"):
            raise NotImplementedError("LOMO does not take parameter groups after construction")
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        params = self.parameters_in_order
        return {
            "state": {i: dict(self.state[p]) for i, p in enumerate(params) if self.state.get(p)},
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "steps": self.steps,
            "micro_batches": list(self.micro_batches),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"saved state has {len(saved_groups)} groups, this optimizer {len(self.param_groups)}")
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            group.update(saved)  # the same dicts: group_of and any LR scheduler keep seeing them
        # Each tensor keeps its saved dtype (fp32 statistics of a bf16 weight stay fp32).
        for index, saved in state_dict["state"].items():
            p = self.parameters_in_order[int(index)]
            # Not only tensors: lowmem.rounding adds a count of stochastic roundings (an int).
            self.state[p] = {key: value.to(device=p.device, copy=True) if hasattr(value, "to") else value
                             for key, value in saved.items()}
        self.steps = state_dict["steps"]
        self.micro_batches = list(state_dict["micro_batches"])
        self.window_updated = False
        if self.adaptive:
            self._share_state()

    def remove_hooks(self) -> None:
        """Detach from the model (another optimizer is about to train it)."""
        for handle in self.hooks:
            handle.remove()
        self.hooks = []
