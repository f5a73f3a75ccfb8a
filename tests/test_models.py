"""Model plugins: exact shapes on the meta device, a training step per objective, loading weights,
and where finetuning weights come from offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_plugin import TINY_VOCAB

import lowmem
from lowmem.data import DataSpec, train_batches
from lowmem.modeling import find_weights, refuse_unrequested_remote_code


def on_meta(registry, name, objective=None, vocab=32000, num_labels=0):
    model = registry.model(name)
    objective = objective or model.objective("pretraining", "text")
    request = lowmem.ModelRequest(objective=objective, vocab_size=vocab, num_labels=num_labels, device="meta")
    return model.build(request)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def llama_params(vocab: int, hidden: int, intermediate: int, layers: int) -> int:
    """Untied input and output embeddings; per layer 4 attention and 3 MLP matrices and 2 RMSNorms."""
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden


def test_llama_60m_has_the_paper_parameter_count(registry):
    model = on_meta(registry, "llama_60m")
    assert n_params(model) == llama_params(32000, 512, 1376, 8) == 58_073_600
    assert next(model.parameters()).device.type == "meta"
    assert model.config.hidden_act == "silu" and model.config.max_position_embeddings == 1024


def test_llama_7b_builds_on_meta_in_seconds(registry):
    started = time.perf_counter()
    model = on_meta(registry, "llama_7b")
    assert time.perf_counter() - started < 30
    assert n_params(model) == llama_params(32000, 4096, 11008, 32) == 6_738_415_616
    assert model.config.max_position_embeddings == 2048
    assert n_params(on_meta(registry, "llama_1b")) == llama_params(32000, 2048, 5461, 24)


def test_gpt2_and_roberta_have_their_published_shapes(registry):
    assert n_params(on_meta(registry, "gpt2", vocab=50257)) == 124_439_808  # tied output embedding
    roberta = on_meta(registry, "roberta", vocab=50265)
    assert n_params(roberta) == 124_697_433  # roberta-base with its masked-LM head
    assert roberta.config.max_position_embeddings == 514  # 512 tokens after the padding offset
    assert registry.model("roberta").max_positions == 512


def test_objectives_follow_model_and_mode(registry):
    roberta, llama = registry.model("roberta"), registry.model("llama_60m")
    assert roberta.objective("pretraining", "text") == lowmem.MASKED_LM
    assert roberta.objective("finetuning", "text") == lowmem.MASKED_LM
    assert roberta.objective("finetuning", lowmem.CLASSIFICATION) == lowmem.CLASSIFICATION
    assert llama.objective("pretraining", "text") == lowmem.CAUSAL_LM
    assert llama.objective("finetuning", lowmem.CLASSIFICATION) == lowmem.CLASSIFICATION


STEPS = [
    ("tiny-llama", lowmem.CAUSAL_LM, "stdlib-docs"),
    ("tiny-llama", lowmem.CLASSIFICATION, "stdlib-topics"),
    ("tiny-gpt2", lowmem.CAUSAL_LM, "stdlib-docs"),
    ("tiny-gpt2", lowmem.CLASSIFICATION, "stdlib-topics"),
    ("tiny-roberta", lowmem.MASKED_LM, "stdlib-docs"),
    ("tiny-roberta", lowmem.CLASSIFICATION, "stdlib-topics"),
]


@pytest.mark.parametrize(("name", "objective", "dataset"), STEPS)
def test_one_training_step_on_a_real_batch(registry, tokenizer, name, objective, dataset):
    import torch

    plugin = registry.model(name)
    spec = DataSpec(
        dataset=registry.dataset(dataset), source=None, objective=objective, tokenizer=tokenizer,
        max_length=48, batch_size=4, seed=0, shuffle=True, cache_dir=Path(os.environ["LOWMEM_CACHE_DIR"]),
    )
    batch = next(iter(train_batches(spec, epoch=0)))
    labels = len(registry.dataset(dataset).label_names(lowmem.DataRequest("train")))
    torch.manual_seed(0)
    model = plugin.build(lowmem.ModelRequest(
        objective=objective, vocab_size=len(tokenizer), num_labels=labels,
        pad_token_id=tokenizer.pad_token_id,
    ))
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) or objective == lowmem.CLASSIFICATION
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    names = {module_name.rsplit(".", 1)[-1] for module_name, _ in model.named_modules()}
    assert set(plugin.target_modules) <= names  # LoRA and GaLore find what they target


def save_tiny_llama(registry, folder: Path) -> None:
    model = registry.model("tiny-llama").build(
        lowmem.ModelRequest(objective=lowmem.CAUSAL_LM, vocab_size=TINY_VOCAB))
    model.save_pretrained(folder)


def test_finetuning_loads_saved_weights_with_a_new_head_and_resized_vocab(registry, tmp_path):
    import torch

    save_tiny_llama(registry, tmp_path / "pretrained")
    request = lowmem.ModelRequest(
        objective=lowmem.CLASSIFICATION, vocab_size=TINY_VOCAB + 8, num_labels=3,
        weights=str(tmp_path / "pretrained"), pad_token_id=1,
    )
    model = registry.model("tiny-llama").build(request)
    assert model.config.num_labels == 3 and model.get_input_embeddings().num_embeddings == TINY_VOCAB + 8
    assert next(model.parameters()).dtype == torch.float32
    saved = registry.model("tiny-llama").build(
        lowmem.ModelRequest(objective=lowmem.CAUSAL_LM, vocab_size=TINY_VOCAB,
                            weights=str(tmp_path / "pretrained"))
    )
    layer = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[layer], saved.state_dict()[layer])
    on_meta_from_folder = registry.model("tiny-llama").build(
        lowmem.ModelRequest(objective=lowmem.CAUSAL_LM, vocab_size=TINY_VOCAB,
                            weights=str(tmp_path / "pretrained"), device="meta")
    )
    assert n_params(on_meta_from_folder) == n_params(saved)


def test_a_folder_shipping_its_own_code_is_refused_without_the_flag(registry, tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    config = {"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(config))
    request = lowmem.ModelRequest(objective=lowmem.CAUSAL_LM, vocab_size=TINY_VOCAB, weights=str(folder))
    with pytest.raises(lowmem.ConfigError, match="ships its own code; pass --trust-remote-code"):
        registry.model("tiny-llama").build(request)
    refuse_unrequested_remote_code(str(folder), trust_remote_code=True)  # allowed when asked for


def test_weights_come_from_model_path_or_fail_offline_with_instructions(registry):
    messages: list[str] = []
    roberta, llama = registry.model("roberta"), registry.model("llama_60m")
    assert find_weights(roberta, "pretraining", None, test=False, say=messages.append) is None
    found = find_weights(roberta, "finetuning", "/models/mine", test=False, say=messages.append)
    assert found == "/models/mine"
    with pytest.raises(lowmem.ConfigError, match="--model-path") as failure:
        find_weights(roberta, "finetuning", None, test=False, say=messages.append)
    assert "huggingface-cli download roberta-base" in str(failure.value)
    with pytest.raises(lowmem.ConfigError, match="--model-path"):
        find_weights(llama, "finetuning", None, test=False, say=messages.append)
    assert messages == []
    assert find_weights(roberta, "finetuning", None, test=True, say=messages.append) is None
    assert messages and "--test falls back to random init" in messages[0] and "roberta" in messages[0]


def test_importing_the_model_plugins_does_not_import_torch():
    code = (
        "import sys, lowmem.plugins.models.llama, lowmem.plugins.models.gpt2, lowmem.plugins.models.roberta, "
        "lowmem.plugins.datasets.stdlib_docs, lowmem.plugins.datasets.stdlib_topics, "
        "lowmem.plugins.datasets.files, lowmem.plugins.datasets.hub\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("command", [
    ["estimate", "--model", "hf", "--optimizer", "baseline"],
    ["estimate", "--model", "hf", "--gpu-memory", "1GiB"],
    ["train", "--mode", "pretraining", "--model", "hf", "--optimizer", "baseline", "--test", "true"],
])
def test_the_bare_hf_entry_asks_for_a_source(cli, tmp_path, command):
    """`--model hf` names the plugin that loads folders and hub ids, not a model: one line, exit 2."""
    result = cli(*command, *(["--output-dir", str(tmp_path / "run")] if command[0] == "train" else []))
    assert result.exit_code == 2, result.output
    assert "model 'hf' needs a source" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()
