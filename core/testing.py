"""Conformance checks for optimizer plugins: ``lowmem check-optimizer NAME``; in a plugin's own tests,
``from lowmem.testing import check_optimizer, assert_conforms``.

A tiny LLaMA (2 layers, width 128 so GaLore's default rank fits, vocabulary 128, 16-token rows),
registered on a private registry, is prepared and optimized by the plugin from its merged settings
and stepped by lowmem's ``take_step`` under a ``LambdaLR``, on one CPU thread, from one seed:

* loss falls: the mean of the last 5 of 30 losses (two fixed batches) is 2% below the first.
* state round trip: ``state_dict()`` at step 27 holds only tensors and plain values, loads with
  ``torch.load(weights_only=True)`` and restores every state tensor bit for bit.
* bitwise resume: weights, state, schedule (as JSON) and RNG saved at step 27, loaded into a new
  run, give the uninterrupted run's parameters at step 30 exactly.
* state_bytes: ``Optimizer.state_bytes`` equals ``lowmem.memory.optimizer_state_bytes``; None warns.
* gradient accumulation: 2 steps of 2 micro-batches (``grad_accum`` 2) against one backward over
  both micro-batches' mean loss, i.e. one 8-row batch's gradient summed as accumulation sums it:
  the optimizer gets bitwise the same gradient, so the bar is fp32 rounding (rtol 1e-5, atol 1e-6).
  (A forward pass over 8 rows adds ~1e-7 of summation-order noise, which GaLore's SVD and 8-bit
  rounding amplify to several % of an update: the bar would have to be too loose to catch faults.)
* lr schedule: a step at LR 0 (set by the schedule) changes nothing, half the LR gives half the
  update; optimizers that step in backward read the LR the scheduler set after the previous step.
* per-layer: ``per_layer: true`` (where the setting exists) steps in backward and matches the normal
  mode's accumulated steps; without the setting lowmem refuses per-layer mode (exit 2).

Dropout is on in the loss and resume runs (RNG restored) and off where two runs are compared.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch

from lowmem.api import Optimizer
from lowmem.conformance import (
    CHECKS,
    FAIL,
    PASS,
    WARN,
    CheckResult,
    Harness,
    accumulation_checks,
    guarded,
    lr_check,
    training_checks,
)
from lowmem.registry import Registry, get_registry
from lowmem.resolve import merge_layers

__all__ = ["CHECKS", "FAIL", "PASS", "WARN", "CheckResult", "assert_conforms", "check_optimizer"]


# -- the entry points --------------------------------------------------------------------------
def check_optimizer(optimizer: str | Optimizer, config: Mapping[str, Any] | None = None,
                    registry: Registry | None = None) -> list[CheckResult]:
    """Every check on ``optimizer`` (a registered name, or a plugin object) with its
    ``default_config`` overlaid by ``config``: one ``CheckResult`` per name in ``CHECKS``.

    Raises ``ConfigError`` for an unknown name or settings lowmem refuses; an exception inside a
    check fails that check, with the exception as the reason. The caller's torch thread count and
    torch and Python RNG states are restored afterwards.
    """
    if isinstance(optimizer, str):
        optimizer = (registry or get_registry()).optimizer(optimizer)
    harness = Harness(optimizer, merge_layers(optimizer, [("config", dict(config))] if config else []))
    threads, torch_rng, python_rng = torch.get_num_threads(), torch.get_rng_state(), random.getstate()
    torch.set_num_threads(1)  # tiny matrices: fastest on one thread, and CPU results repeat bit for bit
    try:
        results = guarded(CHECKS[:4], lambda: training_checks(harness))
        results += guarded((CHECKS[4], CHECKS[6]), lambda: accumulation_checks(harness))
        results += guarded(CHECKS[5:6], lambda: [lr_check(harness)])
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(torch_rng)
        random.setstate(python_rng)
    return sorted(results, key=lambda r: CHECKS.index(r.name))


def assert_conforms(optimizer: str | Optimizer, config: Mapping[str, Any] | None = None,
                    registry: Registry | None = None) -> list[CheckResult]:
    """``check_optimizer``, raising AssertionError with a line per failed check; returns the
    results (warnings included) when none failed."""
    results = check_optimizer(optimizer, config, registry)
    failed = [f"{r.name}: {r.reason}" for r in results if r.status == FAIL]
    if failed:
        raise AssertionError("the optimizer does not conform:\n" + "\n".join(failed))
    return results
