"""lowmem estimate answers for the run that would really happen: a lever a run would not use is
not counted, a combination a run refuses is refused, ``--dtype auto`` is what a run picks, and a
model folder transformers cannot build is one line."""

from __future__ import annotations

import json

import pytest
from support_models import bert_folder, qwen2_folder

import lowmem
from lowmem.activations import activation_bytes


def estimated(cli, *args: str) -> dict:
    result = cli("estimate", "--json", *args)
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    return found[next(iter(found))]


def test_the_lean_loss_is_counted_only_where_a_run_uses_it(cli, tmp_path):
    bert = str(bert_folder(tmp_path / "bert"))  # a masked LM: a run keeps the usual loss
    common = ["--optimizer", "baseline", "--batch_size", "16", "--max_length", "128"]
    plain, lean = (estimated(cli, "--model", bert, *common, *extra) for extra in ([], ["--lean-loss"]))
    assert lean["activations"] == plain["activations"] and lean["settings"]["lean_loss"] is False
    assert any("--lean-loss applies to causal LMs" in note for note in lean["notes"])
    plain, lean = (estimated(cli, "--model", "tiny-llama", *common, *more) for more in ([], ["--lean-loss"]))
    assert lean["activations"] < plain["activations"] and lean["settings"]["lean_loss"] is True


@pytest.mark.parametrize(("args", "reason"), [
    (["--optimizer", "galore8bit", "--per-layer", "--dtype", "fp16"], "fp16 loss scaling cannot unscale"),
    (["--optimizer", "lomo", "--nproc", "2"], "before DDP averages the gradients"),
])
def test_what_a_run_refuses_is_not_estimated(cli, args, reason):
    result = cli("estimate", "--model", "tiny-llama", *args)
    assert result.exit_code == 2 and reason in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] != []
    # Among several optimizers it is n/a, with the reason, and the others are estimated.
    every = cli("estimate", "--model", "tiny-llama", "--json", *args[2:])
    assert every.exit_code == 0, every.output
    found = json.loads(every.output)
    assert reason in found[args[1]]["error"]


@pytest.mark.parametrize("optimizer", ["galore", "galore8bit"])
def test_a_galore_rank_a_run_refuses_is_refused_with_the_same_line(cli, tmp_path, optimizer):
    """tiny-llama's weights are 32 wide: rank 48 cannot project them (train refuses it)."""
    settings = tmp_path / "rank.json"
    settings.write_text(json.dumps({"rank": 48}))
    reason = "'rank' 48 does not work for model.layers.0.self_attn.q_proj.weight (32x32)"
    for extra in ([], ["--per-layer"]):
        result = cli("estimate", "--model", "tiny-llama", "--optimizer", optimizer,
                     "--optimizer-config", str(settings), *extra)
        assert result.exit_code == 2 and reason in result.output and "Traceback" not in result.output
    run = cli("train", "--mode", "pretraining", "--model", "tiny-llama", "--optimizer", optimizer,
              "--optimizer-config", str(settings),
              "--max-steps", "1", "--output-dir", str(tmp_path / "run"))
    assert run.exit_code == 2 and reason in run.output


def test_the_dataset_decides_what_a_finetuning_run_trains_for(cli, tmp_path):
    """--dataset as train takes it: prompt/completion files finetune the causal LM (its loss, and
    the lean loss, counted), labelled ones a classifier; the default finetuning data is GLUE's."""
    completions, labelled = tmp_path / "sft.jsonl", tmp_path / "labels.jsonl"
    completions.write_text("".join(json.dumps({"prompt": f"q {i}?", "completion": f" a {i}."}) + "\n"
                                   for i in range(20)))
    labelled.write_text("".join(json.dumps({"text": f"s {i}", "label": i % 2}) + "\n" for i in range(20)))
    common = ["--model", "tiny-llama", "--optimizer", "baseline", "--mode", "finetuning",
              "--max_length", "64"]
    objective = {name: estimated(cli, *common, *extra)["settings"]["objective"] for name, extra in (
        ("default", []), ("sft", ["--dataset", str(completions)]), ("labels", ["--dataset", str(labelled)]))}
    assert objective == {"default": "classification", "sft": "causal_lm", "labels": "classification"}
    lean = estimated(cli, *common, "--dataset", str(completions), "--lean-loss", "--batch_size", "40")
    plain = estimated(cli, *common, "--dataset", str(completions), "--batch_size", "40")
    assert lean["settings"]["lean_loss"] is True and lean["activations"] < plain["activations"]
    bad = cli("estimate", *common, "--dataset", "nope")
    assert bad.exit_code == 2 and "unknown dataset 'nope'" in bad.output and "Traceback" not in bad.output
    missing = cli("estimate", *common, "--dataset", str(tmp_path / "missing.jsonl"))  # a path: not a hub id
    assert missing.exit_code == 2 and "missing.jsonl: no such file or folder" in missing.output
    offline = cli("estimate", *common, "--dataset", "someone/corpus")  # a hub id, offline here
    assert offline.exit_code == 2 and "hub is switched off" in offline.output


