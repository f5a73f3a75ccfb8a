"""Memory levers besides the optimizer: activation checkpointing, torch.compile."""

from __future__ import annotations

import json
import sys

import pytest

import lowmem


def run(registry, tmp_path, name, **changes):
    values = dict(mode="pretraining", optimizer="baseline", model="tiny-llama", batch_size=4, max_length=32,
                  num_training_tokens=1024, dtype="fp32", log_every=1, eval_batches=1,
                  output_dir=str(tmp_path / name))
    lowmem.train(lowmem.TrainConfig(**{**values, **changes}), registry, say=lambda message: None)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [(row["loss"], row["grad_norm"]) for row in rows if "loss" in row]


@pytest.mark.parametrize("optimizer,config", [
    ("baseline", {}), ("lora", {"lora_dropout": 0.1}), ("galore8bit", {"rank": 4, "min_8bit_size": 64}),
    ("galore", {"rank": 4, "per_layer": True}),
])
def test_checkpointing_gives_bitwise_the_same_losses(tiny_registry, tmp_path, optimizer, config):
    """Recomputing each block in backward (dropout included, for LoRA) changes no bit on CPU."""
    extra = {"max_grad_norm": 0.0} if config.get("per_layer") else {}
    plain = run(tiny_registry, tmp_path, "plain", optimizer=optimizer, optimizer_config=config, **extra)
    checkpointed = run(tiny_registry, tmp_path, "checkpointed", optimizer=optimizer, optimizer_config=config,
                       activation_checkpointing=True, **extra)
    assert plain == checkpointed and len(plain) == 8


def test_compile_trains_a_tiny_model(tiny_registry, tmp_path):
    rows = run(tiny_registry, tmp_path, "compiled", compile=True, num_training_tokens=512)
    assert len(rows) == 4


def test_compile_without_inductor_is_refused_in_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch._inductor", None)  # an import of it now fails
    result = cli("train", "--mode", "pretraining", "--optimizer", "baseline", "--model", "tiny-llama",
                 "--max_length", "32", "--num_training_tokens", "256", "--compile",
                 "--output-dir", str(tmp_path / "run"))
    assert result.exit_code == 2 and "--compile" in result.output and "inductor" in result.output
    assert "Traceback" not in result.output
