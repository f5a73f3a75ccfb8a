"""``lowmem.train``: a run from its config to its result, in three parts read top to bottom.

prepare (resolve the config, build the run, resume) -> the step loop -> finish (final
evaluation, checkpoint, exported model, summary). The loop reads nothing but the config: no
environment, no CLI objects, no optimizer or model names; each step is ``lowmem.step.take_step``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lowmem import checkpoint, memory
from lowmem.assemble import Run, assemble, parameter_groups
from lowmem.batching import TrainBatches
from lowmem.checkpoint import TrainState
from lowmem.config import TrainConfig
from lowmem.distributed import DistContext
from lowmem.errors import ConfigError, Interrupted, NonFiniteError
from lowmem.evaluation import evaluate
from lowmem.progress import Progress
from lowmem.registry import Registry, get_registry
from lowmem.resolve import resolve_config
from lowmem.result import RunResult
from lowmem.run_files import RunFiles, library_versions
from lowmem.sharding import check_shards
from lowmem.step import take_step

Say = Callable[[str], None]


def train(config: TrainConfig, registry: Registry | None = None, say: Say | None = None) -> RunResult:
    """Train as ``config`` says and return the run's figures (also written to summary.json).

    Raises ``ConfigError`` for input it cannot use (before any model is built where possible),
    ``NonFiniteError``, ``PluginFault``, ``Interrupted`` (SIGINT/SIGTERM: a checkpoint was
    saved); never exits the process. Under torchrun or accelerate it joins their process group.
    ``say`` receives notes and warnings (default: stderr, rank 0 only).
    """
    registry = registry or get_registry()
    dist = DistContext.from_launcher(dict(os.environ), want_cuda=config.device != "cpu")
    say = say or (_stderr if dist.is_main else _silent)
    completed = False
    try:
        config = resolve_config(config, registry, say)
        # The default run folder is named by the clock: take rank 0's.
        config = dataclasses.replace(config, output_dir=dist.broadcast(config.output_dir))
        with stop_on_signals() as stop_requested:
            result = run(config, registry, dist, stop_requested, say)
        completed = True
        return result
    finally:
        dist.close(completed)


def run(config: TrainConfig, registry: Registry, dist: DistContext, stop_requested: list[int],
        say: Say) -> RunResult:
    """Prepare, loop, finish. ``stop_requested`` gets a signal number appended when the run
    should save and stop (see ``stop_on_signals``)."""
    started = time.perf_counter()
    run_dir = Path(config.output_dir)
    resume_from = checkpoint.find(config, say)
    config = checkpoint.continue_as_saved(config, resume_from, say)
    if dist.is_main:
        checkpoint.clean_folder(run_dir)
    job = assemble(config, registry, dist, say)
    state = TrainState()
    with RunFiles(run_dir, is_main=dist.is_main, report_to=config.report_to) as files:
        if resume_from is not None:
            state = checkpoint.load(job, resume_from, dist, say)
            done = finished(job, state)
            if done and state.step > job.total_steps:
                raise ConfigError(f"cannot resume: {resume_from.name} is at step {state.step}, past this "
                                  f"run's last step {job.total_steps}; raise the budget (--max-steps, "
                                  "--num-training-tokens, --num-epochs) or start a new --output-dir")
            saved = files.saved_summary()
            if done and saved is not None and saved.get("steps") == state.step:
                say(f"the run in {run_dir} already finished at step {state.step}: nothing to train")
                return RunResult.from_json(saved)
            # A run stopped inside finish() left its final evaluation row: finish logs it again.
            files.truncate_metrics(after_step=state.step, keep_evaluation=not done)
            say(f"resumed from {resume_from} at step {state.step} ({state.tokens:,} tokens)")
        started -= state.wall_seconds
        files.write_config(config, run_facts(job, dist, registry))
        last_loss = train_loop(job, state, files, dist, stop_requested, say, started)
        return finish(job, state, files, dist, started, last_loss)


def train_loop(job: Run, state: TrainState, files: RunFiles, dist: DistContext, stop_requested: list[int],
               say: Say, started: float) -> float | None:
    """Optimizer steps until the budget is spent; returns the last step's loss."""
    config = job.config
    batches = TrainBatches(job, state, dist.world_size)
    pending: list[Any] = []  # step losses on the device since the last log row
    logged_at = (state.train_seconds, state.tokens)
    last_loss = None
    compiling = config.compile  # this process's first step compiles: timed apart (TrainState)
    with Progress(job.total_steps, enabled=dist.is_main) as progress:
        job.train_model.train()
        while not finished(job, state):
            began = time.perf_counter()
            group = batches.group(config.grad_accum, trim_to=tokens_left(job, state, dist.world_size))
            if group is None:
                continue  # an epoch ended mid-group; TrainBatches moved on to the next one
            result = take_step(job, group, dist, stop_requested=bool(stop_requested))
            if result.skipped is not None:
                state.nonfinite_skips += 1
                where = f"non-finite {result.skipped} at step {state.step + 1}"
                update = "the rest of the update" if result.partial else "the update"
                if config.on_nonfinite == "stop":
                    raise NonFiniteError(f"{where}; stopped before {update} (last checkpoint kept intact)")
                if state.nonfinite_skips >= config.max_nonfinite_skips:
                    raise NonFiniteError(
                        f"{where}; {state.nonfinite_skips} consecutive updates skipped, stopping")
                say(f"warning: {where}; {'the rest of the ' if result.partial else ''}update skipped")
            else:
                state.nonfinite_skips = batches.fruitless_epochs = 0
                state.step += 1
                state.tokens += result.tokens
                pending.append(result.loss)
            if pending and (state.step % config.log_every == 0 or state.step == 1 or finished(job, state)):
                losses = [float(x) for x in _host(pending)]
                last_loss, pending = losses[-1], []
                seconds, tokens = state.train_seconds + time.perf_counter() - began, state.tokens
                tps = (tokens - logged_at[1]) / max(seconds - logged_at[0], 1e-9)
                files.log({"step": state.step, "tokens": tokens, "loss": last_loss, "lr": result.lr,
                           "tokens_per_second": tps, "grad_norm": _float(result.grad_norm),
                           "mean_loss": sum(losses) / len(losses)})
                progress.update(state.step, tokens, last_loss, result.lr, tps, memory.now_bytes(job.device))
                logged_at = (seconds, tokens)
            if compiling:
                state.compile_seconds += time.perf_counter() - began
                if result.skipped is None:
                    state.compile_tokens += result.tokens
                    state.compile_steps += 1
                logged_at, compiling = (state.train_seconds, state.tokens), False
            else:
                state.train_seconds += time.perf_counter() - began
            if result.stop:
                state.wall_seconds = time.perf_counter() - started
                checkpoint.save(job, state, dist)
                signum = stop_requested[0] if stop_requested else signal.SIGTERM
                raise Interrupted(f"stopped by signal at step {state.step}; checkpoint saved; continue with "
                                  f"--resume latest --output-dir {config.output_dir}", signum)
            if result.skipped is None and not finished(job, state):
                if config.eval_every and state.step % config.eval_every == 0:
                    files.log({"step": state.step, "tokens": state.tokens, **evaluate(job)})
                if config.save_every and state.step % config.save_every == 0:
                    state.wall_seconds = time.perf_counter() - started
                    checkpoint.save(job, state, dist)
    return last_loss