def test_dtype_auto_is_estimated_as_a_run_resolves_it(cli):
    common = ["--model", "tiny-llama", "--optimizer", "baseline", "--device", "cuda"]
    auto, bf16 = (estimated(cli, *common, "--dtype", dtype) for dtype in ("auto", "bf16"))
    assert auto["settings"]["dtype"] == "bf16" and auto["total"] == bf16["total"]
    assert any("--dtype auto: estimated as bf16" in note for note in auto["notes"])


def test_the_batch_search_says_where_it_stopped(cli):
    args = ["estimate", "--model", "tiny-llama", "--optimizer", "baseline", "--gpu-memory", "100TiB",
            "--max_length", "16"]
    found = json.loads(cli(*args, "--json").output)
    row = found["optimizers"][0]
    assert row["largest_batch"] == found["batch_search_limit"] == 65536 and row["at_search_limit"] is True
    assert row["at_search_limit_checkpointing"] is True
    assert ">= 65536" in cli(*args).output  # "at least", not a figure the search never passed


def test_llama_like_decoders_take_llamas_formula_and_others_are_named(cli, tmp_path):
    from transformers import AutoConfig, GPTNeoXConfig, LlamaConfig

    qwen = qwen2_folder(tmp_path / "qwen")  # its blocks keep exactly LLaMA's tensors
    found = estimated(cli, "--model", str(qwen), "--optimizer", "baseline", "--max_length", "64")
    config = AutoConfig.from_pretrained(qwen)
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    as_llama = LlamaConfig(**{name: getattr(config, name) for name in sizes})
    settings = found["settings"]
    assert found["activations"] == activation_bytes(as_llama, settings["batch_size"], 64, settings["dtype"],
                                                    lowmem.CAUSAL_LM, device=settings["device"])
    assert not any("no measured formula" in note for note in found["notes"])
    neox = tmp_path / "neox"
    GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=320).save_pretrained(neox)
    other = estimated(cli, "--model", str(neox), "--optimizer", "baseline", "--max_length", "64")
    assert any("no measured formula for 'gpt_neox'" in note for note in other["notes"])


@pytest.mark.parametrize(("change", "reason"), [
    ({"num_attention_heads": 5}, "not a multiple of the number of attention heads"),
    ({"model_type": "nosuchmodel"}, "nosuchmodel"),
])
def test_a_model_folder_transformers_cannot_build_is_one_line(cli, tmp_path, change, reason):
    from transformers import LlamaConfig

    folder = qwen2_folder(tmp_path / "bad")  # its tokenizer, and a LLaMA config edited by hand
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=320, max_position_embeddings=256).to_dict()
    config.pop("head_dim", None)
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    run = tmp_path / "run"
    for args in (["estimate", "--model", str(folder), "--optimizer", "baseline"],
                 ["train", "--mode", "pretraining", "--model", str(folder), "--optimizer", "baseline",
                  "--test", "true", "--output-dir", str(run)]):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and reason in errors[0] and "Traceback" not in result.output
    assert not run.exists()


