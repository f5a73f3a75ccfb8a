"""lowmem estimate: weights, gradients and optimizer states exactly as a real run measures them;
peak memory close to the measured RSS; llama_7b on the meta device against the GaLore paper."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import lowmem
from lowmem import memory
from lowmem.estimate import GENERIC_GUESS, estimate, state_reduction

# Small ranks / 8-bit thresholds so the tiny model's 32x32 and 32x64 weights are projected and quantised.
CASES = [
    ("baseline", {}, False),
    ("lora", {}, False),
    ("galore", {"rank": 8}, False),
    ("galore8bit", {"rank": 8, "min_8bit_size": 256}, False),
    ("galore8bit", {"rank": 8, "min_8bit_size": 256}, True),
    ("lora+galore8bit", {"min_8bit_size": 32}, False),
    ("plain-adamw", {}, False),
]


class PlainAdamW(lowmem.Optimizer):
    """A third-party optimizer that does not implement state_bytes."""

    name = "plain-adamw"
    description = "AdamW without a state_bytes method"

    def build(self, model, settings):
        import torch

        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)


class PlainAdamWPlugin:
    @lowmem.hookimpl
    def register_optimizers(self, register):
        register(PlainAdamW())


@pytest.fixture
def registry_with_plain(tiny_registry):
    tiny_registry.add(PlainAdamWPlugin(), "plain-adamw", "test")
    return tiny_registry


def train_two_steps(registry, model_name, optimizer_name, config, per_layer):
    """Build the real model and optimizer as a run does, take two steps; returns
    (model, optimizer, the most gradient bytes alive at once)."""
    import torch

    model_plugin, optimizer_plugin = registry.model(model_name), registry.optimizer(optimizer_name)
    full = {**optimizer_plugin.default_config, **config}
    if per_layer:
        full["per_layer"] = True
    settings = lowmem.OptimizerSettings(
        lr=1e-3, config=full, target_modules=model_plugin.target_modules, max_grad_norm=0.0,
    )
    torch.manual_seed(0)
    model = model_plugin.build(
        lowmem.ModelRequest(objective=lowmem.CAUSAL_LM, vocab_size=model_plugin.vocab_size))
    model = optimizer_plugin.prepare_model(model, settings)
    most_gradient_bytes = [0]

    def watch(_param):
        # Registered before the optimizer's own hooks: sees each gradient before per-layer frees it.
        most_gradient_bytes[0] = max(most_gradient_bytes[0], memory.gradient_bytes(model))

    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(watch)
    optimizer = optimizer_plugin.build(model, settings)
    for _ in range(2):
        ids = torch.randint(0, model_plugin.vocab_size, (2, 16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        most_gradient_bytes[0] = max(most_gradient_bytes[0], memory.gradient_bytes(model))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer, most_gradient_bytes[0]


@pytest.mark.parametrize(("name", "config", "per_layer"), CASES)
def test_estimate_equals_measured_bytes(registry_with_plain, name, config, per_layer):
    registry = registry_with_plain
    result = estimate(
        registry.model("tiny-llama"), registry.optimizer(name), mode="pretraining",
        objective=lowmem.CAUSAL_LM, batch_size=2, max_length=16, dtype="bf16", optimizer_config=config,
        per_layer=per_layer,
    )
    model, optimizer, gradient_bytes = train_two_steps(registry, "tiny-llama", name, config, per_layer)
    trainable, total = memory.parameter_counts(model)
    assert (result.trainable_params, result.total_params) == (trainable, total)
    assert result.weights == memory.parameter_bytes(model)
    assert result.gradients == gradient_bytes
    measured = memory.optimizer_state_bytes(optimizer)
    if name == "plain-adamw":
        # The guess is two fp32 moments; torch also keeps a 0-dim fp32 step per parameter.
        assert result.state_source == GENERIC_GUESS
        steps = 4 * sum(1 for p in model.parameters() if p.requires_grad)
        assert result.optimizer_states == measured - steps
    else:
        assert result.state_source == "plugin"
        assert result.optimizer_states == measured


def test_per_layer_needs_an_optimizer_with_that_mode(tiny_registry):
    with pytest.raises(lowmem.ConfigError, match="no per-layer mode"):
        estimate(
            tiny_registry.model("tiny-llama"), tiny_registry.optimizer("lora"), mode="pretraining",
            objective=lowmem.CAUSAL_LM, batch_size=1, max_length=16, dtype="bf16", optimizer_config={},
            per_layer=True,
        )


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    import lowmem
    from lowmem import memory
    from lowmem.estimate import estimate
    from lowmem.registry import load_registry
    from lowmem.plugins.models.llama import Llama, llama_shape

    class Medium(Llama):
        name = "medium-llama"
        vocab_size = 8000
        hf_config = llama_shape(256, 688, 4, 4)

    registry = load_registry("")
    model_plugin, optimizer_plugin = Medium(), registry.optimizer(sys.argv[1])
    batch, length = 4, 128
    result = estimate(model_plugin, optimizer_plugin, mode="pretraining", objective="causal_lm",
                      batch_size=batch, max_length=length, dtype="bf16", optimizer_config={}, per_layer=False)
    settings = lowmem.OptimizerSettings(lr=1e-4, config=dict(optimizer_plugin.default_config),
                                        target_modules=model_plugin.target_modules)
    ids = torch.randint(0, model_plugin.vocab_size, (batch, length))
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS from here on
    start = memory.current_rss_bytes()
    request = lowmem.ModelRequest(objective="causal_lm", vocab_size=model_plugin.vocab_size)
    model = optimizer_plugin.prepare_model(model_plugin.build(request), settings)
    optimizer = optimizer_plugin.build(model, settings)
    for _ in range(2):  # the second step is the peak: optimizer states exist by then
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
    print(json.dumps({"estimate": result.total, "growth": memory.peak_rss_bytes() - start}))
""")


