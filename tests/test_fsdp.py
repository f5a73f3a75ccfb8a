"""--parallel fsdp: real 2-process gloo runs on CPU with FSDP2-sharded models.

Two sharded processes with --batch_size B take the steps of one process with --batch_size B
--grad-accum 2 (the same data per step, gradients averaged the same way); sharding changes only
the order of a few float sums (the gradient norm over shards), so losses agree to 1e-5 and not
necessarily bit for bit. Each process holds half of every parameter, gradient and moment.
Checkpoints are sharded (DCP) and load into one or two processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support_fsdp import assert_close_losses, fsdp_args
from support_runs import (
    interrupted_copy,
    launch,
    pretrain_args,
    read_metrics,
    resume_args,
    run_workers,
    train_losses,
)


@pytest.mark.parametrize("optimizer", ["baseline", "lora"])
def test_two_sharded_processes_equal_one_with_accumulation(cli, tmp_path, sharded_runs, optimizer):
    folder = sharded_runs(optimizer)
    run = folder / "run"
    config, summary = (json.loads((run / name).read_text()) for name in ("config.json", "summary.json"))
    assert config["parallel"] == "fsdp" and config["world_size"] == 2
    assert summary["parallel"] == "fsdp" and summary["world_size"] == 2 and summary["steps"] == 10

    single = cli(*fsdp_args(tmp_path, optimizer, "accum", ["--grad-accum", "2"]))
    assert single.exit_code == 0, single.output
    assert len(train_losses(run)) >= 8
    assert_close_losses(run, tmp_path / "accum")

    one = json.loads((tmp_path / "accum" / "summary.json").read_text())
    for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes"):
        assert 0 < summary[key] <= 0.55 * one[key], key  # each process holds half
        assert summary[f"world_{key}"] == pytest.approx(one[key], rel=0.01), key  # the halves add up
        assert one[f"world_{key}"] == one[key]
        # Each process's own figures too, in rank order; rank 0's are the top-level ones.
        assert [p[key] for p in summary["per_process"]][:1] == [summary[key]]
        assert sum(p[key] for p in summary["per_process"]) == summary[f"world_{key}"]
        assert all(0 < p[key] <= 0.55 * one[key] for p in summary["per_process"]), key
    assert [p["rank"] for p in summary["per_process"]] == [0, 1]
    peaks = [p["peak_memory_bytes"] for p in summary["per_process"]]
    assert min(peaks) > 0 and summary["world_peak_memory_bytes"] == sum(peaks)
    assert [p["rank"] for p in one["per_process"]] == [0]

    # The exported model is the whole gathered model, as a single process writes it.
    import safetensors.torch
    import torch

    sharded = safetensors.torch.load_file(str(run / "model" / "model.safetensors"))
    plain = safetensors.torch.load_file(str(tmp_path / "accum" / "model" / "model.safetensors"))
    assert sharded.keys() == plain.keys()
    for name, tensor in plain.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-4, atol=1e-5)
    if optimizer == "lora":
        assert (run / "model" / "adapter" / "adapter_model.safetensors").is_file()


def test_one_sharded_process_equals_a_plain_run(cli, tmp_path):
    """FSDP over one process (a single shard) is the plain run bit for bit, checkpoints included."""
    for name, extra in (("plain", []), ("sharded", ["--parallel", "fsdp"])):
        result = cli(*pretrain_args(tmp_path, "baseline", out=name, tokens=1024, extra=extra))
        assert result.exit_code == 0, result.output
        assert ("note: --parallel fsdp on one process" in result.output) == bool(extra)
    assert [r.get("loss") for r in read_metrics(tmp_path / "sharded")] == \
        [r.get("loss") for r in read_metrics(tmp_path / "plain")]
    checkpoint = tmp_path / "sharded" / "checkpoints" / "step-8"
    assert (checkpoint / "shards").is_dir() and not (checkpoint / "optimizer.pt").exists()
    assert "shards/" in " ".join(json.loads((checkpoint / "manifest.json").read_text())["files"])


def test_sharded_resume_at_the_same_world_size_is_exact(launch_env, tmp_path, sharded_runs):
    folder = sharded_runs("baseline")
    resumed = interrupted_copy(folder / "run", tmp_path / "resumed", step=3)
    args = resume_args(fsdp_args(folder, "baseline", "run", ["--parallel", "fsdp"]), resumed)
    result = launch(launch_env, *args, "--nproc", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.count("resumed from") == 1
    assert train_losses(resumed) == train_losses(folder / "run")


def test_two_sharded_processes_resume_on_one(cli, tmp_path, sharded_runs):
    folder = sharded_runs("baseline")
    resumed = interrupted_copy(folder / "run", tmp_path / "resumed", step=3)
    args = resume_args(fsdp_args(folder, "baseline", "run", ["--parallel", "fsdp"]), resumed)
    refused = cli(*args)  # one process would take half the step
    assert refused.exit_code == 2 and "use --grad-accum 2" in refused.output
    result = cli(*args, "--grad-accum", "2")
    assert result.exit_code == 0, result.output
    assert_close_losses(resumed, folder / "run")


@pytest.mark.slow
@pytest.mark.parametrize(("optimizer", "rel"), [("lora", 1e-5), ("galore8bit", 1e-3)])
def test_one_sharded_process_resumes_on_two(cli, launch_env, tmp_path, optimizer, rel):
    """8-bit GaLore's moments are quantised again per slice: within 8-bit rounding."""
    args = fsdp_args(tmp_path, optimizer, "one", ["--parallel", "fsdp", "--grad-accum", "2"])
    assert cli(*args).exit_code == 0
    resumed = interrupted_copy(tmp_path / "one", tmp_path / "resumed", step=6)
    args = [a if a != "2" or args[i - 1] != "--grad-accum" else "1" for i, a in enumerate(args)]
    result = launch(launch_env, *resume_args(args, resumed), "--nproc", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_close_losses(resumed, tmp_path / "one", rel=rel)


def test_optimizers_that_do_not_shard_are_refused_in_one_line(cli, tmp_path):
    result = cli(*pretrain_args(tmp_path, "adafactor", extra=["--parallel", "fsdp"]))
    assert result.exit_code == 2
    assert "does not support --parallel fsdp" in result.output and "Traceback" not in result.output
    assert "use --parallel ddp" in result.output
    # LOMO cannot train on DDP processes either: the refusal does not send the user there.
    lomo = cli(*pretrain_args(tmp_path, "lomo", extra=["--parallel", "fsdp", "--max-grad-norm", "0"]))
    assert lomo.exit_code == 2 and "use one process" in lomo.output and "--parallel ddp" not in lomo.output
    estimated = cli("estimate", "--model", "tiny-llama", "--optimizer", "lomo", "--parallel", "fsdp")
    assert estimated.exit_code == 2 and estimated.output == lomo.output
    assert cli(*pretrain_args(tmp_path, "baseline", extra=["--parallel", "zero"])).exit_code == 2


@pytest.mark.parametrize("optimizer,extra,rel", [
    ("galore8bit", [], 1e-3),
    pytest.param("baseline", [], 1e-5, marks=pytest.mark.slow),
    pytest.param("lora", [], 1e-5, marks=pytest.mark.slow),
    pytest.param("galore", ["--per-layer"], 1e-5, marks=pytest.mark.slow),
])
def test_a_whole_checkpoint_resumes_on_two_sharded_processes(cli, launch_env, tmp_path, optimizer, extra,
                                                            rel):
    """One process without --parallel fsdp writes its checkpoints whole; two sharded processes
    continue from one, each taking its slices of the model and of the optimizer state (8-bit
    moments, here the embeddings', quantised again per slice; GaLore's projections whole).

    8-bit: min_8bit_size lies between the embeddings' moment (12,288 elements) and its slices
    (6,144), so the slices stay 8-bit only if they are judged by the whole moment, as one
    process judges it and as ``lowmem estimate`` counts."""
    args = fsdp_args(tmp_path, optimizer, "one", ["--grad-accum", "2", *extra])
    settings = tmp_path / "galore.json"  # written by fsdp_args
    if optimizer == "galore8bit":
        settings.write_text(json.dumps({**json.loads(settings.read_text()), "min_8bit_size": 8192}))
    assert cli(*args).exit_code == 0
    resumed = interrupted_copy(tmp_path / "one", tmp_path / "resumed", step=6)
    args = [a if a != "2" or args[i - 1] != "--grad-accum" else "1" for i, a in enumerate(args)]
    result = launch(launch_env, *resume_args(args, resumed), "--nproc", "2", "--parallel", "fsdp")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((resumed / "config.json").read_text())["parallel"] == "fsdp"
    assert_close_losses(resumed, tmp_path / "one", rel=rel)
    estimate = cli("estimate", "--json", "--model", "tiny-llama", "--optimizer", optimizer,
                   "--max_length", "32", "--dtype", "fp32", "--nproc", "2", "--parallel", "fsdp", *extra,
                   *(["--optimizer-config", str(settings)] if "galore" in optimizer else []))
    assert estimate.exit_code == 0, estimate.output
    processes = json.loads((resumed / "summary.json").read_text())["per_process"]
    held = [process["optimizer_state_bytes"] for process in processes]
    assert held == [json.loads(estimate.output)[optimizer]["optimizer_states"]] * 2


# -- the end-of-run check of a sharded run -----------------------------------------------------
def _sharded_worker(rank: int, init_file: str, outcome: str) -> None:
    import torch
    import torch.distributed as dist

    from lowmem.distributed import DistContext, ReplicaMismatch
    from lowmem.sharding import check_shards, shard_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    context = DistContext(rank, 2, rank, "gloo")
    torch.manual_seed(0)
    model = shard_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), "fp32", torch.device("cpu"), {})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weight = model[0].weight
    assert tuple(weight.to_local().shape) == (2, 4)  # rows split over the two ranks
    optimizer.state[weight]["projection"] = torch.full((2, 2), float(rank == 0))  # differs by rank
    optimizer.state[weight]["moment"] = torch.distributed.tensor.zeros(  # sharded: may differ
        (4, 4), device_mesh=weight.device_mesh, placements=weight.placements) + rank
    try:
        check_shards(model, optimizer, context)
        Path(f"{outcome}.{rank}").write_text("passed")
    except ReplicaMismatch as exc:
        Path(f"{outcome}.{rank}").write_text(str(exc))
    context.close(completed=True)  # a barrier first: gloo aborts a rank whose peer left early


