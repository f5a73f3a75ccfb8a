"""End to end through the CLI on tiny registered models: outputs, falling loss, reloadable models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support_runs import assert_loss_falls, pretrain_args, read_metrics, small_configs, train_losses

OPTIMIZERS = ["baseline", "lora", "galore", "galore8bit", "lora+galore8bit"]
SUMMARY_KEYS = {"final_loss", "eval_loss", "steps", "tokens", "wall_seconds", "tokens_per_second",
                "param_bytes", "grad_bytes", "optimizer_state_bytes", "trainable_params", "total_params",
                "peak_rss_bytes"}












def reload_matches_checkpoint(run: Path, auto_class) -> None:
    """The saved Hugging Face model gives the logits the trained weights (last checkpoint) give."""
    import safetensors.torch
    import torch

    from lowmem.api import ModelRequest, OptimizerSettings
    from lowmem.registry import get_registry

    config = json.loads((run / "config.json").read_text())
    reg = get_registry()
    plugin = reg.model(config["model"])
    optimizer = reg.optimizer(config["optimizer"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    request = ModelRequest(objective=config["objective"], vocab_size=len(tokenizer),
                           num_labels=len(config["label_names"]), pad_token_id=tokenizer.pad_token_id)
    settings = OptimizerSettings(lr=1e-3, config=config["optimizer_config"],
                                 target_modules=plugin.target_modules, objective=config["objective"],
                                 max_grad_norm=config["max_grad_norm"])
    in_memory = optimizer.prepare_model(plugin.build(request), settings)
    last = sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))[-1]
    safetensors.torch.load_model(in_memory, str(last / "model.safetensors"), strict=False)
    reloaded = auto_class.from_pretrained(run / "model")
    ids = tokenizer("def f(x): return x", return_tensors="pt")["input_ids"]
    in_memory.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, in_memory(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_pretraining_every_optimizer(cli, tmp_path, optimizer):
    from transformers import AutoModelForCausalLM

    result = cli(*pretrain_args(tmp_path, optimizer))
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and "eval_perplexity" in summary
    assert 3000 <= summary["tokens"] <= 3000 + 32  # budget honoured to one block
    assert summary["optimizer_state_bytes"] > 0 and summary["trainable_params"] > 0
    config = json.loads((run / "config.json").read_text())
    assert config["optimizer"] == optimizer and "versions" in config and config["world_size"] == 1
    rows = read_metrics(run)
    assert {"step", "tokens", "loss", "lr", "tokens_per_second"} <= set(rows[0])
    assert any("eval_perplexity" in row for row in rows)
    assert_loss_falls(run)
    reload_matches_checkpoint(run, AutoModelForCausalLM)
    if optimizer.startswith("lora"):
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(run / "model")
        assert isinstance(PeftModel.from_pretrained(base, run / "model" / "adapter"), PeftModel)


@pytest.fixture(scope="module")
def tiny_roberta_weights(tmp_path_factory):
    """A 'pretrained' tiny RoBERTa folder (random masked-LM weights) for finetuning to start from."""
    from tiny_plugin import TINY_VOCAB, tiny_model_classes

    from lowmem.api import MASKED_LM, ModelRequest

    folder = tmp_path_factory.mktemp("tiny-roberta-base")
    roberta = tiny_model_classes()[2]()
    model = roberta.build(ModelRequest(objective=MASKED_LM, vocab_size=TINY_VOCAB, pad_token_id=1))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_finetuning_classification_every_optimizer(cli, tmp_path, optimizer, tiny_roberta_weights):
    from transformers import AutoModelForSequenceClassification

    result = cli("train", "--model-path", str(tiny_roberta_weights), "--mode", "finetuning",
                 "--optimizer", optimizer, "--model", "tiny-roberta",
                 "--batch_size", "8", "--max_length", "64", "--num_epochs", "1", "--max-steps", "12",
                 "--lr", "3e-3", "--dtype", "fp32", "--log-every", "1", "--eval-batches", "2",
                 "--test", "false",
                 "--output-dir", str(tmp_path / "run"), *small_configs(tmp_path))
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["eval_accuracy"] <= 1.0 and summary["steps"] == 12
    assert_loss_falls(run)
    reload_matches_checkpoint(run, AutoModelForSequenceClassification)


def test_same_seed_same_losses(cli, tmp_path):
    for out in ("a", "b"):
        assert cli(*pretrain_args(tmp_path, "galore", out=out, tokens=1500)).exit_code == 0
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")


def test_fp16_runs_with_a_loss_scaler(cli, tmp_path):
    args = pretrain_args(tmp_path, "baseline", tokens=1500)
    args[args.index("--dtype") + 1] = "fp16"
    result = cli(*args)
    assert result.exit_code == 0, result.output
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/trainer_state.json")).read_text())
    assert state["scaler"]["scale"] > 0


def test_per_layer_galore_with_accumulation(cli, tmp_path):
    config = tmp_path / "per_layer.json"
    config.write_text(json.dumps({"rank": 4, "update_proj_gap": 5, "per_layer": True}))
    result = cli(*pretrain_args(tmp_path, "galore8bit", tokens=3000,
                                extra=["--optimizer-config", str(config), "--grad-accum", "2",
                                       "--max-grad-norm", "0"]))
    assert result.exit_code == 0, result.output
    assert_loss_falls(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["grad_bytes"] == summary["param_bytes"]  # accumulating: every gradient at once


def test_per_layer_refuses_a_given_clip_and_runs_unclipped_by_default(cli, tmp_path):
    config = tmp_path / "per_layer.json"
    config.write_text(json.dumps({"rank": 4, "per_layer": True}))
    clipped = cli(*pretrain_args(tmp_path, "galore", out="clipped",
                                 extra=["--optimizer-config", str(config), "--max-grad-norm", "1.0"]))
    assert clipped.exit_code == 2 and "max-grad-norm" in clipped.output
    assert not (tmp_path / "clipped").exists()
    result = cli(*pretrain_args(tmp_path, "galore", tokens=1000, extra=["--optimizer-config", str(config)]))
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["max_grad_norm"] is None and recorded["applied_max_grad_norm"] == 0.0
    norms = [row["grad_norm"] for row in read_metrics(tmp_path / "run") if "loss" in row]
    assert norms and all(norm is not None and norm > 0 for norm in norms)


def test_the_per_layer_flag_sets_the_optimizers_per_layer_mode(cli, tmp_path):
    result = cli(*pretrain_args(tmp_path, "galore", tokens=1000, extra=["--per-layer"]))
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["per_layer"] is True and recorded["optimizer_config"]["per_layer"] is True
    assert recorded["applied_max_grad_norm"] == 0.0  # stepped inside backward: not clipped
    # Its gradients went as it stepped: at most a few held at once, never none and never all.
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 < summary["grad_bytes"] < summary["param_bytes"]
    refused = cli(*pretrain_args(tmp_path, "baseline", out="refused", extra=["--per-layer"]))
    assert refused.exit_code == 2 and "has no per-layer mode" in refused.output
    assert "Traceback" not in refused.output and not (tmp_path / "refused").exists()


def test_the_default_clip_is_one_for_optimizers_that_step_after_backward(cli, tmp_path):
    result = cli(*pretrain_args(tmp_path, "baseline", tokens=600))
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["max_grad_norm"] is None and recorded["applied_max_grad_norm"] == 1.0


def test_test_mode_smoke_on_embedded_data(cli, tmp_path):
    result = cli("train", "--mode", "pretraining", "--optimizer", "galore", "--model", "tiny-llama",
                 "--test", "true", "--output-dir", str(tmp_path / "run"), *small_configs(tmp_path))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 1000 <= summary["tokens"] <= 1000 + 32 and (tmp_path / "run" / "model" / "config.json").exists()


@pytest.mark.parametrize("optimizer", ["baseline", "galore8bit"])
def test_pure_bf16_weights(cli, tmp_path, optimizer):
    """--dtype bf16-pure: bf16 weights and optimizer moments, no fp32 copy (the paper's 7B set-up)."""
    args = pretrain_args(tmp_path, optimizer, tokens=3000)
    args[args.index("--dtype") + 1] = "bf16-pure"
    result = cli(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["param_bytes"] == 2 * summary["total_params"]
    assert_loss_falls(tmp_path / "run")


def test_the_default_max_length_is_capped_at_a_shorter_context(cli, tmp_path):
    """tiny-llama has 128 positions: the default 512 becomes 128 (as estimate takes it), with a
    note; a length asked for beyond the context is refused."""
    common = ("train", "--mode", "pretraining", "--model", "tiny-llama", "--optimizer", "baseline",
              "--max-steps", "1", "--eval-batches", "1", "--batch_size", "2")
    result = cli(*common, "--output-dir", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert "is capped at 128" in result.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["max_length"] == 128
    refused = cli(*common, "--max_length", "129", "--output-dir", str(tmp_path / "long"))
    assert refused.exit_code == 2 and "longer than model 'tiny-llama' allows" in refused.output
    assert not (tmp_path / "long").exists()