# Slow and load-sensitive (RSS of a real training process): run with -m slow on a quiet machine.
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resets the peak RSS through /proc")
@pytest.mark.parametrize("name", ["baseline", "galore"])
def test_estimated_peak_is_close_to_measured_rss_growth(name):
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, name],
                          capture_output=True, text=True, check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = figures["estimate"] / figures["growth"]
    # Measured: baseline 0.91-1.02, galore 0.86 (its SVD workspace and projection temporaries are
    # not modelled). RSS also counts allocator pages and kernels' scratch, so 10% is not a fair
    # bound on CPU; the estimate must not be far off either way. On a loaded machine the growth
    # varied by +-10% between identical runs (glibc arenas), hence the margin.
    assert 0.75 <= ratio <= 1.25, {**figures, "ratio": ratio}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss across exec is Linux's")
def test_a_process_peak_is_its_own_not_its_parents():
    """ru_maxrss survives exec, so a run started by a large process used to report that
    process's size as its own peak; the peak is now this process's memory's own."""
    large = bytearray(400 * 2**20)
    large[::4096] = b"x" * len(large[::4096])  # touched: resident
    code = "from lowmem import memory; print(memory.peak_rss_bytes())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert memory.peak_rss_bytes() > 400 * 2**20 > int(child.stdout) > 0
    del large


def test_llama_7b_on_meta_device_against_the_galore_paper(tiny_registry):
    import time

    started = time.perf_counter()
    common = {"mode": "pretraining", "objective": lowmem.CAUSAL_LM, "batch_size": 1, "max_length": 256,
              "dtype": "bf16", "per_layer": True}
    model_plugin, galore8bit = tiny_registry.model("llama_7b"), tiny_registry.optimizer("galore8bit")
    default_rank = estimate(model_plugin, galore8bit, optimizer_config={}, **common)
    # The paper's 7B runs use rank 1024.
    paper_rank = estimate(model_plugin, galore8bit, optimizer_config={"rank": 1024}, **common)
    assert time.perf_counter() - started < 60
    assert 6.6e9 < default_rank.total_params < 6.8e9
    assert default_rank.gradients == 32000 * 4096 * 4  # the largest single gradient: an embedding table
    # With fp32 master weights and autocast copies, far more than 24 GB ...
    assert paper_rank.total > 40 * 2**30
    # ... with bf16 weights written back with stochastic rounding (no state; the paper rounds to
    # nearest, the same memory), within 10% of its 22.72 GB, and it fits in 24 GB.
    pure = estimate(model_plugin, galore8bit, optimizer_config={"rank": 1024},
                    **{**common, "dtype": "bf16-pure", "bf16_rounding": "stochastic"})
    assert abs(pure.total / 2**30 - 22.72) / 22.72 < 0.10 and pure.fits(24 * 2**30)
    assert pure.weights == 2 * pure.total_params and pure.weight_copies == 0
    # Kahan compensation keeps 2 more bytes per trainable weight.
    kahan = estimate(model_plugin, galore8bit, optimizer_config={"rank": 1024},
                     **{**common, "dtype": "bf16-pure"})
    assert kahan.optimizer_states - pure.optimizer_states == 2 * kahan.trainable_params
    reduction = state_reduction(paper_rank.optimizer_states, paper_rank.trainable_params)
    assert 0.70 < reduction < 0.90  # the paper: 8-bit GaLore saves 82.5% against bf16 AdamW


