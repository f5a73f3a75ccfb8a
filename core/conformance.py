"""The machinery behind ``lowmem.testing``: a tiny check model on a private registry, a harness
that prepares, builds and steps an optimizer plugin through lowmem's own ``take_step``, and each
conformance check. See ``lowmem.testing`` for what the checks are."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lowmem.api import CAUSAL_LM, ModelRequest, Optimizer, OptimizerSettings
from lowmem.assemble import Run, warmup_cosine
from lowmem.check_model import CHECK_MODEL, VOCAB, check_registry
from lowmem.config import TrainConfig
from lowmem.distributed import DistContext
from lowmem.memory import iter_tensors, optimizer_state_bytes
from lowmem.resolve import merge_layers
from lowmem.step import take_step
from lowmem.text import first_line

PASS, FAIL, WARN = "pass", "fail", "warn"
CHECKS = ("loss falls", "state round trip", "bitwise resume", "state_bytes", "gradient accumulation",
          "lr schedule", "per-layer")
ROWS, LENGTH, SEED = 4, 16, 1234
LR, WEIGHT_DECAY, STEPS, SAVE_AT, FALL = 3e-3, 0.01, 30, 27, 0.02
RTOL, ATOL = 1e-5, 1e-6
Batch = dict[str, Any]
Params = dict[str, Any]


@dataclass(frozen=True)
class CheckResult:
    name: str  # one of CHECKS
    status: str  # PASS, FAIL or WARN
    reason: str = ""


class Harness:
    """Builds runs of one optimizer plugin on the check model, all from the same seed, and steps them."""

    def __init__(self, plugin: Optimizer, config: Mapping[str, Any]):
        self.plugin, self.config = plugin, dict(config)
        self.model_plugin = check_registry().model(CHECK_MODEL)
        self.batches: list[Batch] = []
        for i in range(4):
            ids = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=torch.Generator().manual_seed(SEED + i))
            self.batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})

    def settings(self, grad_accum: int = 1, config: Mapping[str, Any] | None = None) -> OptimizerSettings:
        return OptimizerSettings(
            lr=LR, weight_decay=WEIGHT_DECAY, config=dict(self.config if config is None else config),
            target_modules=tuple(self.model_plugin.target_modules), objective=CAUSAL_LM,
            grad_accum=grad_accum, max_grad_norm=0.0)

    def build(self, factor: Callable[[int], float], grad_accum: int = 1, train: bool = True,
              config: Mapping[str, Any] | None = None) -> Run:
        """A lowmem ``Run`` as ``take_step`` uses it (what it does not read is left None), from
        the seed: the model from its plugin, prepared and optimized by the optimizer plugin."""
        random.seed(SEED)
        torch.manual_seed(SEED)
        model = self.model_plugin.build(ModelRequest(objective=CAUSAL_LM, vocab_size=VOCAB))
        settings = self.settings(grad_accum, config)
        model = self.plugin.prepare_model(model, settings)
        optimizer = self.plugin.build(model, settings)
        model.train(train)
        required = {f.name: None for f in dataclasses.fields(Run)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        return Run(**{  # type: ignore[arg-type]
            **required, "model": model, "train_model": model, "optimizer": optimizer,
            "config": TrainConfig(mode="pretraining", optimizer=self.plugin.name or "check", lr=LR,
                                  model=CHECK_MODEL, dtype="fp32", grad_accum=grad_accum, max_grad_norm=0.0),
            "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "objective": CAUSAL_LM,
            "trainable_parameters": [p for p in model.parameters() if p.requires_grad],
            "steps_in_backward": bool(getattr(optimizer, "steps_in_backward", False)), "dtype": "fp32",
            "scaler": torch.amp.GradScaler("cpu", enabled=False), "device": torch.device("cpu"),
            "optimizer_plugin": self.plugin, "total_steps": STEPS, "warmup_steps": 0, "max_grad_norm": 0.0})

    def step(self, run: Run, group: list[Batch]) -> float:
        """One optimizer step through lowmem's own step; returns its loss."""
        result = take_step(run, group, DistContext(), stop_requested=False)
        if result.skipped is not None:
            raise RuntimeError(f"non-finite {result.skipped} at a step")
        return float(result.loss)

    def one_backward(self, run: Run, group: list[Batch]) -> None:
        """The reference for accumulation: one backward over the mean loss of ``group``."""
        sum(run.model(**batch).loss / len(group) for batch in group).backward()
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()


def constant(value: float) -> Callable[[int], float]:
    return lambda step: value


def params(run: Run) -> Params:
    return {n: p.detach().clone() for n, p in run.model.named_parameters()}


