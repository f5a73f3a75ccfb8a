"""lowmem compare and lowmem plot on tiny models: one run per optimizer, reports and a real PNG."""

from __future__ import annotations

import json

import pytest

import lowmem

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = matplotlib.image.imread(str(path)).shape[:2]
    assert height > 100 and width > 100


def test_compare_three_optimizers_writes_reports_and_plot(cli, tmp_path):
    galore = tmp_path / "galore.json"
    galore.write_text(json.dumps({"rank": 8}))
    parent = tmp_path / "cmp"
    result = cli(
        "compare", "--mode", "pretraining", "--model", "tiny-llama", "--optimizers", "baseline,lora,galore",
        "--num_training_tokens", "512", "--batch_size", "4", "--max_length", "32", "--eval-batches", "1",
        "--galore_config", galore, "--output-dir", parent,
    )
    assert result.exit_code == 0, result.output
    data = json.loads((parent / "compare.json").read_text())
    assert [run["optimizer"] for run in data["runs"]] == ["baseline", "lora", "galore"]
    assert all(run["status"] == "ok" for run in data["runs"])
    lora = data["runs"][1]
    assert lora["figures"]["trainable_params"] < data["runs"][0]["figures"]["trainable_params"]
    assert 0 < lora["ratio_to_baseline"]["optimizer_state_bytes"] < 1
    assert data["runs"][0]["ratio_to_baseline"]["final_loss"] == 1.0
    markdown = (parent / "compare.md").read_text()
    assert sum(line.startswith(("| baseline", "| lora", "| galore")) for line in markdown.splitlines()) == 3
    assert "eval perplexity" in markdown and "(×" in markdown
    assert_png(parent / "compare.png")
    for name in ("baseline", "lora", "galore"):
        assert (parent / name / "summary.json").is_file()

    plotted = cli("plot", parent / "baseline", parent / "galore", "--output", tmp_path / "loss.png")
    assert plotted.exit_code == 0, plotted.output
    assert_png(tmp_path / "loss.png")


def test_a_failing_optimizer_is_reported_and_the_others_run(cli, tmp_path):
    # per_layer refuses gradient clipping: galore fails, baseline still trains.
    per_layer = tmp_path / "per_layer.json"
    per_layer.write_text(json.dumps({"rank": 8, "per_layer": True}))
    parent = tmp_path / "cmp"
    result = cli(
        "compare", "--mode", "pretraining", "--model", "tiny-llama", "--optimizers", "galore,baseline",
        "--num_training_tokens", "256", "--batch_size", "4", "--max_length", "32", "--eval-batches", "1",
        "--galore_config", per_layer, "--max-grad-norm", "1.0", "--output-dir", parent,
    )
    assert result.exit_code == 0, result.output
    runs = {run["optimizer"]: run for run in json.loads((parent / "compare.json").read_text())["runs"]}
    assert runs["galore"]["status"] == "failed" and "max_grad_norm" in runs["galore"]["reason"]
    assert runs["baseline"]["status"] == "ok"
    assert "failed" in (parent / "compare.md").read_text()


def test_compare_reuses_train_validation(cli, tmp_path):
    args = ["compare", "--mode", "pretraining", "--model", "tiny-llama", "--output-dir", tmp_path / "c"]
    assert cli(*args, "--optimizers", "baseline", "--batch_size", "0").exit_code == 2
    assert cli(*args, "--optimizers", "baseline,nope").exit_code == 2
    assert cli(*args, "--optimizers", "baseline,baseline").exit_code == 2
    assert not (tmp_path / "c" / "baseline").exists()


def test_plot_refuses_a_folder_that_is_not_a_run(cli, tmp_path):
    result = cli("plot", tmp_path, "--output", tmp_path / "x.png")
    assert result.exit_code == 2 and "metrics.jsonl" in result.output


# -- --optimizers all, sorted by peak memory, the GLUE columns -----------------------------------
def fake_result(config, peak: int, **figures):
    from lowmem.result import RunResult

    return RunResult(
        model=config.model, optimizer=config.optimizer, mode=config.mode, output_dir=config.output_dir,
        steps=1, tokens=128, final_loss=5.0, wall_seconds=1.0, train_seconds=1.0, tokens_per_second=128.0,
        step_seconds=1.0, param_bytes=4096, grad_bytes=4096, optimizer_state_bytes=peak // 100,
        trainable_params=1024, total_params=1024, peak_rss_bytes=peak, peak_allocated_bytes=None,
        peak_reserved_bytes=None, peak_memory_bytes=peak, world_size=1, eval_loss=5.0, **figures)


class MissingPackage(lowmem.Optimizer):
    name = "missing-package"
    description = "needs a package (not installed: pip install 'lowmem[missing]')"


