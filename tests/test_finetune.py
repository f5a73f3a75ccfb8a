"""Finetuning any Hugging Face model folder on the data layouts users bring, offline, on tiny
Qwen2 (causal LM) and BERT (encoder) folders with their own tokenizers."""

from __future__ import annotations

import json
import math
import random

import pytest
from support_models import bert_folder, qwen2_folder, sentences, write_jsonl
from support_runs import read_metrics


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return qwen2_folder(tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return bert_folder(tmp_path_factory.mktemp("bert"))


def finetune(cli, model, data, out, *extra):
    return cli("train", "--mode", "finetuning", "--optimizer", "baseline", "--model", str(model),
               "--dataset", str(data), "--batch_size", "8", "--max_length", "64", "--lr", "3e-3",
               "--dtype", "fp32", "--log-every", "10", "--eval-batches", "4", "--output-dir", str(out),
               *extra)


def summary(run):
    return json.loads((run / "summary.json").read_text())


def test_sft_learns_the_completion_only(cli, qwen, tmp_path):
    """Random prompts, one constant completion: only a completion-only loss can get near 0, so
    an eval loss below 0.5 proves the prompt tokens are masked."""
    rows = [{"prompt": f"question: {s}\nanswer:", "completion": " yes it is"} for s in sentences(120, seed=1)]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    result = finetune(cli, qwen, data, tmp_path / "run", "--num_epochs", "20", "--max-steps", "100")
    assert result.exit_code == 0, result.output
    found = summary(tmp_path / "run")
    assert found["eval_loss"] < 0.5 and found["model"] == str(qwen.resolve())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data_kind"] == "sft" and "self_attn.q_proj" in config["target_modules"]
    answer = cli("generate", str(tmp_path / "run"), "--prompt", "question: apple river\nanswer:",
                 "--max-new-tokens", "4")
    assert answer.exit_code == 0, answer.output
    assert answer.output.strip().startswith("yes"), answer.output


def test_chat_learns_the_assistant_turns_only(cli, qwen, tmp_path):
    rows = [{"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": s},
                          {"role": "assistant", "content": "sure thing"}]} for s in sentences(120, seed=2)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    result = finetune(cli, qwen, data, tmp_path / "run", "--num_epochs", "20", "--max-steps", "100",
                      "--packing")
    assert result.exit_code == 0, result.output
    assert summary(tmp_path / "run")["eval_loss"] < 0.5
    conversation = tmp_path / "ask.json"
    conversation.write_text(json.dumps([{"role": "user", "content": "green table"}]))
    answer = cli("generate", str(tmp_path / "run"), "--messages", str(conversation), "--max-new-tokens", "3")
    assert answer.exit_code == 0 and answer.output.strip().startswith("sure"), answer.output


def pair_rows(count, labels, seed=0):
    rng = random.Random(seed)
    rows = []
    for a, b in zip(sentences(count, seed), sentences(count, seed + 50), strict=True):
        rows.append({"sentence1": a, "sentence2": b, "label": labels(rng)})
    return rows


@pytest.mark.parametrize("layout,labels,keys", [
    ("binary", lambda rng: rng.randint(0, 1), ["eval_accuracy", "eval_f1", "eval_matthews_correlation"]),
    ("regression", lambda rng: round(rng.uniform(0, 5), 2), ["eval_pearson", "eval_spearman"]),
    ("nli", lambda rng: rng.choice(["entailment", "neutral", "contradiction"]), ["eval_accuracy"]),
])
def test_glue_layouts_give_their_metrics(cli, bert, tmp_path, layout, labels, keys):
    rows = pair_rows(64, labels)
    if layout == "nli":
        rows = [{"premise": r["sentence1"], "hypothesis": r["sentence2"], "label": r["label"]} for r in rows]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = finetune(cli, bert, data, tmp_path / "run", "--num_epochs", "1", "--optimizer", "lora")
    assert result.exit_code == 0, result.output
    found = summary(tmp_path / "run")
    for key in keys:
        assert found[key] is not None and math.isfinite(found[key]), (key, found)
    assert found["eval_perplexity"] is None
    eval_rows = [row for row in read_metrics(tmp_path / "run") if "eval_loss" in row]
    assert all(key in eval_rows[-1] for key in keys)


def test_estimate_on_a_folder(cli, qwen):
    result = cli("estimate", "--model", str(qwen), "--optimizer", "galore", "--json",
                 "--optimizer-config", str(qwen / "galore.json"))
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)["galore"]
    assert found["total_params"] > 0 and found["optimizer_states"] > 0


@pytest.fixture(scope="module", autouse=True)
def small_galore(qwen):
    (qwen / "galore.json").write_text(json.dumps({"rank": 8}))


def chat(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


BAD = {
    "no-completion.jsonl": ([{"prompt": "a"}], "'completion' is missing"),
    "mixed-labels.jsonl": ([{"text": "a b", "label": 1}, {"text": "c d", "label": "x"}],
                           "mixes numbers and strings"),
    "empty-completion.jsonl": ([{"prompt": "a", "completion": "  "}], "'completion' is empty"),
    "empty-turn.jsonl": ([chat(("user", "a"), ("assistant", ""))], "assistant turn is empty"),
    "bad-role.jsonl": ([chat(("wizard", "a"), ("assistant", "b"))], "unknown role 'wizard'"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_data_exits_2_naming_file_and_column(cli, qwen, tmp_path, name):
    rows, needle = BAD[name]
    data = write_jsonl(tmp_path / name, rows * 10)
    result = finetune(cli, qwen, data, tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert needle in result.output and name in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_bad_model_and_dataset_sources_exit_2(cli, qwen, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": s} for s in sentences(20)])
    no_config = tmp_path / "empty-model"
    no_config.mkdir()
    result = finetune(cli, no_config, data, tmp_path / "run")
    assert result.exit_code == 2 and "has no config.json" in result.output
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((qwen / "config.json").read_text())
    result = finetune(cli, no_tokenizer, data, tmp_path / "run")
    assert result.exit_code == 2 and "tokenizer" in result.output, result.output
    result = finetune(cli, qwen, "glue/mrpc", tmp_path / "run")
    assert result.exit_code == 2 and "glue" in result.output.lower() and "cache" in result.output
    assert not (tmp_path / "run").exists()


def test_galore_rank_follows_the_model_width_capped_by_the_smallest_layer(cli, qwen, tmp_path, registry):
    """No rank given: the paper's rank for the width (128 up to 512), capped at the smallest
    projected layer (Qwen2's k_proj here is 16 x 32), with a note; the paper's 512 for llama_1b."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": s} for s in sentences(40)])
    result = finetune(cli, qwen, data, tmp_path / "run", "--optimizer", "galore", "--max-steps", "2")
    assert result.exit_code == 0, result.output
    assert "GaLore rank 128" in result.output and "capped at 16" in result.output
    groups = json.loads((tmp_path / "run" / "config.json").read_text())["param_groups"]
    assert [g["rank"] for g in groups if "rank" in g] == [16]
    from lowmem.api import CAUSAL_LM, ModelRequest, OptimizerSettings

    galore = registry.optimizer("galore")
    request = ModelRequest(objective=CAUSAL_LM, vocab_size=32000, device="meta")
    model = registry.model("llama_1b").build(request)
    settings = OptimizerSettings(lr=1e-3, config=galore.default_config,
                                 target_modules=("q_proj", "down_proj"))
    assert galore.with_rank(model, settings, galore.projected_weights(model, settings))["rank"] == 512
