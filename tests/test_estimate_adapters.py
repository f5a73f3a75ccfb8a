"""The estimator's LoRA activations against the tensors autograd really saves.

Counting method: every tensor handed to ``torch.autograd.graph.saved_tensors_hooks`` during a
16-bit autocast forward, by distinct storage, parameters left out. The difference between batch 2
and batch 1 cancels the weight copies; the difference between a 3-layer and a 2-layer model of
the same width leaves one block (whose input requires grad, as in every block but the first).
"""

from __future__ import annotations

import pytest

import lowmem
from lowmem.activations import NO_ADAPTERS, activation_bytes, adapter_layer_bytes, find_adapters
from lowmem.modeling import choose_targets

LENGTH = 16


def width_models(family: str):
    """The tiny model of ``family`` with 2 and with 3 layers, registered under new names."""
    from tiny_plugin import tiny_model_classes

    base = {"llama": 0, "gpt2": 1, "roberta": 2}[family]
    classes = []
    for layers in (2, 3):
        parent = tiny_model_classes()[base]
        key = "n_layer" if family == "gpt2" else "num_hidden_layers"
        classes.append(type(f"Layers{layers}", (parent,), {
            "name": f"{family}-{layers}-layers", "hf_config": {**parent.hf_config, key: layers}}))

    class Plugin:
        @lowmem.hookimpl
        def register_models(self, register):
            for cls in classes:
                register(cls())

    return Plugin()


def prepared(registry, model_name: str, optimizer: str, dropout: float):
    import torch

    model_plugin, optimizer_plugin = registry.model(model_name), registry.optimizer(optimizer)
    objective = model_plugin.objective("pretraining", "text")
    torch.manual_seed(0)
    model = model_plugin.build(lowmem.ModelRequest(objective=objective, vocab_size=model_plugin.vocab_size))
    config = {**optimizer_plugin.default_config}
    if "lora_dropout" in config:
        config["lora_dropout"] = dropout
    settings = lowmem.OptimizerSettings(lr=1e-3, config=config, objective=objective,
                                        target_modules=choose_targets(model, "", model_plugin))
    return optimizer_plugin.prepare_model(model, settings).train(), objective


def saved_bytes(model, batch: int, vocab: int) -> int:
    import torch

    kept, sizes = [], {}

    def pack(tensor):
        kept.append(tensor)  # alive until counted: no storage is reused under another tensor
        sizes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    ids = torch.randint(3, vocab, (batch, LENGTH), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for pointer, size in sizes.items() if pointer not in parameters)


def one_block_per_token(registry, family: str, optimizer: str, dropout: float) -> tuple[float, float]:
    """(counted, estimated) bytes per token of one more block."""
    counted, estimated = [], []
    for layers in (2, 3):
        model, objective = prepared(registry, f"{family}-{layers}-layers", optimizer, dropout)
        vocab = model.config.vocab_size
        counted.append(saved_bytes(model, 2, vocab) - saved_bytes(model, 1, vocab))
        adapters = find_adapters(model)
        per_batch = [activation_bytes(model.config, batch, LENGTH, "bf16", objective, adapters=adapters,
                                      device="cuda") for batch in (1, 2)]
        estimated.append(per_batch[1] - per_batch[0])
    return (counted[1] - counted[0]) / LENGTH, (estimated[1] - estimated[0]) / LENGTH


@pytest.mark.parametrize("family", ["llama", "gpt2", "roberta"])
def test_one_lora_block_keeps_what_the_formula_says(tiny_registry, family):
    """Without dropout the CPU and CUDA figures agree, so the CUDA formula is checked here: a
    frozen block keeps less, each adapter adds its input and r-wide output."""
    tiny_registry.add(width_models(family), "widths", "test")
    counted, estimated = one_block_per_token(tiny_registry, family, "lora", dropout=0.0)
    plain_counted, plain_estimated = one_block_per_token(tiny_registry, family, "baseline", dropout=0.0)
    assert plain_estimated == pytest.approx(plain_counted, rel=0.02)  # the calibration LoRA builds on
    assert estimated == pytest.approx(counted, rel=0.05)


def test_dropout_keeps_a_float_mask_per_adapter_on_cpu(tiny_registry):
    """CPU dropout multiplies by a float noise tensor of the adapter's dtype (fp32 here) and keeps
    it; CUDA's fused dropout keeps a bool mask."""
    tiny_registry.add(width_models("llama"), "widths", "test")
    with_dropout, _ = one_block_per_token(tiny_registry, "llama", "lora", dropout=0.1)
    without, _ = one_block_per_token(tiny_registry, "llama", "lora", dropout=0.0)
    model, _ = prepared(tiny_registry, "llama-3-layers", "lora", 0.1)
    one_block = find_adapters(model).layers[-7:]  # q, k, v, o, gate, up, down of the last block
    mask = sum(adapter_layer_bytes(*layer, "bf16", "cpu") - adapter_layer_bytes(i, r, False, "bf16", "cpu")
               for layer in one_block for i, r in [layer[:2]])
    assert with_dropout - without == pytest.approx(mask, rel=0.02)
    cuda = sum(adapter_layer_bytes(*layer, "bf16", "cuda") for layer in one_block)
    cpu = sum(adapter_layer_bytes(*layer, "bf16", "cpu") for layer in one_block)
    assert cpu - cuda == 3 * sum(layer[0] for layer in one_block)  # 4-byte floats against bools


def test_adapters_are_found_through_the_plugin_and_only_lora_freezes_the_blocks(tiny_registry):
    lora, _ = prepared(tiny_registry, "tiny-llama", "lora", 0.05)
    adapters = find_adapters(lora)
    assert adapters.body_frozen and len(adapters.layers) == 2 * 7  # 7 adapted layers per block
    assert {(i, r, dropout) for i, r, dropout in adapters.layers} == {(32, 8, True), (64, 8, True)}
    baseline, _ = prepared(tiny_registry, "tiny-llama", "baseline", 0.0)
    assert find_adapters(baseline) == NO_ADAPTERS


def test_the_estimate_names_its_device_and_only_adapters_depend_on_it(cli):
    import json

    def activations(optimizer: str, *extra: str) -> tuple[int, str]:
        result = cli("estimate", "--model", "tiny-llama", "--optimizer", optimizer, "--json",
                     "--batch_size", "4", "--max_length", "64", *extra)
        assert result.exit_code == 0, result.output
        row = json.loads(result.output)[optimizer]
        return row["activations"], row["settings"]["device"]

    assert activations("lora", "--device", "cpu")[0] > activations("lora", "--device", "cuda")[0]
    assert activations("baseline", "--device", "cpu")[0] == activations("baseline", "--device", "cuda")[0]
    assert activations("lora", "--device", "cpu")[1] == "cpu"
    assert activations("lora", "--device-memory", "1GiB")[1] == "cuda"  # a device's size: a GPU
    bad = cli("estimate", "--model", "tiny-llama", "--device", "tpu")
    assert bad.exit_code == 2 and "Traceback" not in bad.output