class NotInstalled:
    @lowmem.hookimpl
    def register_optimizers(self, register):
        register(MissingPackage())


def test_all_runs_every_installed_optimizer_sorted_by_peak_memory(cli, plugins, monkeypatch, tmp_path):
    from lowmem import training

    plugins(NotInstalled())
    trained = []

    def train(config, registry=None, say=None):  # no training: figures chosen so the order is known
        trained.append(config.optimizer)
        if config.optimizer == "galore":
            raise lowmem.ConfigError("'rank' 128 does not fit")
        return fake_result(config, peak=10**6 * (100 - len(trained)))  # later runs use less memory

    monkeypatch.setattr(training, "train", train)
    parent = tmp_path / "cmp"
    result = cli("compare", "--mode", "pretraining", "--model", "tiny-llama", "--optimizers", "all",
                 "--output-dir", parent)
    assert result.exit_code == 0, result.output
    from lowmem.compare import installed
    from lowmem.registry import get_registry

    registry = get_registry()
    expected = sorted(name for name, entry in registry.optimizers.items() if installed(entry))
    assert trained[0] == "baseline" and sorted(trained) == expected  # the reference first
    assert "missing-package" not in trained and "compare: missing-package left out" in result.stderr
    runs = json.loads((parent / "compare.json").read_text())["runs"]
    assert [run["optimizer"] for run in runs] == trained  # compare.json keeps the run order
    ok = [name for name in reversed(trained) if name != "galore"]  # least peak memory first
    markdown = [line.split(" | ")[0][2:] for line in (parent / "compare.md").read_text().splitlines()
                if line.startswith("| ") and not line.startswith("| optimizer")]
    assert markdown == [*ok, "galore"]  # the failed run last
    table = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("│ ")]
    assert [name for name in table if name in trained] == [*ok, "galore"]
    assert_png(parent / "compare.png")


def test_all_goes_alone(cli, tmp_path):
    result = cli("compare", "--mode", "pretraining", "--model", "tiny-llama", "--optimizers", "all,lora",
                 "--output-dir", tmp_path / "c")
    assert result.exit_code == 2 and "give it alone" in result.output


def test_glue_columns_show_only_when_a_run_has_them(tmp_path):
    from lowmem.compare import CompareRun, table_rows
    from lowmem.config import TrainConfig

    config = TrainConfig(mode="finetuning", optimizer="baseline", model="tiny-roberta", output_dir="x")
    glue = {"eval_accuracy": 0.8, "eval_f1": 0.75, "eval_matthews_correlation": 0.5, "eval_pearson": 0.9,
            "eval_spearman": 0.85, "eval_accuracy_mismatched": 0.79}
    runs = [CompareRun("baseline", "x", fake_result(config, 2 * 10**6, **glue)),
            CompareRun("lora", "y", fake_result(config, 10**6, eval_accuracy=0.7)),
            CompareRun("galore", "z", reason="failed")]
    header, rows = table_rows(runs, "baseline")
    titles = ("eval F1", "eval Matthews corr.", "eval Pearson", "eval Spearman", "eval accuracy (mismatched)")
    assert set(titles) <= set(header)
    assert [row[0] for row in rows] == ["lora", "baseline", "galore"]
    f1 = header.index("eval F1")
    assert rows[1][f1] == "0.75" and rows[0][f1] == "-"
    header, _ = table_rows(runs[1:], "baseline")
    assert "eval F1" not in header and "eval accuracy" in header


@pytest.mark.slow
def test_compare_all_trains_every_installed_optimizer(cli, tmp_path):
    galore = tmp_path / "galore.json"
    galore.write_text(json.dumps({"rank": 8}))
    parent = tmp_path / "cmp"
    result = cli("compare", "--mode", "pretraining", "--model", "tiny-llama", "--optimizers", "all",
                 "--num_training_tokens", "128", "--batch_size", "4", "--max_length", "32", "--eval-batches",
                 "1", "--max-grad-norm", "0", "--galore_config", galore, "--output-dir", parent)
    assert result.exit_code == 0, result.output
    runs = json.loads((parent / "compare.json").read_text())["runs"]
    assert sum(run["status"] == "ok" for run in runs) >= 10
    peaks = [run["figures"]["peak_memory_bytes"] for run in runs if run["status"] == "ok"]
    markdown = (parent / "compare.md").read_text()
    rows = [line.split(" | ")[0][2:] for line in markdown.splitlines() if line.startswith("| ")][1:]
    ok = [run["optimizer"] for run in sorted((r for r in runs if r["status"] == "ok"),
                                             key=lambda r: r["figures"]["peak_memory_bytes"])]
    assert rows[:len(ok)] == ok and len(peaks) == len(ok)