# -- the checks --------------------------------------------------------------------------------
def training_checks(h: Harness) -> list[CheckResult]:
    """loss falls, state round trip, bitwise resume and state_bytes: one run and its resume."""
    schedule = warmup_cosine(STEPS, 3, None, 0.1)
    run = h.build(schedule)
    losses: list[float] = []
    saved: dict[str, Any] = {}
    for step in range(STEPS):
        if step == SAVE_AT:
            saved = save(run)
        losses.append(h.step(run, [h.batches[step % 2]]))
    first, last = losses[0], sum(losses[-5:]) / 5
    trend = f"loss {first:.3f} -> {last:.3f} (mean of the last 5) over {STEPS} steps"
    falls = last < (1 - FALL) * first
    results = [CheckResult(CHECKS[0], PASS, trend) if falls else
               CheckResult(CHECKS[0], FAIL, f"{trend}: not {FALL:.0%} lower")]
    results += resume_checks(h, run, saved, schedule)
    declared, measured = h.plugin.state_bytes(run.model, h.settings()), optimizer_state_bytes(run.optimizer)
    if declared is None:
        results.append(CheckResult(CHECKS[3], WARN, f"unknown (None); measured {measured:,} bytes"))
    elif declared == measured:
        results.append(CheckResult(CHECKS[3], PASS, f"{measured:,} bytes, as measured"))
    else:
        off = (declared - measured) / max(measured, 1)
        results.append(CheckResult(CHECKS[3], FAIL, f"state_bytes() says {declared:,} bytes but the state "
                                   f"holds {measured:,} ({off:+.1%})"))
    return results


def save(run: Run) -> dict[str, Any]:
    """What a lowmem checkpoint holds, kept in memory."""
    state_dict, buffer = run.optimizer.state_dict(), io.BytesIO()
    odd = not_plain(state_dict, "state_dict()")
    if odd is None:
        torch.save(state_dict, buffer)
    return {"model": {k: v.clone() for k, v in run.model.state_dict().items()}, "odd": odd,
            "optimizer": buffer.getvalue(), "fingerprint": fingerprint(run.optimizer),
            "bytes": optimizer_state_bytes(run.optimizer), "rng": torch.get_rng_state(),
            "scheduler": json.dumps(run.scheduler.state_dict())}


