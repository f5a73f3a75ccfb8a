"""GaLore on FSDP shards: the projection of the whole gradient, computed slice by slice.

A tall weight is sliced by rows and projected on the right, a wide one sliced by columns and
projected on the left; the factor comes from the whole gradient, gathered on refresh steps only.
So two sharded processes take the steps of one process with two micro-batches, and GaLore's
optimizer step talks to the other processes on refresh steps and never in between.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support_fsdp import assert_close_losses, fsdp_args, state_bytes
from support_runs import (
    interrupted_copy,
    launch,
    pretrain_args,
    read_metrics,
    resume_args,
    run_workers,
    train_losses,
)


@pytest.mark.parametrize("optimizer", [
    "galore",
    pytest.param("galore8bit", marks=pytest.mark.slow),
    pytest.param("lora+galore8bit", marks=pytest.mark.slow),
])
def test_galore_on_two_sharded_processes_equals_one_process(cli, tmp_path, sharded_runs, optimizer):
    run = sharded_runs(optimizer) / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["parallel"] == "fsdp" and config["world_size"] == 2
    single = cli(*fsdp_args(tmp_path, optimizer, "accum", ["--grad-accum", "2"]))
    assert single.exit_code == 0, single.output
    assert_close_losses(run, tmp_path / "accum")  # 10 steps, two projection refreshes (gap 5)
    sharded, one = state_bytes(run), state_bytes(tmp_path / "accum")
    # The moments are halved; the projection matrices (and 8-bit maps) are on both processes.
    state, whole = sharded["optimizer_state_bytes"], one["optimizer_state_bytes"]
    assert whole / 2 < state < 0.6 * whole
    assert sharded["param_bytes"] <= 0.55 * one["param_bytes"]


def resumes_exactly_at_two(launch_env, tmp_path, folder: Path, optimizer: str) -> list[str]:
    """Resume the shared 2-process run of ``optimizer`` from step 6 at 2 processes: it must end
    exactly as the uninterrupted run. Returns the run's arguments."""
    args = fsdp_args(folder, optimizer, "run", ["--parallel", "fsdp"])
    same = interrupted_copy(folder / "run", tmp_path / "same", step=6)
    result = launch(launch_env, *resume_args(args, same), "--nproc", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert train_losses(same) == train_losses(folder / "run")
    return args


@pytest.mark.slow
def test_sharded_galore_resumes_exactly_and_on_one_process(cli, launch_env, tmp_path, sharded_runs):
    folder = sharded_runs("galore")
    args = resumes_exactly_at_two(launch_env, tmp_path, folder, "galore")
    one = interrupted_copy(folder / "run", tmp_path / "one", step=6)
    result = cli(*resume_args(args, one), "--grad-accum", "2")
    assert result.exit_code == 0, result.output
    assert_close_losses(one, folder / "run")


@pytest.mark.slow  # three sharded launches, ~25 s; 1 -> 2 for 8-bit states stays in the default run
def test_8bit_states_resume_exactly_at_two_and_on_one_process(cli, launch_env, tmp_path, sharded_runs):
    """Checkpoints hold the 8-bit moments as fp32 slices: at the same number of processes they
    quantise back to the same blocks (exact); on one process the blocks are those of the whole
    moment, so the run continues within 8-bit rounding."""
    folder = sharded_runs("galore8bit")
    args = resumes_exactly_at_two(launch_env, tmp_path, folder, "galore8bit")
    one = interrupted_copy(folder / "run", tmp_path / "one", step=6)
    # Without --parallel fsdp: a sharded checkpoint continues sharded, and says so.
    single = [a for i, a in enumerate(args) if "--parallel" not in (a, args[i - 1])]
    result = cli(*resume_args(single, one), "--grad-accum", "2")
    assert result.exit_code == 0, result.output
    assert "the run continues sharded" in result.output
    assert json.loads((one / "config.json").read_text())["parallel"] == "fsdp"
    assert_close_losses(one, folder / "run", rel=1e-3)


def test_8bit_checkpoints_without_fp32_copies_resume_only_at_their_size(cli, tmp_path, sharded_runs):
    """A checkpoint written before lowmem kept the fp32 copies is refused in one line elsewhere."""
    folder = sharded_runs("galore8bit")
    one = interrupted_copy(folder / "run", tmp_path / "one", step=6)
    layout_file = one / "checkpoints" / "step-6" / "optimizer_layout.json"

    def without_copies(value):
        if isinstance(value, dict) and "dict" in value:
            return {"dict": [[k, without_copies(v)] for k, v in value["dict"]
                             if not str(k).startswith("lowmem_fp32_state")]}
        if isinstance(value, dict):
            return {k: without_copies(v) for k, v in value.items()}
        return [without_copies(v) for v in value] if isinstance(value, list) else value

    layout = json.loads(layout_file.read_text())
    assert "lowmem_fp32_state1" in layout_file.read_text()
    layout_file.write_text(json.dumps(without_copies(layout)))
    from lowmem.checkpoint_files import MANIFEST, checksum_files, write_manifest

    files = checksum_files(layout_file.parent, 6)
    files.pop(MANIFEST)
    write_manifest(layout_file.parent, 6, files)  # as such a checkpoint was written
    args = fsdp_args(folder, "galore8bit", "run", ["--parallel", "fsdp"])
    result = cli(*resume_args(args, one), "--grad-accum", "2")
    assert result.exit_code == 2 and "resume it with that many processes" in result.output
    assert "Traceback" not in result.output


def test_full_projection_is_refused_under_fsdp(cli, tmp_path):
    config = tmp_path / "full.json"
    config.write_text(json.dumps({"rank": 4, "proj_type": "full"}))
    result = cli(*pretrain_args(tmp_path, "galore", extra=["--optimizer-config", str(config),
                                                            "--parallel", "fsdp"]))
    assert result.exit_code == 2 and "proj_type 'full'" in result.output


# -- the optimizer step on slices, against the same optimizer on the whole model -----------------
def _galore_worker(rank: int, init_file: str, outcome: str) -> None:
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.tensor.debug import CommDebugMode

    import lowmem
    from lowmem.registry import load_registry
    from lowmem.sharding import shard_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    # A tall (32x16, sliced by rows) and a wide (16x32, sliced by columns) projected weight.
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    whole = copy.deepcopy(model)
    plugin = load_registry("").optimizer("galore")
    config = {**plugin.default_config, "rank": 4, "update_proj_gap": 3, "scale": 1.0}
    settings = lowmem.OptimizerSettings(lr=1e-2, weight_decay=0.01, config=config, target_modules=("0", "2"),
                                        world_size=2, parallel="fsdp")
    dims = dict(plugin.shard_dims(model, settings))
    shard_model(model, "fp32", torch.device("cpu"), dims)
    sharded, reference = plugin.build(model, settings), plugin.build(whole, settings)
    counts = []
    for step in range(7):
        inputs = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
        model(inputs[4 * rank:4 * rank + 4]).pow(2).mean().backward()
        whole(inputs).pow(2).mean().backward()
        with CommDebugMode() as comm:
            sharded.step()
        counts.append(comm.get_total_counts())
        reference.step()
        sharded.zero_grad()
        reference.zero_grad()
    _report(outcome, rank, {"dims": dims, "counts": counts, "difference": _largest_difference(model, whole)})


def _largest_difference(sharded, whole) -> float:
    gathered = {name: p.full_tensor() for name, p in sharded.named_parameters()}
    return max((gathered[n] - p).abs().max().item() for n, p in whole.named_parameters())


def _report(outcome: str, rank: int, found: dict) -> None:
    import torch.distributed as dist

    Path(f"{outcome}.{rank}").write_text(json.dumps(found))
    dist.barrier()  # gloo aborts a rank whose peer tears its connections down early
    dist.destroy_process_group()


def test_galore_steps_slices_exactly_and_talks_only_on_refresh_steps(tmp_path):
    outcome = tmp_path / "outcome"
    run_workers(_galore_worker, (str(tmp_path / "init"), str(outcome)))
    for rank in (0, 1):
        result = json.loads(Path(f"{outcome}.{rank}").read_text())
        assert result["dims"] == {"2.weight": 1}  # the wide weight by columns, the tall one by rows
        # Refreshes at steps 0, 3, 6: per projected weight, one gather and one broadcast.
        assert result["counts"] == [4, 0, 0, 4, 0, 0, 4]
        assert result["difference"] < 1e-6


# -- per-layer updates with several processes ----------------------------------------------------
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_per_layer_galore_on_two_processes_equals_one_process(cli, launch_env, tmp_path, parallel):
    """Each weight steps inside backward once its gradient is averaged over the processes (FSDP
    calls the gradient hooks after its reduce-scatter; under DDP lowmem steps from DDP's
    communication hook), here after two micro-batches per process; the norm of the gradients
    it stepped on is logged."""
    config = tmp_path / "per_layer.json"
    config.write_text(json.dumps({"per_layer": True}))

    def args(out: str, extra: list[str]) -> list[str]:
        return pretrain_args(tmp_path, "galore", out=out, tokens=4096, extra=[
            "--optimizer-config", str(config), "--max-grad-norm", "0", "--shuffle", "false",
            "--save-every", "3", "--keep-checkpoints", "5", *extra])

    two = launch(launch_env, *args("two", ["--parallel", parallel, "--grad-accum", "2"]), "--nproc", "2")
    assert two.returncode == 0, two.stdout + two.stderr
    one = cli(*args("one", ["--grad-accum", "4"]))
    assert one.exit_code == 0, one.output
    assert_close_losses(tmp_path / "two", tmp_path / "one")
    two_norms, one_norms = ([row["grad_norm"] for row in read_metrics(tmp_path / run) if "loss" in row]
                            for run in ("two", "one"))
    assert all(norm > 0 for norm in one_norms) and two_norms == pytest.approx(one_norms, rel=1e-4)
    # Every process reports the state it holds: all of it under DDP, its slices (plus the whole
    # projection matrices) under FSDP.
    whole = state_bytes(tmp_path / "one")["optimizer_state_bytes"]
    processes = json.loads((tmp_path / "two" / "summary.json").read_text())["per_process"]
    for held in (p["optimizer_state_bytes"] for p in processes):
        assert held == whole if parallel == "ddp" else whole / 2 < held < 0.6 * whole
    if parallel == "fsdp":  # per-layer state is sharded too, and resumes
        resumed = interrupted_copy(tmp_path / "two", tmp_path / "resumed", step=3)
        result = launch(launch_env, *resume_args(args("two", ["--parallel", parallel, "--grad-accum", "2"]),
                                                 resumed), "--nproc", "2")
        assert result.returncode == 0, result.stdout + result.stderr
        assert train_losses(resumed) == train_losses(tmp_path / "two")


def _per_layer_worker(rank: int, init_file: str, outcome: str) -> None:
    """Per-layer GaLore on FSDP slices: the collectives each backward makes besides FSDP's own,
    by kind, with each process deciding alone on a non-finite slice (the default: a non-finite
    step stops the run) and agreeing on every weight (a skipped step goes on)."""
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.tensor.debug import CommDebugMode

    import lowmem
    from lowmem.registry import load_registry
    from lowmem.sharding import shard_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    found = {}
    for agree in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
        whole = copy.deepcopy(model)
        plugin = load_registry("").optimizer("galore")
        config = {**plugin.default_config, "rank": 4, "update_proj_gap": 3, "scale": 1.0, "per_layer": True}
        settings = lowmem.OptimizerSettings(lr=1e-2, weight_decay=0.01, config=config,
                                            target_modules=("0", "2"), world_size=2, parallel="fsdp")
        shard_model(model, "fp32", torch.device("cpu"), dict(plugin.shard_dims(model, settings)))
        sharded, reference = plugin.build(model, settings), plugin.build(whole, settings)
        sharded.agree_on_every_weight = agree
        counts = []
        for step in range(5):
            inputs = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
            whole(inputs).pow(2).mean().backward()  # steps the whole model's weights in backward
            with CommDebugMode() as comm:
                model(inputs[4 * rank:4 * rank + 4]).pow(2).mean().backward()
            kinds = {str(op).lower(): n for op, n in comm.get_comm_counts().items()}
            counts.append({kind: sum(n for op, n in kinds.items() if kind in op.replace("_", ""))
                           for kind in ("allreduce", "broadcast")})
            sharded.zero_grad()
            reference.zero_grad()
        found[str(agree)] = {"counts": counts, "difference": _largest_difference(model, whole)}
    _report(outcome, rank, found)


def test_per_layer_galore_on_slices_talks_only_on_refresh_steps(tmp_path):
    outcome = tmp_path / "outcome"
    run_workers(_per_layer_worker, (str(tmp_path / "init"), str(outcome)))
    for rank in (0, 1):
        result = json.loads(Path(f"{outcome}.{rank}").read_text())
        alone, agreeing = result["False"], result["True"]
        # Refreshes at steps 0 and 3: per projected weight one broadcast of its factor and one
        # all-reduce agreeing that its gradient is finite; nothing in between.
        refresh, quiet = {"allreduce": 2, "broadcast": 2}, {"allreduce": 0, "broadcast": 0}
        assert alone["counts"] == [refresh, quiet, quiet, refresh, quiet]
        # Agreeing on every weight: one all-reduce per parameter (two weights, two biases).
        assert [c["allreduce"] for c in agreeing["counts"]] == [4] * 5
        assert alone["difference"] < 1e-6 and agreeing["difference"] < 1e-6