def finish(job: Run, state: TrainState, files: RunFiles, dist: DistContext, started: float,
           last_loss: float | None) -> RunResult:
    """Final evaluation, the last checkpoint, the exported model, and the result."""
    config = job.config
    if state.step == 0:
        raise ConfigError("no training step was taken: the training data does not fill one step")
    if config.parallel == "fsdp":
        check_shards(job.model, job.optimizer, dist)  # shards differ by design; the rest must not
    else:
        dist.check_replicas(job.model)
    final_eval: dict[str, Any] = dict(evaluate(job))  # eval_loss, eval_perplexity and the task metrics
    files.log({"step": state.step, "tokens": state.tokens, **final_eval})
    state.wall_seconds = time.perf_counter() - started
    checkpoint.save(job, state, dist)
    checkpoint.export_model(job, Path(config.output_dir) / "model", dist.is_main)
    if last_loss is None:  # resumed at the very end: the last loss is in the log
        last_loss = (files.logged_losses() or [float("nan")])[-1]
    trainable, total_params = memory.parameter_counts(job.model)
    peaks = memory.cuda_peaks(job.device)
    result = RunResult(
        model=config.model, optimizer=config.optimizer, mode=config.mode, output_dir=config.output_dir,
        steps=state.step, tokens=state.tokens, final_loss=last_loss, **final_eval,
        wall_seconds=time.perf_counter() - started, **speed(state),
        **memory.run_figures(job.model, job.optimizer, job.grad_bytes,
                             peaks.get("peak_allocated_bytes", memory.peak_rss_bytes()), dist.gather),
        trainable_params=trainable, total_params=total_params, peak_rss_bytes=memory.peak_rss_bytes(),
        peak_allocated_bytes=peaks.get("peak_allocated_bytes"),
        peak_reserved_bytes=peaks.get("peak_reserved_bytes"),
        world_size=dist.world_size, parallel=config.parallel,
    )
    files.write_summary(result.to_json())
    return result


