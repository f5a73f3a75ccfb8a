"""Updates of bf16 weights that keep the small steps (``--dtype bf16-pure``).

A bf16 weight has 8 bits of mantissa: an update smaller than half a unit in its last place
(about 0.2% of the weight) rounds away to nothing when an optimizer adds it in place. Over a
run most of AdamW's late steps, and nearly all of weight decay, vanish that way.

So every update of a bf16 weight runs in fp32: the weight, its gradient and its bf16 state
tensors are fp32 copies while that weight's update runs, and the result is written back
(``--bf16-rounding``):

* ``kahan`` (default): lowmem keeps, next to each bf16 weight, a bf16 tensor of what rounding
  the weight last cut off (the optimizer state ``lowmem_compensation``, 2 bytes per weight).
  The update runs on the fp32 sum of the two; the new weight is rounded to nearest and the
  rest kept. The pair carries about 16 bits of mantissa: small updates add up as in fp32.
* ``stochastic``: rounded up or down at random, exact in expectation, no state; its noise is a
  random walk of about a unit in the last place per update, which swamps small updates over a
  hundred steps (bench/pure_bf16.md), so it is for runs that must fit.
* ``nearest``: plain bf16 arithmetic; nothing here runs.

The optimizer steps each bf16 weight on its own, the other gradients hidden and an fp32
stand-in in the weight's place, so the fp32 copies exist for one weight at a time; this suits
any optimizer whose state is per weight. State keeps the dtypes the optimizer chooses for a
bf16 weight: the weight's first update is taken once in bf16 to see which dtypes those are,
then undone and taken again in fp32.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

COMPENSATION = "lowmem_compensation"
ROUNDINGS_DONE = "lowmem_roundings"  # stochastic: how often a weight was rounded (seeds its noise)
KAHAN, STOCHASTIC, NEAREST = "kahan", "stochastic", "nearest"
ROUNDINGS = (KAHAN, STOCHASTIC, NEAREST)  # lowmem.config.BF16_ROUNDINGS


def compensated(optimizer: torch.optim.Optimizer, rounding: str = KAHAN) -> torch.optim.Optimizer:
    """Make ``optimizer.step()`` update its bf16 weights in fp32, written back as ``rounding``
    says (fp32 weights step as before; "nearest" changes nothing). Idempotent; returns the
    optimizer."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, not {rounding!r}")
    if rounding != NEAREST and not getattr(optimizer, "lowmem_rounding", None):
        optimizer.lowmem_plain_step = optimizer.step  # type: ignore[attr-defined]
        optimizer.lowmem_rounding = rounding  # type: ignore[attr-defined]
        # A bound method, as torch's LR schedulers expect to find (they wrap it to count steps).
        optimizer.step = types.MethodType(compensated_step, optimizer)  # type: ignore[method-assign]
    return optimizer


def compensated_step(optimizer: Any, closure: Any = None) -> Any:
    return step_in_fp32(optimizer, optimizer.lowmem_plain_step, optimizer.lowmem_rounding, closure)


def step_in_fp32(optimizer: torch.optim.Optimizer, plain_step: Callable[[], Any], rounding: str,
                 closure: Any = None) -> Any:
    """``plain_step()``, each bf16 weight updated on its own in fp32."""
    import torch

    if closure is not None:
        raise ValueError("lowmem's bf16 updates take no closure")
    with_grads = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    lowered = [p for p in with_grads if p.dtype == torch.bfloat16]
    if not lowered:
        return plain_step()
    grads = {p: p.grad for p in with_grads}
    try:
        for p in lowered:
            p.grad = None
        if len(lowered) < len(with_grads):
            plain_step()  # the weights kept in fp32, as usual
        for p in with_grads:
            p.grad = None
        # A weight's place among all the optimizer's: the same on every process and after a resume.
        every = [p for group in optimizer.param_groups for p in group["params"]]
        places = {id(p): i for i, p in enumerate(every)}
        for p in lowered:
            p.grad = grads[p]
            update_in_fp32(optimizer, plain_step, p, rounding, places[id(p)])
            p.grad = None
    finally:
        for p, grad in grads.items():
            p.grad = grad
    return None