def test_cli_table_all_optimizers_and_na(cli):
    result = cli("estimate", "--model", "tiny-llama", "--per-layer", "--max-length", "64",
                 "--device-memory", "24GB")
    assert result.exit_code == 0, result.output
    for name in ("baseline", "lora", "galore", "galore8bit", "lora+galore8bit"):
        assert name in result.output
    assert "n/a for lora: optimizer 'lora' has no per-layer mode" in result.output
    assert "fits in 24.00 GiB" in result.output and "activations per layer and token" in result.output


def test_cli_json_and_errors(cli, tmp_path):
    config = tmp_path / "galore.json"
    config.write_text('{"rank": 8}')
    result = cli("estimate", "--model", "tiny-llama", "--optimizer", "galore", "--optimizer-config", config,
                 "--json", "--batch-size", "2", "--max-length", "16")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)["galore"]
    assert data["settings"]["optimizer_config"]["rank"] == 8 and data["total"] > data["weights"] > 0
    assert cli("estimate", "--model", "tiny-llama", "--optimizer", "lora", "--per-layer").exit_code == 2
    assert cli("estimate", "--model", "tiny-llama", "--device-memory", "lots").exit_code == 2
    assert cli("estimate", "--model", "nope").exit_code == 2


def test_gpu_memory_picks_the_largest_batch_the_estimate_says_fits(cli, tiny_registry):
    from lowmem.estimate_many import estimate_many

    result = cli("estimate", "--model", "tiny-llama", "--optimizer", "baseline", "--max-length", "64",
                 "--gpu-memory", "64MiB", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)["optimizers"][0]
    options = dict(mode="pretraining", max_length=64, dtype="bf16", per_layer=False, grad_accum=1)
    for key, checkpointing in (("largest_batch", False), ("largest_batch_checkpointing", True)):
        batch = row[key]
        assert batch >= 1
        fits = estimate_many(tiny_registry, "tiny-llama", "baseline", batch_size=batch,
                             checkpointing=checkpointing, **options)["baseline"]
        bigger = estimate_many(tiny_registry, "tiny-llama", "baseline", batch_size=batch + 1,
                               checkpointing=checkpointing, **options)["baseline"]
        assert fits.total <= 64 * 2**20 < bigger.total
    assert row["largest_batch_checkpointing"] > row["largest_batch"]
    assert row["fits_at_batch_1"] is row["fits_at_batch_1_checkpointing"] is True
    assert row["at_search_limit"] is row["at_search_limit_checkpointing"] is False


@pytest.mark.parametrize("optimizer", ["baseline", "lora"])
def test_a_plain_estimate_agrees_with_the_batch_gpu_memory_picks(cli, optimizer):
    """Both default to a GPU run on any machine (LoRA's CPU estimate differs): the batch the
    search picks fits by the plain estimate, and the next one does not."""
    common = ("estimate", "--model", "tiny-llama", "--optimizer", optimizer, "--max-length", "64", "--json")
    found = json.loads(cli(*common, "--gpu-memory", "64MiB").output)
    assert found["device"] == "cuda" and found["dtype"] == "bf16" and found["notes"] == []
    batch = found["optimizers"][0]["largest_batch"]
    totals = []
    for size in (batch, batch + 1):
        row = json.loads(cli(*common, "--batch_size", str(size)).output)[optimizer]
        assert row["settings"]["device"] == "cuda"
        totals.append(row["total"])
    assert totals[0] <= 64 * 2**20 < totals[1]


def test_gpu_memory_notes_name_the_optimizers_they_concern(cli):
    found = json.loads(cli("estimate", "--model", "tiny-llama", "--optimizer", "galore,baseline",
                           "--max-length", "64", "--nproc", "2", "--parallel", "fsdp",
                           "--gpu-memory", "64MiB", "--json").output)
    whole = [note for note in found["notes"] if "held whole by every process" in note]
    assert len(whole) == 2 and {note.split(":")[0] for note in whole} == {"galore", "baseline"}
    assert any(note.startswith("per process of 2 (FSDP)") for note in found["notes"])  # both: unnamed


