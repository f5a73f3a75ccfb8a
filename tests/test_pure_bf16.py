"""--dtype bf16-pure keeps small updates: every built-in optimizer updates a bf16 weight in fp32 and
writes it back with Kahan compensation (default) or stochastic rounding (lowmem.rounding)."""

from __future__ import annotations

import json

import pytest
import torch
from support_optimizers import TINY_CONFIG, full_config, plugin, settings_for, tiny_llama
from support_runs import pretrain_args

import lowmem
from lowmem import memory
from lowmem.rounding import compensation_bytes

ROWS, COLS, STEPS = 256, 512, 100
# Optimizers that step a lone weight (adam-mini partitions by a transformer's heads: tested on
# the tiny llama below; lomo updates inside backward: tested there too).
ON_ONE_WEIGHT = {
    "baseline": {}, "galore": {"rank": 64, "update_proj_gap": 50},
    "galore8bit": {"rank": 64, "update_proj_gap": 50, "min_8bit_size": 256},
    "adamw8bit": {"min_8bit_size": 256}, "adafactor": {}, "apollo": {"rank": 64}, "apollo-mini": {},
    "muon": {},
}


class OneWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(COLS, ROWS, bias=False)


def cumulative_update(name: str, dtype: torch.dtype, rounding: str = "kahan", lr: float = 1e-3,
                      weight_decay: float = 0.0, gradients: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Train one 256x512 weight (weights in ``dtype``: bf16 is bf16-pure, fp32 the fp32 master)
    100 steps on a fixed sequence of bf16-exact gradients (zero ones with ``gradients`` False);
    returns (its update as stored, its start), in fp32."""
    torch.manual_seed(0)
    model = OneWeight()
    with torch.no_grad():  # a start that both formats hold exactly
        model.proj.weight.normal_(std=0.02).copy_(model.proj.weight.bfloat16())
    model = model.to(dtype)
    optimizer_plugin = plugin(name)
    settings = lowmem.OptimizerSettings(lr=lr, weight_decay=weight_decay, target_modules=("proj",),
                                        config=full_config(name, ON_ONE_WEIGHT[name]), bf16_rounding=rounding)
    optimizer = optimizer_plugin.build(optimizer_plugin.prepare_model(model, settings), settings)
    weight = model.proj.weight
    start = weight.detach().float().clone()
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        grad = (torch.randn(ROWS, COLS, generator=generator) * 0.01 + 0.003).bfloat16()
        weight.grad = grad.to(dtype) if gradients else torch.zeros_like(weight)
        optimizer.step()
        optimizer.zero_grad()
    return weight.detach().float() - start, start


def relative_error(update: torch.Tensor, reference: torch.Tensor) -> float:
    return float((update - reference).norm() / reference.norm())


@pytest.mark.parametrize("name", list(ON_ONE_WEIGHT))
def test_pure_bf16_update_matches_the_fp32_master_run(name):
    reference, _ = cumulative_update(name, torch.float32)
    kept, _ = cumulative_update(name, torch.bfloat16)
    assert relative_error(kept, reference) < 0.10
    if name in ("baseline", "galore", "galore8bit"):  # the check, without compensation: far off
        lost, _ = cumulative_update(name, torch.bfloat16, rounding="nearest", lr=1e-4)
        assert relative_error(lost, cumulative_update(name, torch.float32, lr=1e-4)[0]) > 0.4


@pytest.mark.parametrize("rounding", ["kahan", "stochastic"])
@pytest.mark.parametrize("name", ["baseline", "galore", "galore8bit"])
def test_weight_decay_changes_bf16_weights(name, rounding):
    """lr 1e-3 x decay 0.1 shrinks a weight by 1e-4 a step, 1/40 of bf16's spacing: rounded to
    nearest, nothing changes; kept, 100 steps shrink the weights by 1%. (Each element is still a
    bf16 value, a spacing apart: the norm, over all of them, shows the shrink.)"""
    kept, start = cumulative_update(name, torch.bfloat16, rounding, weight_decay=0.1, gradients=False)
    shrink = 1 - float((start + kept).norm() / start.norm())
    expected = 1 - (1 - 1e-3 * 0.1) ** STEPS
    assert abs(shrink - expected) < 0.1 * expected
    lost, _ = cumulative_update(name, torch.bfloat16, "nearest", weight_decay=0.1, gradients=False)
    assert not lost.any()


def test_weight_decay_of_galore8bit_in_bf16():
    """Decay beside real gradients (above: alone, where galore8bit's projection waits for a
    non-zero gradient and only decays): how much smaller decay leaves the weights, against the
    fp32 master run."""
    def shrink(dtype, rounding="kahan"):
        decayed, start = cumulative_update("galore8bit", dtype, rounding, weight_decay=0.1)
        plain, _ = cumulative_update("galore8bit", dtype, rounding)
        return 1 - float((start + decayed).norm() / (start + plain).norm())

    reference = shrink(torch.float32)
    assert reference > 0.005 and abs(shrink(torch.bfloat16) - reference) < 0.1 * reference
    assert abs(shrink(torch.bfloat16, "nearest") - reference) > 0.2 * reference


def test_stochastic_rounding_is_unbiased():
    from lowmem.rounding import stochastic_round_

    value = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way from 1 to the next bf16
    target = torch.empty_like(value, dtype=torch.bfloat16)
    stochastic_round_(target, value)
    assert set(target.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(target.float().mean().item() - value[0].item()) < 2e-5
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0])
    out = torch.empty_like(special, dtype=torch.bfloat16)
    stochastic_round_(out, special)
    assert out[0] == float("inf") and out[1] == float("-inf") and out[2].isnan() and out[3] == 0


def tiny_run(name: str, config: dict | None = None, rounding: str = "kahan", steps: int = 3):
    """A tiny bf16 llama trained ``steps`` steps as a run builds it; returns (model, optimizer)."""
    optimizer_plugin = plugin(name)
    settings = settings_for(name, config=config, bf16_rounding=rounding, weight_decay=0.1)
    model = optimizer_plugin.prepare_model(tiny_llama(0).to(torch.bfloat16), settings)
    optimizer = optimizer_plugin.build(model, settings)
    ids = torch.randint(3, 384, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


ALL = list(TINY_CONFIG)
PER_LAYER = ["galore", "galore8bit", "adamw8bit", "adafactor", "apollo", "adam-mini", "muon"]


@pytest.mark.parametrize("name", ALL + [f"{n}/per-layer" for n in PER_LAYER])
def test_state_keeps_its_dtypes_and_the_compensation_is_counted(name):
    """The optimizer's own state is what it is without lowmem's updates (same tensors, same
    dtypes); the compensation adds 2 bytes per bf16 trainable weight, which the estimator counts."""
    base = name.split("/")[0]
    config = {**TINY_CONFIG[base], "per_layer": True} if name.endswith("/per-layer") else None
    model, optimizer = tiny_run(base, config)
    plain_model, plain_optimizer = tiny_run(base, config, rounding="nearest")

    def layout(opt):
        return [(t.dtype, tuple(t.shape)) for t in memory.iter_tensors(list(opt.state.values()))]

    compensation = compensation_bytes(model.parameters())
    assert compensation == sum(2 * p.numel() for p in model.parameters()
                               if p.requires_grad and p.dtype == torch.bfloat16)
    if compensation:  # LoRA's adapters are fp32 (peft's choice): nothing to compensate
        assert layout(optimizer) != layout(plain_optimizer)
        pairs = zip(model.parameters(), plain_model.parameters(), strict=True)
        assert any(not torch.equal(p, q) for p, q in pairs)
    measured = memory.optimizer_state_bytes(optimizer)
    assert measured == memory.optimizer_state_bytes(plain_optimizer) + compensation
    declared = plugin(base).state_bytes(model, settings_for(base, config=config))
    if declared is not None:
        assert measured == declared + compensation


def test_lomo_keeps_small_updates_in_bf16():
    """LOMO adds its update in fp32 but rounded the weight to nearest, losing steps smaller than
    bf16's spacing; with lowmem's compensation the bf16 run follows the fp32 one."""
    def update(dtype, rounding):
        optimizer_plugin = plugin("lomo")
        settings = settings_for("lomo", lr=0.05, bf16_rounding=rounding)
        model = optimizer_plugin.prepare_model(tiny_llama(0).to(dtype), settings)
        optimizer_plugin.build(model, settings)  # steps inside backward
        start = model.model.layers[0].mlp.up_proj.weight.detach().float().clone()
        ids = torch.randint(3, 384, (4, 16), generator=torch.Generator().manual_seed(1))
        for _ in range(20):
            model(input_ids=ids, labels=ids).loss.backward()
        return model.model.layers[0].mlp.up_proj.weight.detach().float() - start

    reference = update(torch.float32, "kahan")
    kept, lost = relative_error(update(torch.bfloat16, "kahan"), reference), \
        relative_error(update(torch.bfloat16, "nearest"), reference)
    assert kept < 0.10 and lost > 0.4


def test_pure_bf16_run_counts_compensation_in_summary(cli, tmp_path):
    for rounding in ("kahan", "stochastic"):
        args = pretrain_args(tmp_path, "baseline", out=rounding, tokens=600,
                             extra=("--bf16-rounding", rounding, "--max-steps", "3"))
        args[args.index("--dtype") + 1] = "bf16-pure"
        result = cli(*args)
        assert result.exit_code == 0, result.output
    kahan = json.loads((tmp_path / "kahan" / "summary.json").read_text())
    stochastic = json.loads((tmp_path / "stochastic" / "summary.json").read_text())
    extra = kahan["optimizer_state_bytes"] - stochastic["optimizer_state_bytes"]
    assert extra == 2 * kahan["trainable_params"]
    config = json.loads((tmp_path / "kahan" / "config.json").read_text())
    assert config["bf16_rounding"] == "kahan"


def test_a_resume_keeps_the_rounding_of_its_checkpoint(cli, tmp_path):
    """Kahan's compensation is saved with the optimizer state: resuming with another rounding is
    refused in one line, and the run folder stays as it was."""
    args = pretrain_args(tmp_path, "baseline", tokens=600, extra=("--max-steps", "2", "--save-every", "2"))
    args[args.index("--dtype") + 1] = "bf16-pure"
    assert cli(*args).exit_code == 0
    before = sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir())
    for rounding in ("stochastic", "nearest"):
        result = cli(*args, "--bf16-rounding", rounding, "--resume", "latest")
        assert result.exit_code == 2, result.output
        assert f"bf16_rounding: 'kahan' -> '{rounding}'" in result.output and "Traceback" not in result.output
    assert sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir()) == before
    assert cli(*args, "--bf16-rounding", "kahan", "--resume", "latest").exit_code == 0


@pytest.mark.parametrize("optimizer", ["baseline", "lomo", "adalomo"])
def test_a_stochastic_rounding_run_resumes_exactly(cli, tmp_path, optimizer):
    """Stochastic rounding keeps a count per weight (it seeds the weight's noise) in the optimizer
    state, also for the optimizers that step inside backward: a resume continues the same steps."""
    from support_runs import interrupted_copy, resume_args, train_losses

    args = pretrain_args(tmp_path, optimizer, tokens=768, extra=("--bf16-rounding", "stochastic",
                                                                 "--save-every", "3", "--shuffle", "false"))
    args[args.index("--dtype") + 1] = "bf16-pure"
    result = cli(*args)
    assert result.exit_code == 0, result.output
    resumed = interrupted_copy(tmp_path / "run", tmp_path / "resumed", step=3)
    result = cli(*resume_args(args, resumed))
    assert result.exit_code == 0, result.output
    assert len(train_losses(resumed)) == 6
    assert train_losses(resumed) == train_losses(tmp_path / "run")


def test_bad_rounding_is_refused(cli, tmp_path):
    result = cli("train", "--model", "tiny-llama", "--dtype", "bf16-pure", "--bf16-rounding", "up",
                 "--output-dir", str(tmp_path / "r"))
    assert result.exit_code == 2 and "kahan" in result.output
    assert not (tmp_path / "r").exists()


def sharded_pure_bf16_args(tmp_path, tokens: int = 1280) -> list[str]:
    args = pretrain_args(tmp_path, "galore", out="sharded", tokens=tokens,
                         extra=("--parallel", "fsdp", "--shuffle", "false", "--save-every", "4",
                                "--keep-checkpoints", "5"))
    args[args.index("--dtype") + 1] = "bf16-pure"
    return args


def test_sharded_pure_bf16_keeps_small_updates_as_one_process(launch_env, tmp_path):
    """FSDP slices of bf16 weights update in fp32 like whole ones: with Kahan compensation (its
    state sliced like the weights) two processes take one process's steps exactly."""
    from support_runs import launch, train_losses

    args = sharded_pure_bf16_args(tmp_path)
    result = launch(launch_env, *args, "--nproc", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    one = [*args, "--grad-accum", "2"]
    one[one.index("--output-dir") + 1] = str(tmp_path / "one")
    one = [arg for arg in one if arg not in ("--parallel", "fsdp")]
    result = launch(launch_env, *one)
    assert result.returncode == 0, result.stdout + result.stderr
    assert train_losses(tmp_path / "sharded") == pytest.approx(train_losses(tmp_path / "one"), rel=1e-5)
    summary = json.loads((tmp_path / "sharded" / "summary.json").read_text())
    whole = json.loads((tmp_path / "one" / "summary.json").read_text())
    # Each process holds half of each compensation with its moments; the projections are whole.
    held, one = summary["optimizer_state_bytes"], whole["optimizer_state_bytes"]
    assert summary["world_optimizer_state_bytes"] > one and one / 2 < held < 0.6 * one


@pytest.mark.slow  # three launches, ~40 s
def test_sharded_pure_bf16_resumes_exactly(launch_env, tmp_path):
    """A resume at two processes from step 4, across the refresh at step 5: the projections stay
    bf16 (a resumed projector once came back fp32), so the steps and the state are the same."""
    from support_runs import interrupted_copy, launch, resume_args, train_losses

    args = sharded_pure_bf16_args(tmp_path, tokens=2560)
    result = launch(launch_env, *args, "--nproc", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    resumed = interrupted_copy(tmp_path / "sharded", tmp_path / "resumed", step=4)
    result = launch(launch_env, *resume_args(args, resumed), "--nproc", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert train_losses(resumed) == train_losses(tmp_path / "sharded")
    held = json.loads((tmp_path / "sharded" / "summary.json").read_text())["optimizer_state_bytes"]
    assert json.loads((resumed / "summary.json").read_text())["optimizer_state_bytes"] == held


@pytest.mark.slow  # two processes, ~12 s
def test_sharded_pure_bf16_rounds_to_nearest(launch_env, tmp_path):
    from support_runs import launch, train_losses

    args = [*sharded_pure_bf16_args(tmp_path), "--nproc", "2", "--bf16-rounding", "nearest"]
    result = launch(launch_env, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    losses = train_losses(tmp_path / "sharded")
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("rounding", [pytest.param("kahan", marks=pytest.mark.slow), "stochastic"])
def test_ddp_replicas_stay_identical_with_bf16_updates(launch_env, tmp_path, rounding):
    """Two DDP processes round the same updates the same way (stochastic: the same seed, the
    same draws); the run's end-of-training replica check would fail otherwise."""
    from support_runs import launch

    args = pretrain_args(tmp_path, "galore", out="ddp", tokens=1280,
                         extra=("--shuffle", "false", "--nproc", "2", "--bf16-rounding", rounding))
    args[args.index("--dtype") + 1] = "bf16-pure"
    result = launch(launch_env, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    state = json.loads((tmp_path / "ddp" / "summary.json").read_text())["optimizer_state_bytes"]
    assert state > 0


@pytest.mark.parametrize("name", ["baseline", "galore8bit", "adafactor", "muon"])
def test_stochastic_rounding_resumes_bitwise(name):
    """Each weight's noise is seeded by its place and how often it was rounded (kept in the
    state), so a resumed optimizer rounds exactly as the one it continues."""
    from support_optimizers import resume_differences

    assert not resume_differences(name, TINY_CONFIG[name], dtype=torch.bfloat16, weight_decay=0.1,
                                  bf16_rounding="stochastic")