def resume_checks(h: Harness, run: Run, saved: dict[str, Any], schedule: Callable[[int], float]
                  ) -> list[CheckResult]:
    try:
        if saved["odd"]:
            raise TypeError(f"{saved['odd']}, not a tensor or plain value")
        state = torch.load(io.BytesIO(saved["optimizer"]), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        reason = f"torch.load(weights_only=True) refuses the state: {first_line(exc)}"
        return [CheckResult(CHECKS[1], FAIL, reason), CheckResult(CHECKS[2], FAIL, reason)]
    resumed = h.build(schedule)
    resumed.model.load_state_dict(saved["model"])
    resumed.optimizer.load_state_dict(state)
    resumed.scheduler.load_state_dict(json.loads(saved["scheduler"]))
    torch.set_rng_state(saved["rng"])
    before, after = saved["fingerprint"], fingerprint(resumed.optimizer)
    had = f"{len(before)} state tensors ({saved['bytes']:,} bytes)"
    if after == before:
        trip = CheckResult(CHECKS[1], PASS, f"{had} come back bit for bit")
    else:
        kept, now = sum(x in before for x in after), optimizer_state_bytes(resumed.optimizer)
        trip = CheckResult(CHECKS[1], FAIL, f"of the {had} saved, {kept} come back from load_state_dict "
                           f"({now:,} bytes): state is lost or changed on save")
    for step in range(SAVE_AT, STEPS):
        h.step(resumed, [h.batches[step % 2]])
    differ = differing(params(run), params(resumed))
    if not differ:
        return [trip, CheckResult(CHECKS[2], PASS, f"saved at step {SAVE_AT}, identical at step {STEPS}")]
    return [trip, CheckResult(CHECKS[2], FAIL, f"saved at step {SAVE_AT} and resumed: at step {STEPS} "
                              f"{differ} differ from the uninterrupted run")]


def accumulation_checks(h: Harness) -> list[CheckResult]:
    """gradient accumulation, then per-layer mode against the same accumulated steps."""
    accumulated = h.build(constant(1.0), grad_accum=2, train=False)
    reference = h.build(constant(1.0), train=False)
    for step in range(2):
        h.step(accumulated, h.batches[2 * step:2 * step + 2])
        h.one_backward(reference, h.batches[2 * step:2 * step + 2])
    what = "2 steps of 2 micro-batches of 4 rows vs one backward over the 8 rows"
    accumulation = compare(CHECKS[4], what, params(accumulated), params(reference))
    return [accumulation, per_layer_check(h, accumulated)]


def per_layer_check(h: Harness, accumulated: Run) -> CheckResult:
    in_backward = accumulated.steps_in_backward
    if "per_layer" not in h.plugin.default_config:
        how = "it updates inside backward" if in_backward else "it steps after backward"
        return CheckResult(CHECKS[6], PASS, f"no 'per_layer' setting: lowmem refuses per-layer mode; {how}")
    if bool(h.config["per_layer"]) is not in_backward:
        return CheckResult(CHECKS[6], FAIL, f"per_layer is {h.config['per_layer']} but the built optimizer's "
                           f"steps_in_backward is {in_backward}")
    if in_backward:
        return CheckResult(CHECKS[6], PASS, "per_layer is true: every check above ran per layer")
    config = merge_layers(h.plugin, [("check-optimizer", {**h.config, "per_layer": True})])
    per_layer = h.build(constant(1.0), grad_accum=2, train=False, config=config)
    if not per_layer.steps_in_backward:
        return CheckResult(CHECKS[6], FAIL, "per_layer: true built an optimizer without steps_in_backward")
    for step in range(2):
        h.step(per_layer, h.batches[2 * step:2 * step + 2])
    what = "per_layer: true steps in backward; 2 steps of 2 micro-batches vs the normal mode"
    return compare(CHECKS[6], what, params(per_layer), params(accumulated))


def lr_check(h: Harness) -> CheckResult:
    run = h.build(lambda step: 1.0 if step == 0 else 0.0, train=False)
    start = params(run)
    h.step(run, [h.batches[0]])
    full = params(run)
    h.step(run, [h.batches[1]])
    if not differing(start, full):
        return CheckResult(CHECKS[5], FAIL, "a step at the full LR changed no parameter")
    moved = differing(full, params(run))
    if moved:
        return CheckResult(CHECKS[5], FAIL, f"a step at LR 0 in every param group still changed {moved}: the "
                           "optimizer does not use the LR the scheduler sets in param_groups")
    half = h.build(constant(0.5), train=False)
    h.step(half, [h.batches[0]])
    ratio = norm(params(half), start) / max(norm(full, start), 1e-30)
    if not 0.4 <= ratio <= 0.6:
        return CheckResult(CHECKS[5], FAIL, f"half the LR scaled the update by {ratio:.3f}, not 0.5: the "
                           "optimizer does not use the LR the scheduler sets in param_groups")
    return CheckResult(CHECKS[5], PASS, f"LR 0 changes nothing; half the LR gives {ratio:.3f} of the update")


def guarded(names: tuple[str, ...], run: Callable[[], list[CheckResult]]) -> list[CheckResult]:
    """What ``run`` finds, or each of ``names`` failed with the reason when it raises."""
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - a plugin's exception is a failed check
        return [CheckResult(name, FAIL, f"{type(exc).__name__}: {first_line(exc)}") for name in names]


# -- helpers -----------------------------------------------------------------------------------
def fingerprint(optimizer: Any) -> list[tuple[str, tuple[int, ...], str]]:
    """(dtype, shape, digest) of every tensor in ``optimizer.state``, sorted: equal lists mean
    equal state, whatever order it is stored in."""
    found = []
    for tensor in iter_tensors(list(optimizer.state.values())):
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        found.append((str(tensor.dtype), tuple(tensor.shape), hashlib.sha1(data).hexdigest()))
    return sorted(found)


def not_plain(value: Any, where: str) -> str | None:
    """Where ``value`` holds something other than tensors, plain values and containers."""
    if isinstance(value, torch.Tensor | str | int | float | bool | None):
        return None
    if isinstance(value, dict | list | tuple):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        return next((odd for key, item in items if (odd := not_plain(item, f"{where}[{key!r}]"))), None)
    return f"{where} is a {type(value).__qualname__}"


def norm(after: Params, before: Params) -> float:
    """The norm of the parameter change from ``before`` to ``after``."""
    return sum(float((after[n].double() - before[n].double()).square().sum()) for n in after) ** 0.5


def differing(a: Params, b: Params) -> str:
    """'N of M parameter tensors (largest difference X)', or '' when all are bitwise equal."""
    names = [n for n in a if not torch.equal(a[n], b[n])]
    if not names:
        return ""
    largest = max(float((a[n].double() - b[n].double()).abs().max()) for n in names)
    return f"{len(names)} of {len(a)} parameter tensors (largest difference {largest:.3g})"


def compare(name: str, what: str, got: Params, want: Params) -> CheckResult:
    if all(torch.equal(got[n], want[n]) for n in want):
        return CheckResult(name, PASS, f"{what}: bitwise equal")
    if all(torch.allclose(got[n], want[n], rtol=RTOL, atol=ATOL) for n in want):
        return CheckResult(name, PASS, f"{what}: equal within rtol {RTOL:g}, atol {ATOL:g}")
    return CheckResult(name, FAIL, f"{what}: {differing(got, want)} differ beyond rtol {RTOL:g}, "
                       f"atol {ATOL:g}")