def update_in_fp32(optimizer: torch.optim.Optimizer, plain_step: Callable[[], Any], param: torch.Tensor,
                   rounding: str, place: int = 0) -> None:
    """Step bf16 ``param``, the only weight with a gradient, in fp32."""
    first = not has_state(optimizer.state.get(param))  # its first update, or none made state yet
    chosen = state_dtypes_of_first_update(optimizer, plain_step, param) if first else None
    with fp32_update(optimizer, param, rounding, place):
        plain_step()
    if chosen is not None:
        cast_state(optimizer.state[param], chosen)


def state_dtypes_of_first_update(optimizer: torch.optim.Optimizer, plain_step: Callable[[], Any],
                                 param: torch.Tensor) -> dict[str, Any]:
    """Take the update in bf16 as it would run without lowmem, note the dtypes of the state it
    creates, and undo it: weight, gradient and state are as before."""
    import torch

    before = copy.deepcopy(dict(optimizer.state[param]))
    for key in (COMPENSATION, ROUNDINGS_DONE):  # lowmem's own: the optimizer sees its state alone
        optimizer.state[param].pop(key, None)
    weight, grad = param.data.clone(), param.grad
    param.grad = grad.clone() if isinstance(grad, torch.Tensor) else grad
    plain_step()
    state = optimizer.state[param]  # fetched again: an optimizer may have replaced the dict
    chosen = {key: dtypes_of(value) for key, value in state.items()}
    param.data.copy_(weight)
    param.grad = grad
    state.clear()
    state.update(before)
    return chosen