# -- the loop's helpers ----------------------------------------------------------------------
def finished(job: Run, state: TrainState) -> bool:
    if state.step >= job.total_steps:
        return True
    if job.config.mode == "pretraining":
        return state.tokens >= job.config.num_training_tokens
    return state.epoch >= job.config.num_epochs


def speed(state: TrainState) -> dict[str, Any]:
    """train_seconds, tokens_per_second and step_seconds, on the steps that did not compile
    (on all of them where every step compiled: a run of one step per process)."""
    seconds, tokens, steps = state.train_seconds, state.tokens - state.compile_tokens, \
        state.step - state.compile_steps
    if steps <= 0:
        seconds, tokens, steps = seconds + state.compile_seconds, state.tokens, state.step
    return {"train_seconds": state.train_seconds, "tokens_per_second": tokens / max(seconds, 1e-9),
            "step_seconds": seconds / steps,
            "compile_seconds": state.compile_seconds if state.compile_steps else None}


def tokens_left(job: Run, state: TrainState, world_size: int) -> int | None:
    """Pretraining's last step takes only the rows the token budget still needs (±1 block)."""
    if job.config.mode != "pretraining":
        return None
    remaining = job.config.num_training_tokens - state.tokens
    return -(-remaining // (job.config.max_length * job.config.grad_accum * world_size))


def run_facts(job: Run, dist: DistContext, registry: Registry) -> dict[str, Any]:
    """What config.json adds to the config: what was really built and where. The optimizer's
    groups say which parameters are projected, and after its first step (when it has state) which
    are quantised (``lowmem.run_files.optimizer_facts``): nothing falls back silently."""
    from lowmem.run_files import optimizer_facts, plugin_origins, record_after_first_step

    def optimizer() -> dict[str, Any]:
        return optimizer_facts(job.model, job.optimizer, parameter_groups(job.model, job.optimizer))

    config_file = Path(job.config.output_dir) / "config.json"
    record_after_first_step(job.optimizer, optimizer, config_file if dist.is_main else None)
    return {
        "device": str(job.device), "resolved_dtype": job.dtype, "world_size": dist.world_size,
        "objective": job.objective, "total_steps": job.total_steps, "warmup_steps": job.warmup_steps,
        "applied_max_grad_norm": job.max_grad_norm, "applied_lean_loss": job.lean_head is not None,
        "label_names": job.label_names, "data_kind": job.kind, "target_modules": list(job.target_modules),
        **optimizer(), "versions": library_versions(), "plugin_origins": plugin_origins(registry, job.config),
        "plugins": {p.name: p.origin for p in registry.plugins},
    }


@contextmanager
def stop_on_signals() -> Iterator[list[int]]:
    """SIGINT and SIGTERM ask for a clean stop (finish the step, save, stop) instead of killing
    the process; the previous handlers come back afterwards, whatever happened."""
    requested: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, lambda signum, frame: requested.append(signum))
        except ValueError:  # not the main thread (embedded use): no signal handling
            pass
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _host(tensors: list[Any]) -> list[float]:
    import torch

    return torch.stack(tensors).tolist()


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _silent(message: str) -> None:
    pass