def test_the_family_config_files_overlay_as_in_train(cli, tmp_path):
    """--lora_config and --galore_config reach the optimizers that read them, then
    --optimizer-config overlays both, as train merges them; elsewhere they are noted and ignored."""
    galore, lora, last = tmp_path / "galore.json", tmp_path / "lora.json", tmp_path / "last.json"
    galore.write_text('{"rank": 8, "update_proj_gap": 50}')
    lora.write_text('{"r": 16}')
    last.write_text('{"rank": 4}')
    files = ["--galore_config", str(galore), "--lora-config", str(lora), "--max_length", "16"]
    both = json.loads(cli("estimate", "--json", "--model", "tiny-llama",
                          "--optimizer", "galore,lora,lora+galore8bit", *files).output)
    assert both["galore"]["settings"]["optimizer_config"]["rank"] == 8
    assert both["lora"]["settings"]["optimizer_config"]["r"] == 16
    assert {key: both["lora+galore8bit"]["settings"]["optimizer_config"][key]
            for key in ("r", "rank", "update_proj_gap")} == {"r": 16, "rank": 8, "update_proj_gap": 50}
    assert not any("ignored" in note for result in both.values() for note in result["notes"])
    overlaid = estimated(cli, "--model", "tiny-llama", "--optimizer", "galore", *files,
                         "--optimizer-config", str(last))
    assert overlaid["settings"]["optimizer_config"]["rank"] == 4
    assert overlaid["optimizer_states"] < both["galore"]["optimizer_states"]
    assert any("--lora_config does not apply to optimizer 'galore'" in note for note in overlaid["notes"])
    baseline = estimated(cli, "--model", "tiny-llama", "--optimizer", "baseline", *files)
    assert baseline["settings"]["optimizer_config"] == {}
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"rank": "eight"}')
    refused = cli("estimate", "--model", "tiny-llama", "--optimizer", "galore", "--galore_config", str(wrong))
    assert refused.exit_code == 2 and "'rank' must be" in refused.output, refused.output
    missing = str(tmp_path / "none.json")
    assert cli("estimate", "--model", "tiny-llama", "--lora_config", missing).exit_code == 2


def test_a_model_that_cannot_checkpoint_is_not_estimated_with_it(cli, plugins, tmp_path):
    """A run refuses --activation-checkpointing on a model without gradient checkpointing, so
    estimate refuses it too, and --gpu-memory shows only the batch without it."""
    from tiny_plugin import tiny_model_classes

    class NoCheckpointing(tiny_model_classes()[0]):
        name = "tiny-no-checkpointing"

        def build(self, request):
            model = super().build(request)
            model.supports_gradient_checkpointing = False
            return model

    class Models:
        @lowmem.hookimpl
        def register_models(self, register):
            register(NoCheckpointing())

    plugins(Models())
    model = ["--model", "tiny-no-checkpointing"]
    reason = "does not support gradient checkpointing"
    run = cli("train", "--mode", "pretraining", *model, "--optimizer", "baseline", "--test", "true",
              "--activation-checkpointing", "--output-dir", str(tmp_path / "run"))
    assert run.exit_code == 2 and reason in run.output, run.output
    refused = cli("estimate", *model, "--optimizer", "baseline", "--activation-checkpointing")
    assert refused.exit_code == 2 and reason in refused.output, refused.output
    for optimizers in ("baseline", "baseline,lora"):
        result = cli("estimate", *model, "--optimizer", optimizers, "--gpu-memory", "64MiB",
                     "--max_length", "64", "--json")
        assert result.exit_code == 0, result.output
        for row in json.loads(result.output)["optimizers"]:
            assert row["largest_batch"] > 0 and row["largest_batch_checkpointing"] is None
            assert reason in row["checkpointing_error"]
    table = cli("estimate", *model, "--optimizer", "baseline", "--gpu-memory", "64MiB", "--max_length", "64")
    assert table.exit_code == 0 and "with checkpointing: n/a, --activation-checkpointing" in table.output


def test_checkpointing_has_trains_spellings_in_estimate(cli):
    common = ["--model", "tiny-llama", "--optimizer", "baseline", "--max_length", "64"]
    totals = {flag: estimated(cli, *common, flag)["total"]
              for flag in ("--activation-checkpointing", "--activation_checkpointing",
                           "--gradient-checkpointing", "--gradient_checkpointing")}
    assert len(set(totals.values())) == 1
    assert estimated(cli, *common)["total"] > totals["--activation-checkpointing"]
