"""The training loop, written out in one function.

``run_training`` is what the CLI calls; ``train`` is the loop. It reads nothing but its
``TrainConfig``: no environment, no CLI objects, no optimizer or model names.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lowmem import memory, resume
from lowmem.api import CAUSAL_LM, CLASSIFICATION, ConfigError
from lowmem.assemble import Run, assemble
from lowmem.config import TrainConfig
from lowmem.distributed import DistContext
from lowmem.progress import Progress
from lowmem.registry import PluginFault, Registry
from lowmem.run_files import RunFiles, library_versions, print_summary

EXIT_OK, EXIT_PLUGIN_FAULT, EXIT_BAD_INPUT, EXIT_NONFINITE = 0, 1, 2, 3
EXIT_SIGNAL: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}


class NonFiniteError(RuntimeError):
    """Loss or gradient norm became NaN or infinite; the update was not applied."""


def run_training(config: TrainConfig, registry: Registry, environ: dict[str, str] | None = None) -> int:
    """Join the launcher's process group (if any), train, and turn failures into exit codes."""
    env = dict(os.environ) if environ is None else environ
    # Every rank meets the same bad input or non-finite loss: rank 0 alone says so.
    say = _stderr if env.get("RANK", "0") == "0" else (lambda message: None)
    try:
        dist = DistContext.from_launcher(env, want_cuda=config.device != "cpu")
    except ConfigError as exc:
        say(f"error: {exc}")
        return EXIT_BAD_INPUT
    # The default run folder is named by the clock: take rank 0's.
    config = dataclasses.replace(config, output_dir=dist.broadcast(config.output_dir))
    try:
        with stop_on_signals() as stop_requested:
            return train(config, registry, dist, stop_requested)
    except ConfigError as exc:
        say(f"error: {exc}")
        return EXIT_BAD_INPUT
    except NonFiniteError as exc:
        say(f"error: {exc}")
        return EXIT_NONFINITE
    except PluginFault as exc:
        say(f"error: {exc} (the last checkpoint is intact)")
        return EXIT_PLUGIN_FAULT
    finally:
        dist.close()


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM ask for a clean stop (finish the step, save, exit) instead of killing
    the process; the previous handlers come back afterwards, whatever happened."""
    requested: list[int] = []
    previous = {}
    for sig in EXIT_SIGNAL:
        try:
            previous[sig] = signal.signal(sig, lambda signum, frame: requested.append(signum))
        except ValueError:  # not the main thread (embedded use): no signal handling
            pass
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(config: TrainConfig, registry: Registry, dist: DistContext | None = None,
          stop_signal: list[int] | None = None) -> int:
    """Train as ``config`` says. ``stop_signal`` gets a signal number appended when the run
    should save and stop (see ``stop_on_signals``)."""
    import torch

    dist = dist or DistContext()
    stop_signal = [] if stop_signal is None else stop_signal
    run_dir = Path(config.output_dir)
    say = _stderr if dist.is_main else (lambda message: None)
    if dist.is_main:
        from lowmem.checkpoint import clean_stale

        clean_stale(run_dir)
    # A missing or corrupt checkpoint is bad input: found before any model is built.
    checkpoint_path = resume.resolve(config, say)
    run = assemble(config, registry, dist, warn=say)
    files = RunFiles(run_dir, is_main=dist.is_main, report_to=config.report_to)
    state = resume.TrainState()
    if checkpoint_path is not None:
        state = resume.load(run, checkpoint_path, dist, say)
        files.truncate_metrics(after_step=state.step)
        say(f"resumed from {checkpoint_path} at step {state.step} ({state.tokens:,} tokens)")
        if dist.is_main:
            from lowmem.checkpoint import set_aside_newer

            for moved in set_aside_newer(run_dir, checkpoint_path):
                say(f"note: a newer checkpoint of an abandoned continuation was kept as {moved}")
    trainable, total_params = memory.parameter_counts(run.model)
    files.write_config(config, {
        "device": str(run.device), "resolved_dtype": run.dtype, "world_size": dist.world_size, "objective": run.objective,
        "total_steps": run.total_steps, "warmup_steps": run.warmup_steps, "label_names": run.label_names,
        "versions": library_versions(), "plugins": {p.name: p.origin for p in registry.plugins},
    })

    from lowmem.data import count_tokens, train_batches

    pretraining = config.mode == "pretraining"
    progress = Progress(run.total_steps, enabled=dist.is_main)
    batches = iter(train_batches(run.data, state.epoch, skip=state.batch_in_epoch))
    grad_accum = config.grad_accum
    params = [p for p in run.model.parameters() if p.requires_grad]
    started = time.perf_counter() - state.wall_seconds
    last_log_time, last_log_tokens = time.perf_counter(), state.tokens
    losses_since_log: list[float] = []
    grad_bytes = 0
    fruitless_epochs = 0
    exit_code = EXIT_OK

    def start_next_epoch() -> None:
        nonlocal batches
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        batches = iter(train_batches(run.data, state.epoch))

    def next_micro_batch() -> Any:
        """The next batch of this rank, moving to the next epoch when one ends. None when the
        data is done (finetuning epochs) or any rank ran out (so all ranks stop together)."""
        with registry.guard(run.data.dataset, "records"):
            batch = next(batches, None)
            if batch is None and pretraining:  # pretraining cycles over the corpus until the budget
                start_next_epoch()
                batch = next(batches, None)
        if not dist.all_true(batch is not None, run.device):
            return None
        state.batch_in_epoch += dist.world_size
        return batch

    def done() -> bool:
        if state.step >= run.total_steps:
            return True
        if pretraining:
            return state.tokens >= config.num_training_tokens
        return state.epoch >= config.num_epochs

    try:
        run.train_model.train()
        while not done():
            # Gather the whole accumulation group first: every step then has exactly grad_accum
            # micro-batches (per-layer optimizers count them), and DDP knows which one syncs.
            group = []
            for _ in range(grad_accum):
                batch = next_micro_batch()
                if batch is None:
                    break
                group.append(batch)
            if len(group) < grad_accum:  # an epoch ended mid-group: drop the partial group
                fruitless_epochs += 1
                if fruitless_epochs > 1:  # a whole epoch cannot fill a single step: never loop forever
                    raise ConfigError(
                        f"the training data is too small: one epoch does not fill a step of {grad_accum} "
                        f"batch(es) of {config.batch_size} on each of {dist.world_size} process(es)")
                start_next_epoch()
                continue
            if pretraining:
                # The last step takes only the rows the token budget still needs (±1 block).
                remaining = config.num_training_tokens - state.tokens
                rows = math.ceil(remaining / (config.max_length * grad_accum * dist.world_size))
                group = [{k: v[:rows] for k, v in b.items()} for b in group]

            step_loss, step_tokens = 0.0, 0
            nonfinite = None
            for i, batch in enumerate(group):
                batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
                with dist.no_sync(run.train_model, sync=i == grad_accum - 1), run.autocast():
                    loss = run.train_model(**batch).loss
                # Check before backward: an optimizer that steps inside backward must never see it.
                if not dist.all_true(bool(torch.isfinite(loss)), run.device):
                    nonfinite = "loss"
                    break
                with dist.no_sync(run.train_model, sync=i == grad_accum - 1):
                    run.scaler.scale(loss / grad_accum).backward()
                step_loss += loss.item() / grad_accum
                step_tokens += count_tokens(batch)

            grad_norm = None  # not measurable when the optimizer steps inside backward
            if nonfinite is None and not run.steps_in_backward:
                grad_bytes = max(grad_bytes, memory.gradient_bytes(run.model))
                run.scaler.unscale_(run.optimizer)
                max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
                # With fp16 the GradScaler owns inf/NaN gradients: it skips the step and lowers the scale.
                if not math.isfinite(grad_norm) and not run.scaler.is_enabled():
                    nonfinite = "gradient norm"
            if nonfinite is not None:
                run.optimizer.zero_grad(set_to_none=True)
                state.nonfinite_skips += 1
                where = f"non-finite {nonfinite} at step {state.step + 1}"
                if config.on_nonfinite == "stop":
                    raise NonFiniteError(f"{where}; stopped before the update (last checkpoint kept intact)")
                if state.nonfinite_skips >= config.max_nonfinite_skips:
                    raise NonFiniteError(f"{where}; {state.nonfinite_skips} consecutive updates skipped, stopping")
                say(f"warning: {where}; update skipped")
                continue

            lr = run.scheduler.get_last_lr()[0]
            scale_before = run.scaler.get_scale() if run.scaler.is_enabled() else 0.0
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            # A step the loss scaler skipped does not advance the schedule.
            if not (run.scaler.is_enabled() and run.scaler.get_scale() < scale_before):
                run.scheduler.step()
            state.nonfinite_skips = fruitless_epochs = 0
            state.step += 1
            state.tokens += int(dist.sum(step_tokens, run.device))
            step_loss = dist.sum(step_loss, run.device) / dist.world_size
            losses_since_log.append(step_loss)

            if state.step % config.log_every == 0 or state.step == 1 or done():
                now = time.perf_counter()
                tps = (state.tokens - last_log_tokens) / max(now - last_log_time, 1e-9)
                row = {"step": state.step, "tokens": state.tokens, "loss": step_loss, "lr": lr,
                       "tokens_per_second": tps, "grad_norm": grad_norm,
                       "mean_loss": sum(losses_since_log) / len(losses_since_log)}
                files.log(row)
                progress.update(state.step, state.tokens, step_loss, lr, tps, _memory_now(run.device))
                last_log_time, last_log_tokens, losses_since_log = now, state.tokens, []
            if config.eval_every and state.step % config.eval_every == 0 and not done():
                files.log({"step": state.step, "tokens": state.tokens, **evaluate(run)})
            # All ranks stop at the same step, even when only one of them got the signal.
            stop_now = not dist.all_true(not stop_signal, run.device)
            if stop_now or (config.save_every and state.step % config.save_every == 0 and not done()):
                state.wall_seconds = time.perf_counter() - started
                resume.save(run, state, dist, run_dir)
            if stop_now:
                progress.close()
                say(f"stopped by signal at step {state.step}; checkpoint saved; continue with --resume latest "
                    f"--output-dir {run_dir}")
                exit_code = EXIT_SIGNAL.get(stop_signal[0] if stop_signal else signal.SIGTERM, 143)
                break

    except BaseException:
        files.close()
        raise
    finally:
        progress.close()
    if exit_code != EXIT_OK:
        files.close()
        return exit_code

    if state.step == 0:
        raise ConfigError("no training step was taken: the training data does not fill one step")
    dist.check_replicas(run.model)
    final_eval = evaluate(run)
    files.log({"step": state.step, "tokens": state.tokens, **final_eval})
    state.wall_seconds = time.perf_counter() - started
    resume.save(run, state, dist, run_dir)
    if dist.is_main:
        model_dir = run_dir / "model"
        with registry.guard(run.optimizer_plugin, "save_model"):
            run.optimizer_plugin.save_model(run.model, model_dir)
        run.tokenizer.save_pretrained(str(model_dir))
    last_losses = _logged_losses(files)
    summary = {
        "model": config.model, "optimizer": config.optimizer, "mode": config.mode,
        "final_loss": last_losses[-1] if last_losses else float("nan"),
        **final_eval,
        "steps": state.step, "tokens": state.tokens, "wall_seconds": state.wall_seconds,
        "tokens_per_second": state.tokens / max(state.wall_seconds, 1e-9),
        "param_bytes": memory.parameter_bytes(run.model), "grad_bytes": grad_bytes,
        "optimizer_state_bytes": memory.optimizer_state_bytes(run.optimizer),
        "trainable_params": trainable, "total_params": total_params,
        "peak_rss_bytes": memory.peak_rss_bytes(), **memory.cuda_peaks(run.device),
        "world_size": dist.world_size, "output_dir": str(run_dir),
    }
    files.write_summary(summary)
    files.close()
    if dist.is_main:
        print_summary(summary)
    return EXIT_OK


def evaluate(run: Run) -> dict[str, float | None]:
    """Loss over the held-out split weighted by real target tokens (padding excluded), with
    perplexity for language modelling and accuracy for classification."""
    import torch

    from lowmem.data import eval_batches

    run.train_model.eval()
    total_loss, total_targets, correct, examples = 0.0, 0, 0, 0
    with torch.no_grad():
        for batch in eval_batches(run.data, run.config.eval_batches):
            batch = {k: v.to(run.device) for k, v in batch.items()}
            with run.autocast():
                output = run.model(**batch)
            labels = batch["labels"]
            if run.objective == CLASSIFICATION:
                targets = labels.numel()
                correct += int((output.logits.argmax(-1) == labels).sum())
                examples += targets
            elif run.objective == CAUSAL_LM:  # the model predicts token t+1 from t
                targets = int((labels[:, 1:] != -100).sum())
            else:
                targets = int((labels != -100).sum())
            if targets:
                total_loss += float(output.loss) * targets
                total_targets += targets
    run.train_model.train()
    if total_targets == 0:  # an empty held-out split measures nothing: say so, never a perfect score
        return {"eval_loss": None, ("eval_accuracy" if run.objective == CLASSIFICATION else "eval_perplexity"): None}
    eval_loss = total_loss / total_targets
    if run.objective == CLASSIFICATION:
        return {"eval_loss": eval_loss, "eval_accuracy": correct / max(examples, 1)}
    return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 700.0))}


def _memory_now(device) -> int:
    if device.type == "cuda":
        import torch

        return int(torch.cuda.memory_allocated(device))
    return memory.current_rss_bytes()


def _logged_losses(files: RunFiles) -> list[float]:
    import json

    if not files.metrics_path.exists():
        return []
    rows = [json.loads(line) for line in files.metrics_path.read_text().splitlines() if line.strip()]
    return [row["loss"] for row in rows if "loss" in row]