def dtypes_of(value: Any) -> Any:
    """A state entry's tensor dtypes: a dtype, a list of them, or an object's by attribute."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.dtype
    if isinstance(value, list) and value and all(isinstance(item, torch.Tensor) for item in value):
        return [item.dtype for item in value]
    if hasattr(value, "__dict__"):
        return {name: dtypes_of(held) for name, held in vars(value).items()}
    return None


def cast_state(state: MutableMapping[str, Any], chosen: dict[str, Any]) -> None:
    for key, value in list(state.items()):
        if isinstance(chosen.get(key), dict):
            for name, held in vars(value).items():
                setattr(value, name, cast_like(held, chosen[key].get(name)))
        else:
            state[key] = cast_like(value, chosen.get(key))


def cast_like(value: Any, dtype: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor) and isinstance(dtype, torch.dtype) and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, list) and isinstance(dtype, list) and len(value) == len(dtype):
        return [cast_like(item, kind) for item, kind in zip(value, dtype, strict=True)]
    return value


@contextmanager
def fp32_update(optimizer: torch.optim.Optimizer, param: torch.Tensor, rounding: str = KAHAN,
                place: int = 0) -> Iterator[torch.Tensor]:
    """Within the block, ``optimizer`` holds an fp32 stand-in for bf16 ``param`` (with "kahan",
    the sum of the weight and its compensation) in its place, in its group and with its state,
    and with an fp32 copy of its gradient; the bf16 tensors of that state are fp32 copies too.
    The block gets the stand-in. On leaving, the weight takes the result (rounded stochastically,
    or to nearest with the remainder kept as its compensation), the state tensors are written
    back into their own bf16 storage and the optimizer holds ``param`` again.

    A stand-in, not the weight itself turned fp32: changing a tensor's dtype drops its autograd
    gradient accumulator, and with it the hooks DDP reduces gradients through. Objects in the
    state (a projector, say) get fp32 copies of their bf16 tensors as well, so the optimizer's
    arithmetic sees one dtype; a tensor the update only read is put back as it was, one it
    replaced (a refreshed projection) is stored in bf16, as before.
    """
    import torch

    weight = param.data
    state = optimizer.state.pop(param, {})
    # Kept out of the state while the optimizer runs: an optimizer takes a non-empty state for
    # one it has made, and may walk all of it.
    compensation = state.pop(COMPENSATION, None)
    roundings = state.pop(ROUNDINGS_DONE, 0)
    if compensation is None and rounding == KAHAN:
        compensation = torch.zeros_like(weight)
    value = weight.float() if compensation is None else weight.float().add_(compensation)
    stand_in = torch.nn.Parameter(value)
    if param.grad is not None:
        stand_in.grad = param.grad.float()
    moments = {key: value for key, value in state.items() if is_bf16(value)}
    held = [(owner, name, value) for owner in state.values()
            if hasattr(owner, "__dict__") and not isinstance(owner, torch.Tensor)
            for name, value in vars(owner).items() if is_bf16(value)]
    for key, value in moments.items():
        state[key] = value.float()
    copies = [to_dtype(value, torch.float32) for _, _, value in held]
    for (owner, name, _), fp32_copy in zip(held, copies, strict=True):
        setattr(owner, name, fp32_copy)
    places = [(group["params"], index) for group in optimizer.param_groups
              for index, p in enumerate(group["params"]) if p is param]
    for params, index in places:
        params[index] = stand_in
    optimizer.state[stand_in] = state
    try:
        yield stand_in
    finally:
        for params, index in places:
            params[index] = param
        state = optimizer.state.pop(stand_in, {})
        total = stand_in.data
        if compensation is None:
            # Its own random stream, a function of the weight's place and how often it was rounded:
            # processes holding the same weights round alike, and a resumed run as the one it continues.
            generator = torch.Generator(device=weight.device).manual_seed(place * 1_000_003 + roundings)
            stochastic_round_(weight, total, generator)
            state[ROUNDINGS_DONE] = roundings + 1
        else:
            weight.copy_(total)
            compensation.copy_(total - weight.float())
            state[COMPENSATION] = compensation
        for key, value in moments.items():
            value.copy_(state[key])
            state[key] = value
        for (owner, name, value), fp32_copy in zip(held, copies, strict=True):
            now = getattr(owner, name)
            setattr(owner, name, value if now is fp32_copy else to_dtype(now, torch.bfloat16))
        optimizer.state[param] = state


def is_bf16(value: Any) -> bool:
    """A bf16 tensor, or a non-empty list of them (galore_torch's "full" projection factors)."""
    import torch

    if isinstance(value, list):
        return bool(value) and all(is_bf16(item) for item in value)
    return isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16


def to_dtype(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, list):
        return [item.to(dtype) for item in value]
    return value.to(dtype)



def stochastic_round_(target: torch.Tensor, value: torch.Tensor,
                      generator: torch.Generator | None = None) -> None:
    """Write fp32 ``value`` into bf16 ``target``, each element rounded up or down at random, the
    nearer neighbour the likelier: exact in expectation.

    bf16 is the top half of an fp32 bit pattern: adding uniform noise to the low 16 bits and
    dropping them rounds the magnitude up exactly when the noise carries into the kept bits.
    """
    import torch

    from lowmem.sharding import local

    target, value = local(target), local(value)  # FSDP: this process's slice, noise drawn for it
    bits = value.view(torch.int32)
    noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device,
                          generator=generator)
    rounded = (bits + noise).bitwise_and_(-(1 << 16)).view(torch.float32)
    # Infinities and NaNs pass unchanged: noise must not turn one into the other.
    target.copy_(torch.where(torch.isfinite(value), rounded, value))


def has_state(state: MutableMapping[str, Any] | None) -> bool:
    """Whether the optimizer has made its state for a weight: tensors or objects of its own (not
    lowmem's entries; not a number such as APOLLO's seed, set before any update). One that skips
    a weight's update (8-bit GaLore, until its gradient is non-zero) has made none yet."""
    import torch

    if not state:
        return False
    return any(isinstance(value, torch.Tensor) or hasattr(value, "__dict__")
               for key, value in state.items() if key not in (COMPENSATION, ROUNDINGS_DONE))


def compensation_bytes(parameters: Any, rounding: str = KAHAN) -> int:
    """The state lowmem adds to an optimizer's: with "kahan", a bf16 compensation per trainable
    bf16 weight; nothing otherwise."""
    import torch

    if rounding != KAHAN:
        return 0
    return sum(2 * p.numel() for p in parameters if p.requires_grad and p.dtype == torch.bfloat16)