def test_gpu_memory_answers_for_the_optimizers_given(cli):
    args = ("estimate", "--model", "tiny-llama", "--max-length", "64", "--gpu-memory", "64MiB", "--json")
    result = cli(*args, "--optimizer", "lora, galore8bit")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["optimizers"]
    assert [row["optimizer"] for row in rows] == ["lora", "galore8bit"]
    assert all(row["largest_batch"] >= 1 for row in rows)
    everyone = json.loads(cli(*args).output)["optimizers"]
    assert len(everyone) > 2 and {"lora", "galore8bit", "baseline"} <= {row["optimizer"] for row in everyone}
    for wrong in ("lora,nope", "lora,lora", "all"):
        refused = cli(*args, "--optimizer", wrong)
        assert refused.exit_code == 2 and "Traceback" not in refused.output, wrong


def test_gpu_memory_marks_what_cannot_fit_and_refuses_bad_sizes(cli):
    args = ("estimate", "--model", "tiny-llama", "--optimizer", "baseline", "--max-length", "64")
    result = cli(*args, "--gpu-memory", "1KiB", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)["optimizers"][0]
    assert row["largest_batch"] == row["largest_batch_checkpointing"] == 0
    assert row["fits_at_batch_1"] is row["fits_at_batch_1_checkpointing"] is False
    table = cli(*args, "--gpu-memory", "1KiB")
    assert "cannot fit" in table.output
    assert "nothing fits even at batch 1; try --dtype bf16-pure" in " ".join(table.output.split())
    bad = cli("estimate", "--model", "tiny-llama", "--gpu-memory", "lots")
    assert bad.exit_code == 2 and "not a size" in bad.output and "Traceback" not in bad.output


def test_sizes_read_binary_units_in_any_case():
    from lowmem.cli_options import parse_bytes

    assert parse_bytes("24GiB") == parse_bytes("24gb") == parse_bytes("24 G") == 24 * 2**30
    assert parse_bytes("1.5TiB") == 3 * 2**39 and parse_bytes("2PiB") == 2 * 2**50
    assert parse_bytes("512MiB") == 2**29 and parse_bytes("1e9") == 10**9


def test_checkpointing_and_lean_loss_shrink_the_activation_estimate(tiny_registry):
    from lowmem.estimate_many import estimate_many

    options = dict(mode="pretraining", batch_size=8, max_length=128, dtype="fp32", per_layer=False,
                   grad_accum=1)
    plain = estimate_many(tiny_registry, "tiny-llama", "baseline", **options)["baseline"]
    both = estimate_many(tiny_registry, "tiny-llama", "baseline", checkpointing=True, lean_loss=True,
                         **options)["baseline"]
    assert both.activations < plain.activations and both.weights == plain.weights


def test_per_layer_gradients_are_all_held_while_accumulating(cli, tmp_path):
    """Per-layer updates free each gradient once its weight steps, but a gradient that must sum
    two micro-batches (or sit in DDP's buckets) is held: the estimate counts what the run held."""
    out = tmp_path / "run"
    run = cli("train", "--mode", "pretraining", "--optimizer", "galore", "--model", "tiny-llama",
              "--per-layer", "--grad-accum", "2", "--batch_size", "2", "--max_length", "32",
              "--dtype", "fp32", "--max-steps", "2", "--output-dir", str(out))
    assert run.exit_code == 0, run.output
    held = json.loads((out / "summary.json").read_text())["grad_bytes"]

    def gradients(*extra: str) -> int:
        result = cli("estimate", "--json", "--model", "tiny-llama", "--optimizer", "galore", "--per-layer",
                     "--dtype", "fp32", "--max_length", "32", *extra)
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["galore"]["gradients"]

    assert gradients("--grad-accum", "2") == held
    assert gradients("--nproc", "2") == held  # DDP: its buckets hold every gradient
    assert gradients("--nproc", "2", "--parallel", "fsdp", "--grad-accum", "2") == held // 2
    assert gradients() < held / 2  # the largest one (the embedding table here)


def test_gpu_memory_says_which_levers_its_answer_assumed(cli):
    args = ("estimate", "--model", "tiny-llama", "--max-length", "64", "--gpu-memory", "64MiB",
            "--optimizer", "galore8bit", "--per-layer", "--lean-loss", "--nproc", "2", "--parallel", "fsdp")
    found = json.loads(cli(*args, "--json").output)
    assert found["settings"]["lean_loss"] is True and found["settings"]["parallel"] == "fsdp"
    assert found["settings"]["world_size"] == 2 and found["optimizers"][0]["per_layer"] is True
    title = " ".join(cli(*args).output.split())
    assert "lean loss" in title and "per process of 2 (FSDP)" in title and "per-layer" in title
