"""Data-parallel training: real 2-process gloo runs on CPU, started the way users start them.

A 2-process step with batch B equals a 1-process step with batch B and --grad-accum 2 bit for
bit: global batches 2k and 2k+1 are rank 0's and rank 1's batch in the first, the two
micro-batches in the second, and both average two gradients that were each halved exactly.
So losses, weights and optimizer state are compared exactly, which proves the sharding, the
all-reduce and the token count at once. Batch 2B on one process is the same data in one
forward pass: equal only to float tolerance.

Torchrun workers are fresh interpreters that cannot see the tiny models conftest registers
in-process, so they load tests/tiny_plugin.py through a fake installed distribution.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support_fsdp import fsdp_args
from support_runs import (
    assert_runs_identical,
    final_tensors,
    interrupted_copy,
    launch,
    pretrain_args,
    resume_args,
    run_workers,
    train_losses,
)

TOKENS = 2560  # 10 full steps of 2 x 4 x 32 tokens: no partial last step to compose differently


def ddp_args(tmp_path: Path, optimizer: str, out: str, extra=()) -> list[str]:
    # LoRA keeps its dropout (0.05): each batch draws its masks from its own seed, so a batch
    # draws the same masks on rank 1 as in the second micro-batch of an accumulating process.
    return pretrain_args(tmp_path, optimizer, out=out, tokens=TOKENS,
                         extra=["--save-every", "3", "--keep-checkpoints", "10", *extra])


@pytest.fixture(scope="module")
def two_process_runs(launch_env, tmp_path_factory):
    """``lowmem train --nproc 2`` per optimizer, run once and shared by the tests of this module."""
    runs: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}

    def get(optimizer: str):
        if optimizer not in runs:
            folder = tmp_path_factory.mktemp(f"ddp-{optimizer.replace('+', '-')}")
            result = launch(launch_env, *ddp_args(folder, optimizer, "run"), "--nproc", "2")
            assert result.returncode == 0, result.stdout + result.stderr
            runs[optimizer] = (folder, result)
        return runs[optimizer]

    return get


@pytest.mark.slow  # a two-process launch per mode (~10 s each)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_checkpointing_changes_no_loss_with_two_processes(launch_env, tmp_path, two_process_runs,
                                                          sharded_runs, parallel):
    """--activation-checkpointing recomputes each block in backward under DDP (its gradient hooks
    fire during the recomputed backward) and under FSDP (each block gathered again for it): the
    losses are those of the same run without it, bit for bit."""
    if parallel == "ddp":
        reference = two_process_runs("galore")[0] / "run"
        args = ddp_args(tmp_path, "galore", "run", ["--activation-checkpointing"])
    else:
        reference = sharded_runs("baseline") / "run"
        args = fsdp_args(tmp_path, "baseline", "run", ["--parallel", "fsdp", "--activation-checkpointing"])
    result = launch(launch_env, *args, "--nproc", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["activation_checkpointing"] is True
    assert train_losses(tmp_path / "run") == train_losses(reference) and len(train_losses(reference)) >= 8


@pytest.mark.parametrize("optimizer", [
    "galore",
    pytest.param("baseline", marks=pytest.mark.slow),
    pytest.param("lora", marks=pytest.mark.slow),
    pytest.param("galore8bit", marks=pytest.mark.slow),
    pytest.param("lora+galore8bit", marks=pytest.mark.slow),
])
def test_two_processes_equal_one_with_accumulation(cli, tmp_path, two_process_runs, optimizer):
    import torch

    folder, result = two_process_runs(optimizer)
    run = folder / "run"
    # Exit 0 includes the end-of-run check that both ranks hold bit-identical parameters.
    assert result.stdout.count("lowmem run:") == 1  # rank 0 alone prints the summary
    assert "error" not in result.stderr
    config, summary = (json.loads((run / name).read_text()) for name in ("config.json", "summary.json"))
    assert config["world_size"] == 2 and summary["world_size"] == 2
    assert summary["tokens"] == TOKENS and summary["steps"] == 10  # tokens of both ranks counted
    steps = [row["step"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "loss" in row]
    assert steps == list(range(1, 11))  # one writer: no row twice
    assert sorted(p.name for p in folder.iterdir()) == ["galore.json", "run"]

    accumulated = cli(*ddp_args(tmp_path, optimizer, "accum",
                                extra=["--batch_size", "4", "--grad-accum", "2"]))
    assert accumulated.exit_code == 0, accumulated.output
    assert_runs_identical(run, tmp_path / "accum")

    if "lora" in optimizer:
        return  # LoRA's dropout: one batch of 8 draws other masks than two batches of 4
    wide = cli(*ddp_args(tmp_path, optimizer, "wide", extra=["--batch_size", "8"]))
    assert wide.exit_code == 0, wide.output
    assert train_losses(tmp_path / "wide") == pytest.approx(train_losses(run), rel=1e-4)
    weights_wide, _ = final_tensors(tmp_path / "wide")
    weights_ddp, _ = final_tensors(run)
    for name, tensor in weights_ddp.items():
        torch.testing.assert_close(weights_wide[name], tensor, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_two_process_run_resumes_bitwise(launch_env, tmp_path, two_process_runs):
    folder, _ = two_process_runs("galore")
    resumed = interrupted_copy(folder / "run", tmp_path / "resumed", step=3)
    result = launch(launch_env, *resume_args(ddp_args(folder, "galore", "run"), resumed), "--nproc", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.count("resumed from") == 1
    assert_runs_identical(folder / "run", resumed)


@pytest.mark.slow
def test_one_process_resumes_a_two_process_checkpoint_with_the_same_step(cli, tmp_path, two_process_runs):
    """A DDP checkpoint is whole: one process continues it, bit for bit, once a step keeps its
    size (two micro-batches instead of two processes); with half the step it is refused."""
    folder, _ = two_process_runs("galore")
    resumed = interrupted_copy(folder / "run", tmp_path / "resumed", step=3)
    args = resume_args(ddp_args(folder, "galore", "run"), resumed)
    refused = cli(*args)
    assert refused.exit_code == 2 and "use --grad-accum 2" in refused.output
    result = cli(*args, "--grad-accum", "2")
    assert result.exit_code == 0, result.output
    assert_runs_identical(folder / "run", resumed)


@pytest.mark.slow
def test_torchrun_directly(launch_env, tmp_path):
    result = launch(launch_env, "--standalone", "--nproc-per-node", "2", "-m", "lowmem",
                    *pretrain_args(tmp_path, "lora", tokens=1024), launcher=("-m", "torch.distributed.run"))
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens"] == 1024


def test_compare_on_two_processes_runs_each_optimizer_in_one_process_group(launch_env, tmp_path):
    """`lowmem compare --nproc 2`: the runs share the launcher's group (joining it anew after each
    run could hang on its stale keys), and rank 0 alone writes the reports."""
    args = pretrain_args(tmp_path, "lora", out="compared", tokens=512, extra=["--shuffle", "false"])
    at = args.index("--optimizer")
    args = ["compare", *args[1:at], "--optimizers", "lora,galore8bit,baseline", *args[at + 2:]]
    result = launch(launch_env, *args, "--nproc", "2", "--parallel", "fsdp")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("wrote compare.json") == 1
    compared = json.loads((tmp_path / "compared" / "compare.json").read_text())
    assert [run["status"] for run in compared["runs"]] == ["ok"] * 3, compared["runs"]
    for name in ("lora", "galore8bit", "baseline"):
        config = json.loads((tmp_path / "compared" / name / "config.json").read_text())
        assert config["world_size"] == 2 and config["parallel"] == "fsdp"


@pytest.mark.slow
def test_updating_in_backward_before_the_reduction_is_refused_in_one_line(launch_env, tmp_path):
    """LOMO updates inside its own fused backward, before DDP could average the gradients."""
    args = pretrain_args(tmp_path, "lomo", extra=["--max-grad-norm", "0"])
    result = launch(launch_env, *args, "--nproc", "2")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "before DDP averages the gradients" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_accelerate_single_process_launch_starts_the_processes_asked_for(launch_env, tmp_path, parallel):
    """`accelerate launch --num_processes 2` without a GPU (or with --cpu) and without MPI starts
    the script once, with no world size: lowmem starts the two processes itself (torchrun)."""
    pytest.importorskip("accelerate")
    env = {**launch_env, "HF_HOME": str(tmp_path / "hf")}  # no accelerate config file
    result = launch(env, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lowmem",
                    *pretrain_args(tmp_path, "baseline", tokens=512, extra=["--parallel", parallel]),
                    launcher=("-m", "accelerate.commands.accelerate_cli"))
    assert result.returncode == 0, result.stdout + result.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["world_size"] == 2 and config["parallel"] == parallel
    assert len(json.loads((tmp_path / "run" / "summary.json").read_text())["per_process"]) == 2


@pytest.mark.slow
def test_accelerate_config_for_several_machines_is_refused(launch_env, tmp_path):
    """A config file asking for 4 processes on 2 machines: lowmem must not start all 4 here."""
    pytest.importorskip("accelerate")
    home = tmp_path / "hf"
    (home / "accelerate").mkdir(parents=True)
    (home / "accelerate" / "default_config.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 4\n"
        "num_machines: 2\nmachine_rank: 0\nmain_process_ip: 127.0.0.1\nmain_process_port: 29533\n"
        "mixed_precision: 'no'\nuse_cpu: true\n")
    result = launch({**launch_env, "HF_HOME": str(home)}, "launch", "-m", "lowmem",
                    *pretrain_args(tmp_path, "baseline", tokens=512),
                    launcher=("-m", "accelerate.commands.accelerate_cli"))
    assert result.returncode != 0
    assert "4 processes were asked for" in result.stderr and "--nnodes 2" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


# -- the launcher checks, without launching ------------------------------------------------------
def test_a_world_size_mismatch_is_refused():
    from lowmem.distributed import DistContext
    from lowmem.errors import ConfigError

    with pytest.raises(ConfigError, match="3 processes were asked for"):
        DistContext.from_launcher({"LOWMEM_EXPECTED_WORLD_SIZE": "3"}, want_cuda=False)
    with pytest.raises(ConfigError, match="started by MPI"):
        DistContext.from_launcher({"OMPI_COMM_WORLD_SIZE": "2"}, want_cuda=False)
    with pytest.raises(ConfigError, match="accelerate was asked for FSDP"):
        DistContext.from_launcher({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}, want_cuda=False)
    assert not DistContext.from_launcher({"ACCELERATE_USE_CPU": "True"}, want_cuda=False).active


def test_accelerate_options_are_read_in_every_spelling():
    from lowmem.distributed import _option

    assert _option(["accelerate", "launch", "--num_processes", "4", "x.py"], "num_processes") == "4"
    assert _option(["launch", "--num-processes=2"], "num_processes") == "2"
    assert _option(["launch", "--config_file", "a.yaml", "--num_machines", "1"], "config_file") == "a.yaml"
    assert _option(["launch", "x.py"], "num_processes") is None


def _diverging_worker(rank: int, init_file: str, outcome: str) -> None:
    import torch
    import torch.distributed as dist

    from lowmem.distributed import DistContext, ReplicaMismatch

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    context = DistContext(rank, 2, rank, "gloo")
    model = torch.nn.Linear(4, 3)
    torch.nn.init.constant_(model.weight, 0.5)
    torch.nn.init.zeros_(model.bias)
    context.check_replicas(model)  # identical: passes
    if rank == 1:
        with torch.no_grad():
            model.bias[2] = torch.nextafter(model.bias[2], torch.tensor(1.0))  # one ULP apart
    try:
        context.check_replicas(model)
        Path(f"{outcome}.{rank}").write_text("passed")
    except ReplicaMismatch as exc:
        Path(f"{outcome}.{rank}").write_text(str(exc))
    context.close(completed=True)  # a barrier first: gloo aborts a rank whose peer left early


def test_replica_check_catches_one_ulp(tmp_path):
    outcome = tmp_path / "outcome"
    run_workers(_diverging_worker, (str(tmp_path / "init"), str(outcome)))
    for rank in (0, 1):
        message = Path(f"{outcome}.{rank}").read_text()
        assert "parameters differ between ranks" in message and "bias" in message and "weight" not in message


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; whoever adopted it may not reap it at once


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_workers_stop_when_their_launcher_is_killed(launch_env, tmp_path):
    """torchrun starts each worker in a session of its own, so a SIGKILL of `lowmem train --nproc 2`
    reaches neither: they notice their launcher gone and stop as a SIGTERM would stop them (after
    the step, with a checkpoint), instead of training on into the run folder."""
    import sys
    import time

    args = pretrain_args(tmp_path, "baseline", tokens=10**7, extra=["--save-every", "100000"])
    log_file = tmp_path / "launcher.log"
    log = log_file.open("w")
    launcher = subprocess.Popen([sys.executable, "-m", "lowmem", *args, "--nproc", "2"], env=launch_env,
                                stdout=log, stderr=subprocess.STDOUT)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert launcher.poll() is None and time.monotonic() < deadline, log_file.read_text()[-2000:]
        time.sleep(0.2)
    workers = _children(launcher.pid)
    assert len(workers) == 2
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 90
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.5)
    output = log_file.read_text()
    assert not any(map(_running, workers)), output
    # Each worker's watch polls once a second; the first to notice asks for the stop, and the
    # step's all-reduce carries it to the other, which may stop before its own watch looks.
    assert output.count("the launcher is gone") in (1, 2), output
    saved = list((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and not (tmp_path / "run" / "summary.json").exists()