def test_sharded_runs_check_what_must_be_identical(tmp_path):
    outcome = tmp_path / "outcome"
    run_workers(_sharded_worker, (str(tmp_path / "init"), str(outcome)))
    for rank in (0, 1):
        message = Path(f"{outcome}.{rank}").read_text()
        assert "differs between ranks" in message and "0.weight" in message, message


def test_the_lean_loss_on_two_sharded_processes_equals_the_plain_loss(launch_env, tmp_path, sharded_runs):
    """--lean-loss reads the hidden states the sharded root returns (a view): the losses are the
    plain loss's, and FSDP's warning about views (lowmem changes none in place) is not shown."""
    args = fsdp_args(tmp_path, "baseline", "run", ["--parallel", "fsdp", "--lean-loss"])
    result = launch(launch_env, *args, "--nproc", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["applied_lean_loss"] is True
    assert_close_losses(tmp_path / "run", sharded_runs("baseline") / "run", rel=1e-6)
    assert "returned a view tensor" not in result.stderr, result.stderr


def test_kill_9_during_a_sharded_save_resumes_from_the_last_complete_checkpoint(launch_env, tmp_path,
                                                                               sharded_runs):
    """Rank 0 is killed (SIGKILL) while it finishes the step-6 checkpoint, after both processes
    wrote their shards; the launcher stops the other. The half-written checkpoint never counts:
    a resume at 2 processes starts from step 3 and ends exactly as the uninterrupted run."""
    from lowmem.checkpoint_files import complete_checkpoints

    args = fsdp_args(tmp_path, "baseline", "run", ["--parallel", "fsdp"])
    killed = launch({**launch_env, "LOWMEM_TEST_FAULT": "kill:files@6"}, *args, "--nproc", "2")
    assert killed.returncode != 0
    assert [path.name for path in complete_checkpoints(tmp_path / "run")] == ["step-3"]
    resumed = launch(launch_env, *args, "--nproc", "2", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed.stderr.count("resumed from") == 1
    assert train_losses(tmp_path / "run") == train_losses(sharded_runs("baseline") / "run")


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# Run by the prepared GPU check (bench/gpu_check.py runs `pytest -m cuda`) on a machine with two
# or more GPUs: the same exactness as on CPU with gloo, here with NCCL.
@pytest.mark.cuda
@pytest.mark.skipif(_cuda_devices() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("optimizer", ["baseline", "lora", "galore", "galore8bit", "lora+galore8bit"])
def test_two_cuda_processes_over_nccl_equal_one_with_accumulation(cli, launch_env, tmp_path, optimizer):
    on_cuda = ["--device", "cuda"]
    sharded = launch(launch_env, *fsdp_args(tmp_path, optimizer, "run", ["--parallel", "fsdp", *on_cuda]),
                     "--nproc", "2")
    assert sharded.returncode == 0, sharded.stdout + sharded.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["world_size"] == 2
    single = cli(*fsdp_args(tmp_path, optimizer, "accum", ["--grad-accum", "2", *on_cuda]))
    assert single.exit_code == 0, single.output
    assert_close_losses(tmp_path / "run", tmp_path / "accum", rel=1e-3 if "8bit" in optimizer else 1e-5)
