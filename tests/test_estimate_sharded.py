"""lowmem estimate --nproc N --parallel fsdp: the figures of one of N sharded processes, and
against what a real 2-process sharded run measures."""

from __future__ import annotations

import json

import pytest
from support_fsdp import state_bytes


def estimated(cli, *args: str) -> dict:
    result = cli("estimate", "--json", "--dtype", "fp32", *args)
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    return found[next(iter(found))] if "weights" not in found else found


@pytest.mark.parametrize("optimizer", ["baseline", "lora", "galore", "galore8bit"])
def test_sharded_estimate_slices_weights_gradients_and_states(cli, optimizer):
    one = estimated(cli, "--model", "llama_60m", "--optimizer", optimizer)
    four = estimated(cli, "--model", "llama_60m", "--optimizer", optimizer, "--nproc", "4",
                     "--parallel", "fsdp")
    assert four["settings"]["world_size"] == 4 and four["settings"]["parallel"] == "fsdp"
    assert four["weights"] == -(-one["weights"] // 4) and four["gradients"] == -(-one["gradients"] // 4)
    assert four["activations"] == one["activations"]  # the same micro-batch on each process
    # What stays whole on every process: GaLore's projection matrices, AdamW's 0-dim steps.
    held = next(int(n.split()[2].replace(",", "")) for n in four["notes"] if "held whole" in n)
    assert four["optimizer_states"] == held + -(-(one["optimizer_states"] - held) // 4)
    assert one["optimizer_states"] / 4 < four["optimizer_states"] < one["optimizer_states"] / 2
    if not optimizer.startswith("galore"):
        assert held % 4 == 0 and 0 < held < one["optimizer_states"] / 100  # a 4-byte step per tensor
    # The gathered weights (root unit and two blocks) replace autocast's copies of every weight.
    assert 0 < four["weight_copies"] and four["total"] < one["total"]
    # DDP keeps everything on every process: the single-process figures.
    ddp = estimated(cli, "--model", "llama_60m", "--optimizer", optimizer, "--nproc", "4")
    assert ddp["weights"] == one["weights"] and ddp["optimizer_states"] == one["optimizer_states"]


def test_optimizers_that_do_not_shard_have_no_sharded_estimate(cli):
    result = cli("estimate", "--model", "llama_60m", "--optimizer", "adafactor", "--parallel", "fsdp",
                 "--nproc", "2")
    assert result.exit_code == 2 and "does not support --parallel fsdp" in result.output
    # Said first, before any setting of the optimizer's own could fail, and on one process too.
    for nproc in ("2", "1"):
        result = cli("estimate", "--model", "llama_60m", "--optimizer", "apollo", "--parallel", "fsdp",
                     "--nproc", nproc)
        assert result.exit_code == 2 and "does not support --parallel fsdp" in result.output, result.output
    every = cli("estimate", "--model", "llama_60m", "--all", "--parallel", "fsdp", "--nproc", "2", "--json")
    assert every.exit_code == 0, every.output
    found = json.loads(every.output)
    assert "does not support" in str(found["adafactor"]) and "weights" in found["galore"]
    # A split a run would refuse is refused here too: llama_60m's down_proj has 1376 columns.
    uneven = cli("estimate", "--model", "llama_60m", "--optimizer", "galore", "--parallel", "fsdp",
                 "--nproc", "3")
    assert uneven.exit_code == 2 and "1376 columns to divide among 3 processes" in uneven.output


@pytest.mark.parametrize("optimizer", ["baseline", "lora"])
def test_sharded_estimate_matches_a_sharded_run(cli, sharded_runs, optimizer):
    """Per process, the estimate's weights, gradients and states are what the run measured."""
    measured = state_bytes(sharded_runs(optimizer) / "run")
    two = estimated(cli, "--model", "tiny-llama", "--optimizer", optimizer, "--nproc", "2",
                    "--parallel", "fsdp", "--max_length", "32")
    assert two["weights"] == pytest.approx(measured["param_bytes"], rel=0.01)
    assert two["gradients"] == pytest.approx(measured["grad_bytes"], rel=0.01)
    assert two["optimizer_states"] == measured["optimizer_state_bytes"]  # AdamW's 0-dim steps are whole
