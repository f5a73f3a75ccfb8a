"""One measured training run in this process; prints one JSON line. Called by common.run_worker.

kind "lowmem": lowmem's real loop (lowmem.train with a TrainConfig), step throughput read
from its metrics.jsonl (log_every=1: tokens/s between consecutive steps, so data loading,
clipping and logging are all inside the measurement).
kind "trainer": Hugging Face Trainer on the same model, tokenizer and batches (lowmem's packed
stdlib-docs blocks, tokenized once by lowmem's pipeline), timed from one step end to the next.
kind "plain": a plain torch loop (forward, backward, clip, fused AdamW, LambdaLR) on the same
model and batches, timed from one step end to the next (section 7).
kind "sequence": several of the above, alternated within this one process (section 7).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE_DIR  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# Benchmark models: LLaMA layers (llama_shape: width, MLP, layers, heads), 8,000-token vocabulary.
SHAPES = {
    # llama_60m's layers, 2 deep: the full model runs 15-25 s/step on two shared cores.
    "llama_60m_small": ("llama_60m layers, 2 deep, vocab 8000 (benchmarks)", (512, 1376, 2, 8)),
    "llama_tiny": ("width 256, MLP 688, 4 heads, 2 layers, vocab 8000 (step overhead)", (256, 688, 2, 4)),
    "llama_micro": ("width 32, MLP 64, 4 heads, 2 layers, vocab 8000 (fixed step cost)", (32, 64, 2, 4)),
}


def small_llama_plugin():
    """A plugin registering the SHAPES models."""
    import lowmem
    from lowmem.plugins.models.llama import Llama, llama_shape

    models = [type(name, (Llama,), {"name": name, "description": description, "vocab_size": 8000,
                                    "hf_config": llama_shape(*shape)})()
              for name, (description, shape) in SHAPES.items()]

    class Plugin:
        @lowmem.hookimpl
        def register_models(self, register):
            for model in models:
                register(model)

    return Plugin()


def registry():
    from lowmem.registry import load_registry

    return load_registry("", extra=[small_llama_plugin()])


def peak_rss() -> int:
    from lowmem.memory import peak_rss_bytes

    return peak_rss_bytes()


def lowmem_run(spec: dict) -> dict:
    import lowmem

    warm, steps = spec["warmup"], spec["steps"]
    with tempfile.TemporaryDirectory(prefix="lowmem-bench-") as out:
        config = lowmem.TrainConfig(
            mode="pretraining", optimizer=spec["optimizer"], model=spec["model"], dataset="stdlib-docs",
            batch_size=spec["batch_size"], max_length=spec["max_length"], max_steps=warm + steps,
            num_training_tokens=10**12, dtype=spec.get("dtype", "fp32"), device=spec.get("device", "cpu"),
            lr=4e-4, warmup_steps=0,
            max_grad_norm=0.0 if spec.get("config", {}).get("per_layer") else 1.0, shuffle=False,
            optimizer_config=spec.get("config", {}), output_dir=out, cache_dir=str(CACHE_DIR),
            log_every=spec.get("log_every", 1), eval_batches=1, seed=42,
            compile=spec.get("compile", False), lean_loss=spec.get("lean_loss", False),
            activation_checkpointing=spec.get("activation_checkpointing", False),
        )
        started, stamps = time.perf_counter(), []
        with cpu_clock_at_rows(stamps):
            result = lowmem.train(config, registry(), say=lambda message: None)
        total = time.perf_counter() - started
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
    steps_rows = [r for r in rows if "tokens_per_second" in r and r["step"] > warm]
    tps = sorted(r["tokens_per_second"] for r in steps_rows)
    tokens_per_step = spec["batch_size"] * spec["max_length"]
    return {
        "exit_code": 0, "tokens_per_second": tps[len(tps) // 2] if tps else float("nan"),
        "step_seconds": tokens_per_step / tps[len(tps) // 2] if tps else float("nan"),
        "losses": [r["loss"] for r in rows if "loss" in r], "peak_rss_bytes": peak_rss(),
        "optimizer_state_bytes": result.optimizer_state_bytes, "wall_seconds": total,
        "peak_allocated_bytes": result.peak_allocated_bytes, **row_windows(rows, warm, stamps),
        "result_step_seconds": result.step_seconds, "result_train_seconds": result.train_seconds,
        "log_every": config.log_every,
    }


@contextlib.contextmanager
def cpu_clock_at_rows(stamps: list[tuple[int, float]]):
    """Appends (step, process CPU seconds) as lowmem writes each training metrics row: CPU time,
    unlike wall time, does not grow while other jobs on the machine hold the core."""
    try:
        from lowmem.run_files import RunFiles

        original = RunFiles.log
    except (ImportError, AttributeError):  # the core moved on: no CPU figures
        yield
        return

    def log(self, row):
        if "tokens_per_second" in row:
            stamps.append((row["step"], time.process_time()))
        return original(self, row)

    RunFiles.log = log
    try:
        yield
    finally:
        RunFiles.log = original


def row_windows(rows: list[dict], warm: int, stamps: list[tuple[int, float]]) -> dict:
    """Wall seconds per step of each metrics row after step ``warm`` (a row's tokens/s covers
    the steps since the previous row), their total over the steps (the window's mean), and the
    same mean in process CPU seconds."""
    rows = [r for r in rows if "tokens_per_second" in r]
    per_step, seconds, steps = [], 0.0, 0
    for before, row in zip(rows, rows[1:], strict=False):
        if before["step"] < warm:
            continue
        span = (row["tokens"] - before["tokens"]) / row["tokens_per_second"]
        per_step.append(span / (row["step"] - before["step"]))
        seconds, steps = seconds + span, steps + row["step"] - before["step"]
    cpu = [(b[1] - a[1], b[0] - a[0]) for a, b in zip(stamps, stamps[1:], strict=False) if a[0] >= warm]
    cpu_steps = sum(n for _, n in cpu)
    return {"step_times": per_step, "window_step_seconds": seconds / steps if steps else float("nan"),
            "cpu_step_seconds": sum(c for c, _ in cpu) / cpu_steps if cpu_steps else float("nan")}


class StepClock:
    """A TrainerCallback (duck-typed, registered below) timing step end to step end."""

    def __init__(self):
        self.ends: list[float] = []
        self.losses: list[float] = []

    def make(self):
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.ends.append(time.perf_counter())

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    clock.losses.append(float(logs["loss"]))

        return Clock()


def model_and_batches(spec: dict, count: int):
    """The model plugin's tokenizer, ``count`` batches from lowmem's own data pipeline (packed
    stdlib-docs blocks, unshuffled, as lowmem_run sees them), then the model, built after the
    same seed as lowmem builds it: the same initial weights."""
    from lowmem.api import ModelRequest
    from lowmem.assemble import seed_everything
    from lowmem.data import DataSpec, train_batches
    from lowmem.tokenizer import load_tokenizer

    plugins = registry()
    plugin = plugins.model(spec["model"])
    tokenizer = load_tokenizer(tokenizer=None, model_path=None, model_plugin=plugin,
                               cache_dir=CACHE_DIR, registry=plugins, say=lambda message: None)
    data = DataSpec(dataset=plugins.dataset("stdlib-docs"), source=None, objective="causal_lm",
                    tokenizer=tokenizer, max_length=spec["max_length"], batch_size=spec["batch_size"],
                    seed=42, shuffle=False, cache_dir=CACHE_DIR)
    batches, data_seconds, stream = [], [], train_batches(data, 0)
    for _ in range(count):  # timed one by one: the first includes tokenizing the first documents
        started = time.perf_counter()
        batch = next(stream, None)
        data_seconds.append(time.perf_counter() - started)
        if batch is None:
            break
        batches.append(batch)
    seed_everything(42)
    model = plugin.build(ModelRequest(objective="causal_lm", vocab_size=len(tokenizer), num_labels=0,
                                      weights=None, pad_token_id=tokenizer.pad_token_id))
    return model, batches, data_seconds


def trainer_run(spec: dict) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments

    warm, steps = spec["warmup"], spec["steps"]
    model, batches, _ = model_and_batches(spec, warm + steps)
    rows = [{k: v[i] for k, v in batch.items()}
            for batch in batches for i in range(batch["input_ids"].shape[0])]
    extra = {}
    if spec["optim"] != "adamw_torch":
        config = spec.get("config", {})
        extra = {"optim_target_modules": TARGETS,
                 "optim_args": f"rank={config.get('rank', 128)}, "
                               f"update_proj_gap={config.get('update_proj_gap', 200)}, "
                               f"scale={config.get('scale', 0.25)}, proj_type=std"}
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="trainer-bench-") as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=spec["batch_size"], max_steps=warm + steps,
            learning_rate=4e-4, weight_decay=0.01, max_grad_norm=1.0, warmup_steps=0,
            lr_scheduler_type="cosine", optim=spec["optim"], logging_steps=1, save_strategy="no",
            report_to=[], use_cpu=True, dataloader_num_workers=0, seed=42, disable_tqdm=True, **extra,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[clock.make()])
        started = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - started
    intervals = sorted(b - a for a, b in zip(clock.ends[warm - 1:], clock.ends[warm:], strict=False))
    step = intervals[len(intervals) // 2] if intervals else float("nan")
    return {
        "tokens_per_second": spec["batch_size"] * spec["max_length"] / step, "step_seconds": step,
        "losses": clock.losses, "peak_rss_bytes": peak_rss(), "wall_seconds": total,
        "threads": torch.get_num_threads(),
    }


def plain_run(spec: dict) -> dict:
    """A plain torch loop doing what lowmem's baseline step does: fp32 forward and backward,
    clip_grad_norm_ to 1.0, fused AdamW (lr 4e-4, decay 0.01 except biases and norm weights,
    eps 1e-8), a warm-up-free cosine LambdaLR down to 0.1, zero_grad(set_to_none), loss to host."""
    import torch

    warm, steps = spec["warmup"], spec["steps"]
    model, batches, data_seconds = model_and_batches(spec, warm + steps)
    named = list(model.named_parameters())
    no_decay = [p for n, p in named if n.endswith("bias") or "norm" in n]
    decay = [p for n, p in named if not (n.endswith("bias") or "norm" in n)]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=4e-4, eps=1e-8, fused=True)
    total = len(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))
    parameters = [p for _, p in named]
    model.train()
    ends, cpu, losses = [time.perf_counter()], [time.process_time()], []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        ends.append(time.perf_counter())
        cpu.append(time.process_time())
    times = [b - a for a, b in zip(ends[warm:], ends[warm + 1:], strict=False)]
    window = sum(times) / len(times) if times else float("nan")
    cpu_step = (cpu[-1] - cpu[warm]) / len(times) if times else float("nan")
    return {"step_times": times, "window_step_seconds": window, "cpu_step_seconds": cpu_step,
            "losses": losses,
            "tokens_per_second": spec["batch_size"] * spec["max_length"] / window,
            "peak_rss_bytes": peak_rss(), "first_batch_seconds": data_seconds[0],
            "batch_seconds": statistics.median(data_seconds[1:] or [0.0]),
            "decayed_tensors": len(decay), "undecayed_tensors": len(no_decay),
            "parameters": sum(p.numel() for p in parameters), "threads": torch.get_num_threads()}


def sequence_run(spec: dict) -> dict:
    """``rounds`` rounds of the runs in ``spec["sequence"]`` (name -> spec fields), alternated in
    this one process (no process-to-process differences between them), the order rotated by
    one each round."""
    names = list(spec["sequence"])
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for index in range(spec["rounds"]):
        for name in names[index % len(names):] + names[:index % len(names)]:
            run = {**spec, **spec["sequence"][name]}
            runs[name].append(KINDS[run["kind"]](run))
    return {"runs": runs}


KINDS = {"lowmem": lowmem_run, "trainer": trainer_run, "plain": plain_run, "sequence": sequence_run}


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    result = KINDS[spec["kind"]](spec)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
