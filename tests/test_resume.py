"""Exact resume: a run continued from a checkpoint is bit-identical to one never interrupted."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from support_runs import assert_runs_identical, interrupted_copy, pretrain_args, resume_args, run_lowmem

TESTS = Path(__file__).resolve().parent












CASES = {
    "baseline": [],
    "lora": [],
    "galore": [],
    "galore8bit": [],
    "lora+galore8bit": [],
    "galore-accum": ["--grad-accum", "2"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_is_bitwise_identical(cli, tmp_path, case):
    optimizer = case.split("-")[0]
    args = pretrain_args(tmp_path, optimizer, out="reference", tokens=2600,
                         extra=["--save-every", "3", "--keep-checkpoints", "10", *CASES[case]])
    assert cli(*args).exit_code == 0
    resumed = interrupted_copy(tmp_path / "reference", tmp_path / "resumed", step=3)
    result = cli(*resume_args(args, resumed))
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output
    assert_runs_identical(tmp_path / "reference", resumed)


def test_resume_per_layer_galore(cli, tmp_path):
    config = tmp_path / "per_layer.json"
    config.write_text(json.dumps({"rank": 4, "update_proj_gap": 2, "per_layer": True}))
    args = pretrain_args(tmp_path, "galore8bit", out="reference", tokens=2600,
                         extra=["--optimizer-config", str(config), "--max-grad-norm", "0",
                                "--grad-accum", "2", "--save-every", "2", "--keep-checkpoints", "10"])
    assert cli(*args).exit_code == 0
    resumed = interrupted_copy(tmp_path / "reference", tmp_path / "resumed", step=2)
    assert cli(*resume_args(args, resumed)).exit_code == 0
    assert_runs_identical(tmp_path / "reference", resumed)


def test_resume_mid_epoch_finetuning_with_shuffle(cli, tmp_path):
    """A 40-row CSV in batches of 8: 5 batches an epoch, so step 7 is in the middle of epoch 2."""
    data = tmp_path / "reviews.csv"
    rows = ["text,label"] + [f"\"{'good fine great' if i % 2 else 'bad awful poor'} item {i}\","
                             f"{'pos' if i % 2 else 'neg'}"
                             for i in range(44)]
    data.write_text("\n".join(rows) + "\n")
    args = ["train", "--mode", "finetuning", "--optimizer", "galore", "--model", "tiny-gpt2",
            "--dataset", str(data), "--batch_size", "8", "--max_length", "32", "--num_epochs", "3",
            "--lr", "3e-3", "--dtype", "fp32",
            "--log-every", "1", "--eval-batches", "1", "--save-every", "7", "--keep-checkpoints", "5",
            "--output-dir", str(tmp_path / "reference"), "--galore_config", str(_galore_file(tmp_path)),
            "--model-path", str(_tiny_gpt2_weights(tmp_path))]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    resumed = interrupted_copy(tmp_path / "reference", tmp_path / "resumed", step=7)
    assert cli(*resume_args(args, resumed)).exit_code == 0
    assert_runs_identical(tmp_path / "reference", resumed)


def _galore_file(tmp_path: Path) -> Path:
    path = tmp_path / "g.json"
    path.write_text(json.dumps({"rank": 4, "update_proj_gap": 3}))
    return path


def _tiny_gpt2_weights(tmp_path: Path) -> Path:
    from tiny_plugin import TINY_VOCAB, tiny_model_classes

    from lowmem.api import CAUSAL_LM, ModelRequest

    folder = tmp_path / "gpt2-weights"
    model = tiny_model_classes()[1]().build(ModelRequest(objective=CAUSAL_LM, vocab_size=TINY_VOCAB))
    model.save_pretrained(folder)
    return folder


def test_incompatible_resume_is_refused(cli, tmp_path):
    args = pretrain_args(tmp_path, "galore", out="run", tokens=600)
    assert cli(*args).exit_code == 0
    other = resume_args(args, tmp_path / "run")
    other[other.index("--optimizer") + 1] = "baseline"
    result = cli(*other)
    assert result.exit_code == 2 and "cannot resume" in result.output and "optimizer" in result.output


def test_a_finished_run_resumed_is_left_as_it_was(cli, tmp_path):
    """Resuming a run that already finished trains nothing and repeats nothing; one killed inside
    its final stage finishes with one final evaluation row; a budget below the checkpoint is
    refused; ``--dtype auto`` and the dtype it resolved to are one setting."""
    from support_runs import read_metrics

    args = pretrain_args(tmp_path, "galore", out="run", tokens=600)
    assert cli(*args).exit_code == 0
    run = tmp_path / "run"
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "summary.json")}
    again = cli(*resume_args(args, run))
    assert again.exit_code == 0 and "already finished" in again.output, again.output
    assert {name: (run / name).read_bytes() for name in before} == before

    (run / "summary.json").unlink()  # as if killed after the final checkpoint, before the summary
    assert cli(*resume_args(args, run)).exit_code == 0
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "eval_loss" in r] == [r["step"] for r in rows if "loss" in r][-1:]
    assert json.loads((run / "summary.json").read_text())["steps"] == rows[-1]["step"]

    beyond = cli(*resume_args(args, run), "--max-steps", "1")
    assert beyond.exit_code == 2 and "past this run's last step 1" in beyond.output, beyond.output

    auto = [*args]
    auto[auto.index("--dtype") + 1] = "auto"
    auto[auto.index("--output-dir") + 1] = str(tmp_path / "auto")
    assert cli(*auto, "--max-steps", "1").exit_code == 0
    resolved = json.loads((tmp_path / "auto" / "config.json").read_text())["resolved_dtype"]
    auto[auto.index("--dtype") + 1] = resolved
    resumed = cli(*resume_args(auto, tmp_path / "auto"))
    assert resumed.exit_code == 0 and "resumed from" in resumed.output, resumed.output


# -- real processes: kill -9 during a save, SIGTERM ---------------------------------------------


@pytest.mark.parametrize("stage", [  # each kill costs ~10 s: one stage by default
    pytest.param("files", marks=pytest.mark.slow), "manifest",
    pytest.param("rename", marks=pytest.mark.slow)])
def test_kill_9_during_a_save_leaves_the_previous_checkpoint(cli, tmp_path, stage):
    from lowmem.checkpoint_files import complete_checkpoints, verify

    args = pretrain_args(tmp_path, "galore8bit", out="reference", tokens=2600,
                         extra=["--save-every", "3", "--keep-checkpoints", "10"])
    assert cli(*args).exit_code == 0
    victim_args = resume_args(args, tmp_path / "victim")[:-2]  # the same run, in another folder
    victim = run_lowmem(victim_args, fault=f"kill:{stage}@6")
    output, _ = victim.communicate(timeout=300)
    assert victim.returncode == -signal.SIGKILL, output
    survivors = complete_checkpoints(tmp_path / "victim")
    assert [p.name for p in survivors] == ["step-3"]
    verify(survivors[0])
    result = cli(*resume_args(args, tmp_path / "victim"))
    assert result.exit_code == 0, result.output
    assert not list((tmp_path / "victim" / "checkpoints").glob(".tmp-*"))
    assert_runs_identical(tmp_path / "reference", tmp_path / "victim")


def test_sigterm_saves_and_exits_cleanly(cli, tmp_path):
    from lowmem.checkpoint_files import complete_checkpoints, verify

    args = pretrain_args(tmp_path, "baseline", out="run", tokens=10**6)
    process = run_lowmem(args)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output
    assert "checkpoint saved" in output and "Traceback" not in output
    saved = complete_checkpoints(tmp_path / "run")
    assert saved and verify(saved[-1])["step"] >= 2


def test_a_resume_with_a_longer_schedule_follows_it_from_its_first_step(cli, tmp_path):
    """A run stopped by --max-steps 4 and resumed without it takes step 5 at the rate of the
    new, longer schedule (as a run that was never stopped does), not at the end of the old one."""
    from support_runs import read_metrics

    args = pretrain_args(tmp_path, "baseline", tokens=2048, extra=["--shuffle", "false"])
    assert cli(*args, "--max-steps", "4").exit_code == 0
    assert cli(*args, "--resume", "latest").exit_code == 0
    whole = [*args]
    whole[whole.index("--output-dir") + 1] = str(tmp_path / "whole")
    assert cli(*whole).exit_code == 0
    rates = {run: {row["step"]: row["lr"] for row in read_metrics(tmp_path / run) if "loss" in row}
             for run in ("run", "whole")}
    assert rates["run"][4] < rates["whole"][4]  # the short schedule had decayed by step 4
    assert {step: rate for step, rate in rates["run"].items() if step > 4} == \
        {step: rate for step, rate in rates["whole"].items() if step > 4}


def test_a_step_no_process_count_takes_names_the_counts_that_do():
    """The batch size must stay (it decides which sequences form a batch): a resume on another
    number of processes keeps the step's sequences with --grad-accum, or says where it can."""
    from lowmem.checkpoint import step_size_error

    assert step_size_error(8, 16, 4, 2).endswith("use --grad-accum 1")
    refused = step_size_error(16, 24, 4, 3)
    assert "1 process(es) with --grad-accum 4, or 2 process(es) with --grad-accum 2, or 4 process(es) " \
           "with --grad-accum 1" in refused and "--batch_size 4 (the checkpoint's)" in refused
