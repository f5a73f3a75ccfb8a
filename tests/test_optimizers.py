"""The five built-in optimizer plugins on tiny LLaMA / GPT-2 / RoBERTa models (CPU, seconds)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

import lowmem

torch = pytest.importorskip("torch")

from support_optimizers import (  # noqa: E402
    LLAMA_TARGETS,
    MODELS,
    NAMES,
    TINY_CONFIG,
    VOCAB,
    all_groups,
    assert_plain_state,
    batch_for,
    decay_of,
    exempt_from_decay,
    full_config,
    plugin,
    settings_for,
    setup,
    tiny_llama,
    train,
)


# -- registration ----------------------------------------------------------------------------
def test_plugin_modules_register_without_importing_torch():
    code = (
        "import sys\n"
        "from lowmem.registry import Registry\n"
        "import importlib\n"
        "r = Registry()\n"
        "for n in ('baseline', 'lora', 'galore', 'galore8bit', 'lora_galore8bit'):\n"
        "    r.add(importlib.import_module('lowmem.plugins.optimizers.' + n), n, 'built-in')\n"
        "import lowmem.plugins.optimizers.decay, lowmem.plugins.optimizers.targets\n"
        "print(sorted(r.optimizers), [m for m in ('torch', 'peft', 'bitsandbytes') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{sorted(NAMES)} []"


def test_config_files_and_defaults():
    assert plugin("lora").config_files == ("lora",)
    assert plugin("galore").config_files == ("galore",)
    assert plugin("lora+galore8bit").config_files == ("lora", "galore")
    assert plugin("galore").default_config == {"rank": None, "update_proj_gap": 200, "scale": 0.25,
                                               "proj_type": "std", "per_layer": False, "svd": "full"}
    assert plugin("galore8bit").default_config["min_8bit_size"] == 4096


# -- training --------------------------------------------------------------------------------
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_loss_falls_on_tiny_llama(name, bf16):
    _, model, optimizer, _ = setup(name)
    losses = train(model, optimizer, batch_for(lowmem.CAUSAL_LM), steps=12, bf16=bf16)
    assert losses[-1] < losses[0] - 0.2, losses


@pytest.mark.parametrize("model_key", ["gpt2", "roberta"])
@pytest.mark.parametrize("name", NAMES)
def test_loss_falls_on_gpt2_and_roberta_classification(name, model_key):
    _, model, optimizer, _ = setup(name, model_key)
    losses = train(model, optimizer, batch_for(MODELS[model_key][2]), steps=12)
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("name", ["lora", "lora+galore8bit"])
def test_lora_classification_trains_the_head(name):
    _, model, optimizer, _ = setup(name, "roberta")
    head = {n: p.detach().clone() for n, p in model.named_parameters()
            if "classifier" in n and p.requires_grad}
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in head} == {
        "dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"}
    train(model, optimizer, batch_for(lowmem.CLASSIFICATION), steps=2)
    assert all(not torch.equal(p, dict(model.named_parameters())[n]) for n, p in head.items())


def test_lora_masked_lm_adapts_the_body_only():
    from transformers import RobertaConfig, RobertaForMaskedLM

    model = RobertaForMaskedLM(RobertaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, vocab_size=VOCAB,
                                             max_position_embeddings=64))
    settings = settings_for("lora", "roberta", objective=lowmem.MASKED_LM)
    model = plugin("lora").prepare_model(model, settings)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and "lm_head" not in n for n in trainable)


def test_lora_trainable_count_on_llama_60m_shape():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                             num_attention_heads=8, vocab_size=32000))
    settings = lowmem.OptimizerSettings(lr=1e-3, target_modules=LLAMA_TARGETS, config=full_config("lora", {}))
    model = plugin("lora").prepare_model(model, settings)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 624_640


# -- weight decay and eps -------------------------------------------------------------------
EPS = {"baseline": 1e-8, "lora": 1e-8, "galore": 1e-6, "galore8bit": 1e-8, "lora+galore8bit": 1e-8}
DECAY_CASES = [(name, key, False) for name in NAMES for key in ("llama", "roberta")] + [
    (name, key, True) for name in ("galore", "galore8bit") for key in ("llama", "roberta")]


def case_id(case):
    return f"{case[0]}-{case[1]}" + ("-per-layer" if case[2] else "")


def build_case(name, model_key, per_layer, **overrides):
    config = {**TINY_CONFIG[name], **({"per_layer": True} if per_layer else {})}
    return setup(name, model_key, config=config, **overrides)


@pytest.mark.parametrize("case", DECAY_CASES, ids=case_id)
def test_biases_and_norm_weights_are_not_decayed_by_default(case):
    _, model, optimizer, _ = build_case(*case, weight_decay=0.1)
    decay, exempt = decay_of(optimizer), exempt_from_decay(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert set(decay) == {id(p) for _, p in trainable}
    wrong = [n for n, p in trainable if decay[id(p)] != (0.0 if id(p) in exempt else 0.1)]
    assert not wrong
    assert all(g["weight_decay"] == 0.1 for g in all_groups(optimizer) if "rank" in g)
    if case[0] in ("lora", "lora+galore8bit"):
        assert all(decay[id(p)] == 0.1 for n, p in trainable if ".lora_" in n)  # the factors
    if case[1] == "roberta":  # the classifier's bias: peft's modules_to_save copy under lora
        assert any(decay[id(p)] == 0.0 for n, p in trainable
                   if "classifier" in n and n.endswith("out_proj.bias"))
    if case[0] not in ("lora", "lora+galore8bit"):  # norms train (RMSNorm / LayerNorm)
        assert any(decay[id(p)] == 0.0 for n, p in trainable if "norm" in n.lower())


@pytest.mark.parametrize("case", DECAY_CASES, ids=case_id)
def test_decay_norms_and_biases_decays_every_parameter(case):
    _, model, optimizer, _ = build_case(*case, weight_decay=0.1, decay_norms_and_biases=True)
    decay = decay_of(optimizer)
    assert set(decay) == {id(p) for p in model.parameters() if p.requires_grad}
    assert set(decay.values()) == {0.1}


@pytest.mark.parametrize("decay_all", [False, True], ids=["default", "decay-all"])
@pytest.mark.parametrize("name", NAMES)
def test_a_zero_gradient_step_shrinks_only_decayed_weights(name, decay_all):
    # With a zero gradient Adam's update is exactly 0: what changes is weight decay alone.
    _, model, optimizer, _ = setup(name, "roberta", weight_decay=0.5, lr=0.1,
                                   decay_norms_and_biases=decay_all)
    projected = {id(p) for g in all_groups(optimizer) if "rank" in g for p in g["params"]}
    exempt = exempt_from_decay(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for n, p in trainable:
            if n.endswith(".bias"):
                p.fill_(1.0)  # zero-initialised biases would hide a decay
            p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in trainable}
    optimizer.step()
    checked = 0
    for n, p in trainable:
        if id(p) in projected:  # decayed (groups checked above); 8-bit GaLore skips zero gradients
            continue
        if id(p) in exempt and not decay_all:
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.5), rtol=1e-6, atol=0, msg=n)
        checked += id(p) in exempt
    assert checked > 0


@pytest.mark.parametrize("per_layer", [False, True], ids=["whole", "per-layer"])
@pytest.mark.parametrize("name", NAMES)
def test_eps_is_the_same_in_every_group(name, per_layer):
    if per_layer and "galore" not in name:
        pytest.skip("per-layer mode is a GaLore option")
    _, _, optimizer, _ = build_case(name, "roberta", per_layer, weight_decay=0.1)
    groups = all_groups(optimizer)
    assert len(groups) >= 2 and any("rank" in g for g in groups) == ("galore" in name)
    assert {g["eps"] for g in groups} == {EPS[name]}
    for inner in getattr(optimizer, "inner_optimizers", [optimizer]):
        allowed = {"params", *inner.defaults, "rank", "update_proj_gap", "scale", "proj_type"}
        assert all(set(g) <= allowed for g in inner.param_groups)


# -- state bytes -----------------------------------------------------------------------------
@pytest.mark.parametrize("per_layer", [False, True], ids=["whole", "per-layer"])
@pytest.mark.parametrize("model_key", ["llama", "gpt2"])
@pytest.mark.parametrize("name", NAMES)
def test_state_bytes_estimate_equals_measured(name, model_key, per_layer):
    from lowmem.memory import optimizer_state_bytes as measured_state_bytes

    if per_layer and "galore" not in name:
        pytest.skip("per-layer mode is a GaLore option")
    config = {**TINY_CONFIG[name], **({"per_layer": True} if per_layer else {})}
    optimizer_plugin, model, optimizer, settings = setup(name, model_key, config=config)
    train(model, optimizer, batch_for(lowmem.CAUSAL_LM), steps=3)
    assert optimizer_plugin.state_bytes(model, settings) == measured_state_bytes(optimizer)


def test_state_bytes_of_llama_60m_shape():
    from transformers import LlamaConfig, LlamaForCausalLM

    expected = {"baseline": 464_589_100, "lora": 4_997_568, "galore": 327_487_488,
                "galore8bit": 94_157_824, "lora+galore8bit": 1_726_592}
    for name, value in expected.items():
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                                 num_attention_heads=8, vocab_size=32000))
        settings = lowmem.OptimizerSettings(lr=1e-3, target_modules=LLAMA_TARGETS,
                                            config=full_config(name, {}))
        optimizer_plugin = plugin(name)
        model = optimizer_plugin.prepare_model(model, settings)
        assert optimizer_plugin.state_bytes(model, settings) == value, name


# -- state round trip ------------------------------------------------------------------------
@pytest.mark.parametrize("per_layer", [False, True], ids=["whole", "per-layer"])
@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip_resumes_exactly(name, per_layer):
    if per_layer and "galore" not in name:
        pytest.skip("per-layer mode is a GaLore option")
    # A gap of 4 makes the resumed steps (4, 5) cross a projector refresh.
    config = {**TINY_CONFIG[name], **({"per_layer": True, "update_proj_gap": 4} if "galore" in name else {})}
    if not per_layer:
        config.pop("per_layer", None)
    optimizer_plugin, model, optimizer, settings = setup(name, config=config, weight_decay=0.1)
    batch = batch_for(lowmem.CAUSAL_LM)
    train(model, optimizer, batch, steps=3)
    saved = optimizer.state_dict()
    assert_plain_state(saved)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    resumed = optimizer_plugin.prepare_model(tiny_llama(seed=5), settings)
    resumed.load_state_dict(model.state_dict())
    resumed_optimizer = optimizer_plugin.build(resumed, settings)
    resumed_optimizer.load_state_dict(loaded)
    train(model, optimizer, batch, steps=2)
    train(resumed, resumed_optimizer, batch, steps=2)
    for (n, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), n


# -- configuration errors --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "values", "key"),
    [
        ("galore", {"rank": 0}, "'rank'"),
        ("galore8bit", {"update_proj_gap": 0}, "'update_proj_gap'"),
        ("galore", {"proj_type": "diagonal"}, "'proj_type'"),
        ("galore8bit", {"min_8bit_size": 0}, "'min_8bit_size'"),
        ("lora", {"r": 0}, "'r'"),
        ("lora", {"target_modules": []}, "'target_modules'"),
        ("lora+galore8bit", {"rank": 128}, "'rank' 128 must be smaller than the LoRA 'r' 8"),
        ("lora+galore8bit", {"rank": 8, "r": 8}, "'rank' 8"),
    ],
)
def test_bad_configs_name_the_key(name, values, key):
    optimizer_plugin = plugin(name)
    with pytest.raises(lowmem.ConfigError) as info:
        optimizer_plugin.check_config({**optimizer_plugin.default_config, **values})
    assert key in str(info.value)


def test_a_partial_config_is_refused_not_filled_in():
    settings = lowmem.OptimizerSettings(lr=1e-3, config={"rank": 8}, target_modules=LLAMA_TARGETS)
    with pytest.raises(ValueError, match="lacks update_proj_gap"):
        plugin("galore").build(tiny_llama(), settings)


# -- saving ----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft calls it
def test_lora_save_writes_adapter_and_merged_model(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    optimizer_plugin, model, optimizer, _ = setup("lora")
    batch = batch_for(lowmem.CAUSAL_LM)
    train(model, optimizer, batch, steps=3)
    model.eval()
    optimizer_plugin.save_model(model, tmp_path)
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
        merged = LlamaForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(merged(input_ids=batch["input_ids"]).logits, expected,
                                   atol=1e-4, rtol=1e-4)
        adapter = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
        torch.testing.assert_close(adapter(input_ids=batch["input_ids"]).logits, expected,
                                   atol=1e-5, rtol=1e-5)
    assert any(".lora_A." in n for n, _ in model.named_parameters())  # the training model kept its adapters
