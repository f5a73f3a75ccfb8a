"""lowmem compare and lowmem plot on tiny models: one run per optimizer, reports and a real PNG."""

from __future__ import annotations

import json

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
