"""Checkpoints of a run: what one holds, saving it, finding the one to resume, and continuing
from it bit for bit. The training loop talks to this module alone; the folder mechanics
(atomic writes, checksums, rotation) are in ``lowmem.checkpoint_files``.

Model weights go to safetensors; optimizer state to a ``torch.save`` of tensors and plain values
(read back with ``weights_only=True``); counters, schedule, loss scaler and config to JSON;
RNG states of every rank to tensors. Together they let a resumed run repeat exactly what the
uninterrupted run would have done.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from lowmem import checkpoint_files as files
from lowmem import checkpoint_sharded as sharded
from lowmem.config import TrainConfig
from lowmem.errors import CheckpointError, ConfigError
from lowmem.text import first_line

# Changing these would make the saved state meaningless for the new run.
# lr and weight_decay live in the saved optimizer and schedule, so a new value would be ignored.
MUST_MATCH = ("mode", "optimizer", "model", "dataset", "dataset_source", "batch_size", "max_length",
              "grad_accum", "optimizer_config", "dtype", "seed", "shuffle", "tokenizer", "model_path",
              "lr", "weight_decay", "min_lr_ratio", "decay_norms_and_biases")


@dataclass
class TrainState:
    """Counters that say where the run is. ``batch_in_epoch`` counts global batches."""

    step: int = 0
    tokens: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    nonfinite_skips: int = 0
    wall_seconds: float = 0.0  # the whole run so far
    train_seconds: float = 0.0  # training steps only: no model build, evaluation or saving
    # Under --compile, each process's first step compiles the model: its time, tokens and count
    # are kept apart, so the speed figures measure the compiled steps.
    compile_seconds: float = 0.0
    compile_tokens: int = 0
    compile_steps: int = 0


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    version, keys, gauss = random.getstate()
    np_state: Any = np.random.get_state()
    return {
        "python": [version, list(keys), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run, state: TrainState, dist) -> Path | None:
    """Every rank calls this; rank 0 writes the folder (under --parallel fsdp every rank writes
    its shards into it first). Returns its path on rank 0."""
    import safetensors.torch

    run_dir = Path(run.config.output_dir)
    rng_per_rank = dist.gather(_rng_state())

    def write(folder: Path, layout: dict[str, Any] | None = None) -> None:
        if layout is None:
            safetensors.torch.save_model(run.model, str(folder / "model.safetensors"))
            files.save_tensors(folder / "optimizer.pt", run.optimizer.state_dict())
        else:
            sharded.write_layout(folder, layout)
        files.save_tensors(folder / "rng.pt", rng_per_rank)
        (folder / "trainer_state.json").write_text(json.dumps({
            "state": asdict(state),
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "world_size": dist.world_size,
            "resolved_dtype": run.dtype,
            "config": run.config.to_json(),
        }, indent=1))
        run.tokenizer.save_pretrained(str(folder / "tokenizer"))

    if run.config.parallel == "fsdp":
        return save_sharded(run, state, dist, write)
    path, error = None, None
    if dist.is_main:
        try:
            path = files.save(run_dir, state.step, write, run.config.keep_checkpoints)
        except CheckpointError as exc:
            error = str(exc)
    raise_on_every_rank(dist, error)
    return path


def save_sharded(run, state: TrainState, dist, write) -> Path | None:
    """Rank 0 makes the temporary folder, every rank writes its shards into it, rank 0 adds the
    rest (``write``), the manifest, and renames it; a failure anywhere stops every rank."""
    run_dir, tmp, error = Path(run.config.output_dir), None, None
    if dist.is_main:
        try:
            tmp = str(files.begin(run_dir, state.step))
        except OSError as exc:
            error = f"could not write checkpoint under {run_dir}: {exc.strerror or exc}"
    tmp, error = dist.broadcast((tmp, error))
    if error:
        raise CheckpointError(error)
    layout = None
    try:
        layout = sharded.save_shards(run, Path(tmp))
    except Exception as exc:  # noqa: BLE001 - OSError and DCP's own errors alike
        error = f"could not write the shards of checkpoint {tmp}: {first_line(exc)}"
    errors, path = [e for e in dist.gather(error) if e], None
    if dist.is_main:
        if errors:
            shutil.rmtree(tmp, ignore_errors=True)
            error = errors[0]
        else:
            try:
                path = files.complete(run_dir, state.step, Path(tmp), lambda f: write(f, layout),
                                      run.config.keep_checkpoints)
            except CheckpointError as exc:
                error = str(exc)
    raise_on_every_rank(dist, error)
    return path


def raise_on_every_rank(dist, error: str | None) -> None:
    """Every rank learns whether rank 0's part of a save worked, so all stop together instead of
    some hanging in the next collective."""
    error = dist.broadcast(error)
    if error:
        raise CheckpointError(error)


def step_size_error(before: int, after: int, batch_size: int, world_size: int) -> str:
    """Why a resume on ``world_size`` processes cannot take the checkpoint's step of ``before``
    sequences, and what can: the batch size stays (it decides which sequences form a batch),
    the micro-batches per step make up the rest."""
    reason = (f"cannot resume: a step of the checkpoint took {before} sequences, with {world_size} "
              f"process(es) it would take {after}")
    if before % (batch_size * world_size) == 0:
        return f"{reason}; use --grad-accum {before // (batch_size * world_size)}"
    ways = [f"{n} process(es) with --grad-accum {before // (batch_size * n)}"
            for n in range(1, before // batch_size + 1) if before % (batch_size * n) == 0]
    return (f"{reason}; at --batch_size {batch_size} (the checkpoint's) {world_size} processes cannot take "
            f"{before}: resume on {', or '.join(ways)}")


def check_compatible(saved: dict[str, Any], config: TrainConfig, world_size: int, saved_world: int,
                     say, same_precision: bool = False) -> None:
    """``same_precision``: the checkpoint's resolved dtype is this run's, so ``--dtype auto``
    and the dtype it resolved to (or the reverse) are one setting."""
    current = config.to_json()
    changed = [key for key in MUST_MATCH if saved.get(key) != current.get(key)
               and not (key == "dtype" and same_precision)]
    if saved_world != world_size:
        # Checkpoints load into any number of processes (DDP's are whole, FSDP's are sliced by
        # DCP); the step must keep its size.
        before, after = (c["batch_size"] * c["grad_accum"] * n for c, n in ((saved, saved_world),
                                                                            (current, world_size)))
        if before != after:
            raise ConfigError(step_size_error(before, after, saved["batch_size"], world_size))
        changed = [key for key in changed if key != "grad_accum"]
    if saved.get("dtype") == "bf16-pure" and saved.get("bf16_rounding") != current.get("bf16_rounding"):
        # Kahan's compensation is part of the saved optimizer state; another rounding would
        # either carry it along unused or need one it never kept.
        changed.append("bf16_rounding")
    if changed:
        details = "; ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed)
        raise ConfigError(f"cannot resume: the checkpoint was made with other settings ({details})")
    harmless = [key for key in current if key not in MUST_MATCH and key not in ("resume", "output_dir")
                and saved.get(key) != current.get(key)]
    if harmless:
        say(f"note: resuming with changed settings: {', '.join(harmless)}")


def load(run, path: Path, dist, say) -> TrainState:
    """Restore everything ``save`` wrote into the assembled run; returns the counters."""
    import safetensors.torch

    meta = json.loads((path / "trainer_state.json").read_text())
    saved_dtype = meta.get("resolved_dtype", meta["config"].get("dtype"))
    check_compatible(meta["config"], run.config, dist.world_size, meta["world_size"], say,
                     same_precision=saved_dtype == run.dtype)
    if meta["world_size"] != dist.world_size and not run.optimizer_plugin.reshards:
        raise ConfigError(f"cannot resume: optimizer {run.config.optimizer!r} keeps its state per process "
                          f"slice, so its checkpoint loads only into {meta['world_size']} process(es)")
    if meta.get("resolved_dtype", run.dtype) != run.dtype:  # --dtype auto can resolve differently elsewhere
        raise ConfigError(f"cannot resume: the checkpoint trained in {meta['resolved_dtype']}, this run "
                          f"would use {run.dtype}; pass --dtype {meta['resolved_dtype']}")
    if run.config.parallel == "fsdp" and meta["config"].get("parallel") == "fsdp":
        sharded.load_shards(run, path)
    elif run.config.parallel == "fsdp":  # written whole: sliced here
        sharded.load_whole(run, path)
    else:
        missing, unexpected = safetensors.torch.load_model(
            run.model, str(path / "model.safetensors"), strict=False, device=str(run.device))
        if missing or unexpected:
            raise CheckpointError(f"{path / 'model.safetensors'} does not match the model "
                                  f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
        run.optimizer.load_state_dict(files.load_tensors(path / "optimizer.pt"))
    run.scheduler.load_state_dict(meta["scheduler"])
    follow_schedule(run.scheduler)
    run.scaler.load_state_dict(meta["scaler"])
    rng = files.load_tensors(path / "rng.pt")
    _set_rng_state(rng[dist.rank] if dist.rank < len(rng) else rng[0])
    if dist.is_main:
        # Resuming from an older checkpoint abandons the newer ones: set them aside, never delete.
        for moved in files.set_aside_newer(Path(run.config.output_dir), path):
            say(f"note: a newer checkpoint of an abandoned continuation was kept as {moved}")
    return TrainState(**meta["state"])


def follow_schedule(scheduler: Any) -> None:
    """The next step's learning rate from this run's schedule, as its own ``step()`` sets it: the
    saved optimizer groups hold the rate of the saved schedule, which a resume with another
    ``--max-steps`` or token budget changes. (The same schedule gives the same bits.)"""
    pairs = zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    rates = [base * factor(scheduler.last_epoch) for base, factor in pairs]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports, as after a step


def find(config: TrainConfig, say) -> Path | None:
    """The checkpoint ``config.resume`` names, verified; None when not resuming. A missing or
    corrupt checkpoint is bad input, found before any model is built."""
    if not config.resume:
        return None
    try:
        return files.find(config.resume, Path(config.output_dir), say)
    except OSError as exc:
        raise ConfigError(f"cannot read checkpoint {config.resume}: {exc}") from None


def continue_as_saved(config: TrainConfig, path: Path | None, say) -> TrainConfig:
    """A sharded checkpoint resumes sharded: only FSDP reads its slices (into any number of
    processes), so a resume that left ``--parallel`` at ddp (one process continuing a run of
    several, say) continues under fsdp, and says so."""
    if path is None or config.parallel == "fsdp":
        return config
    saved = json.loads((path / "trainer_state.json").read_text())["config"]
    if saved.get("parallel") != "fsdp":
        return config
    say("note: the checkpoint is sharded (--parallel fsdp), so the run continues sharded")
    return replace(config, parallel="fsdp")


def clean_folder(run_dir: Path) -> None:
    """Before training (rank 0): remove the temporary folders killed saves left behind."""
    files.clean_stale(run_dir)


def export_model(run, directory: Path, is_main: bool = True) -> None:
    """The trained model in Hugging Face format, written by the optimizer plugin (LoRA merges
    its adapters), with the tokenizer beside it. Every rank calls this: a sharded model is
    gathered first, and rank 0 writes it."""
    model = sharded.gathered_model(run) if run.plain_model is not None else run.model
    if not is_main:
        return
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = True  # training switched it off; generation wants it
    with run.registry.guard(run.optimizer_plugin, "save_model"):
        run.optimizer_plugin.save_model(model, directory)
    run.tokenizer.save_pretrained(str(directory))
