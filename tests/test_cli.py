"""The CLI surface: every seed option in both spellings, and bad input -> one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowmem.cli_options import parse_count
from lowmem.config import TrainConfig
from lowmem.resolve import resolve_config

SEED_COMMAND = ("train --mode pretraining --optimizer lora --model llama_1b --batch_size 32 "
                "--num_epochs 20 --shuffle false --lr 3e-4").split()


@pytest.fixture
def captured(monkeypatch):
    """Capture the TrainConfig `train` hands to the core, resolved as the core would, instead of
    training."""
    from lowmem import training
    from lowmem.registry import get_registry

    seen = []

    def capture(config, registry=None, say=None):
        seen.append(resolve_config(config, get_registry(), say=print))
        raise SystemExit(0)

    monkeypatch.setattr(training, "train", capture)
    return seen


def test_seed_command_parses_exactly(cli, captured, tmp_path):
    result = cli(*SEED_COMMAND, "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    config = captured[0]
    assert (config.mode, config.optimizer, config.model) == ("pretraining", "lora", "llama_1b")
    assert (config.batch_size, config.num_epochs, config.shuffle, config.lr) == (32, 20, False, 3e-4)
    assert config.num_training_tokens == 10**9 and config.max_length == 512


def test_kebab_spellings_and_counts(cli, captured, tmp_path):
    result = cli("train", "--mode", "pretraining", "--optimizer", "baseline", "--model", "tiny-llama",
                 "--batch-size", "4", "--max-length", "64", "--num-training-tokens", "100M",
                 "--weight-decay", "0", "--output-dir", tmp_path / "run", "--test", "false")
    assert result.exit_code == 0, result.output
    assert captured[0].num_training_tokens == 100_000_000 and captured[0].batch_size == 4


@pytest.mark.parametrize(
    "text,value", [("1e9", 10**9), ("100M", 10**8), ("1B", 10**9), ("2.5k", 2500), ("1_000", 1000)]
)
def test_parse_count(text, value):
    assert parse_count(text) == value


BASE = ["train", "--mode", "pretraining", "--optimizer", "baseline", "--model", "tiny-llama",
        "--max_length", "64"]


@pytest.mark.parametrize("args,needle", [
    (["train", "--mode", "pretrain", "--optimizer", "baseline", "--model", "tiny-llama"],
     "pretraining, finetuning"),
    (["train", "--mode", "pretraining", "--optimizer", "adam9", "--model", "tiny-llama"],
     "unknown optimizer 'adam9'"),
    (["train", "--mode", "pretraining", "--optimizer", "baseline", "--model", "llama_3b"],
     "unknown model 'llama_3b'"),
    (BASE + ["--batch_size", "0"], "positive integer"),
    (BASE + ["--batch_size", "-3"], "positive integer"),
    (BASE + ["--batch_size", "many"], "batch_size"),
    (BASE + ["--lr", "-1"], "positive number"),
    (BASE + ["--shuffle", "maybe"], "true or false"),
    (BASE + ["--dtype", "fp8"], "auto, bf16, fp16, fp32"),
    (BASE + ["--num_training_tokens", "lots"], "not a count"),
    (BASE + ["--max_length", "4096"], "4096"),
    (BASE + ["--lora_config", "/nonexistent/lora.json"], "does not exist"),
])
def test_bad_input_exits_2_with_a_clear_line(cli, args, needle, captured):
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert result.output.strip().startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert not captured  # refused before the core was called: no model was built


@pytest.mark.parametrize("args,needle", [
    (BASE + ["--bogus-option"], "No such option: --bogus-option"),
    (BASE + ["--parallel", "zero"], "ddp, fsdp"),
    (["train", "--optimizer", "baseline", "--model", "tiny-llama"], "Missing option '--mode'"),
    (["estimate", "--model", "tiny-llama", "--gpu-memory", "abc"], "not a size"),
    (["estimate", "--model", "tiny-llama", "--gpu-memory", "0GiB"], "not a positive size"),
    (["estimate", "--model", "tiny-llama", "--gpu-memory", "24"], "no unit"),
    (["estimate", "--model", "tiny-llama", "--nproc", "0"], "--nproc"),
    (["no-such-command"], "No such command"),
])
def test_usage_errors_are_one_line_too(cli, args, needle):
    """Click would print a usage block and a hint above the error: lowmem prints the error."""
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert result.output.startswith("error: ") and needle in result.output


def test_unknown_optimizer_lists_choices(cli, captured):
    result = cli("train", "--mode", "pretraining", "--optimizer", "adam9", "--model", "tiny-llama")
    assert "baseline" in result.output and "lora+galore8bit" in result.output


def test_max_length_error_names_both_numbers(cli, captured):
    result = cli(*BASE, "--max_length", "4096")
    assert "4096" in result.output and "128" in result.output


@pytest.mark.parametrize("content,needle", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"rnk": 4}', "unknown key 'rnk'"),
    ('{"rank": "four"}', "'rank' must be a positive integer"),
])
def test_bad_config_files_name_file_and_key(cli, captured, tmp_path, content, needle):
    path = tmp_path / "galore.json"
    path.write_text(content)
    result = cli("train", "--mode", "pretraining", "--optimizer", "galore", "--model", "tiny-llama",
                 "--galore_config", path)
    assert result.exit_code == 2, result.output
    assert needle in result.output and str(path) in result.output


def test_config_file_for_another_optimizer_is_noted_and_ignored(cli, captured, tmp_path):
    path = tmp_path / "lora.json"
    path.write_text('{"r": 4}')
    result = cli(*BASE, "--lora_config", path, "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "does not apply to optimizer 'baseline'" in result.output


def test_config_show_prints_defaults_as_json(cli):
    result = cli("config", "show", "galore")
    assert result.exit_code == 0
    shown = json.loads(result.output)
    assert shown["rank"] is None and shown["update_proj_gap"] == 200  # None: by model width


def test_existing_run_is_never_overwritten(cli, captured, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    result = cli(*BASE, "--output-dir", run)
    assert result.exit_code == 2 and "already holds a run" in result.output


def test_listings_show_built_ins(cli):
    for command, names in (
        ("list-optimizers", ["baseline", "lora", "galore", "galore8bit", "lora+galore8bit"]),
        ("list-models", ["llama_60m", "llama_1b", "llama_7b", "roberta", "gpt2"]),
        ("list-datasets", ["stdlib-docs", "stdlib-topics"]),
    ):
        result = cli(command)
        assert result.exit_code == 0, result.output
        for name in names:
            assert name in result.output


def test_test_mode_caps_are_in_the_resolved_config(tiny_registry, tmp_path):
    config = TrainConfig(mode="finetuning", optimizer="lora", model="tiny-roberta", batch_size=8,
                         dtype="bf16", lr=1e-3, weight_decay=0.0, test=True, output_dir=str(tmp_path / "r"))
    config = resolve_config(config, tiny_registry, say=lambda m: None, environ={})
    assert config.max_steps == 4 and config.max_length == 128 and config.dataset == "stdlib-topics"


def test_options_that_do_not_apply_are_noted(tiny_registry, cli, tmp_path):
    notes: list[str] = []
    config = TrainConfig(mode="pretraining", optimizer="baseline", model="tiny-llama", dtype="fp32",
                         max_length=64, bf16_rounding="stochastic", output_dir=str(tmp_path / "run"))
    resolve_config(config, tiny_registry, say=notes.append, environ={})
    assert any("--bf16-rounding applies to --dtype bf16-pure" in note for note in notes)
    result = cli("estimate", "--model", "tiny-llama", "--optimizer", "baseline", "--max-length", "64",
                 "--gpu-memory", "64MiB", "--batch_size", "4", "--activation-checkpointing", "--json")
    assert result.exit_code == 0, result.output
    assert "--batch_size, --activation-checkpointing is not used" in result.stderr
    assert json.loads(result.stdout)["optimizers"][0]["largest_batch"] >= 1


def test_output_dir_that_is_a_file_is_refused_early(cli, captured, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for target in (blocker, blocker / "run"):
        result = cli(*BASE, "--output-dir", target)
        assert result.exit_code == 2 and "is a file" in result.output


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_output_dir_that_cannot_be_made_is_refused_early(cli, captured):
    result = cli(*BASE, "--output-dir", "/proc/lowmem-nowhere/run")
    assert result.exit_code == 2 and "cannot be created" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not captured


def test_nproc_that_disagrees_with_the_launcher_is_refused(cli, captured, monkeypatch):
    import lowmem.distributed

    monkeypatch.setenv("WORLD_SIZE", "2")  # one of two processes torchrun started
    result = cli(*BASE, "--nproc", "3")
    assert result.exit_code == 2 and "--nproc 3 under a launcher that started 2" in result.output
    assert not captured
    monkeypatch.delenv("WORLD_SIZE")  # accelerate's single-process launcher, asked for 2
    monkeypatch.setattr(lowmem.distributed, "processes_to_start", lambda environ: 2)
    result = cli(*BASE, "--nproc", "3")
    assert result.exit_code == 2 and "disagree" in result.output and not captured


def test_config_path_that_is_a_directory(cli, captured, tmp_path):
    result = cli(*BASE, "--optimizer-config", tmp_path)
    assert result.exit_code == 2 and "is a directory" in result.output


def test_estimate_rejects_an_infinite_device_memory(cli):
    result = cli("estimate", "--model", "tiny-llama", "--optimizer", "baseline", "--device-memory", "1e999")
    assert result.exit_code == 2 and "Traceback" not in result.output
