"""The five built-in optimizer plugins on tiny LLaMA / GPT-2 / RoBERTa models (CPU, seconds)."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest

import lowmem

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
torch = pytest.importorskip("torch")

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")
ROBERTA_TARGETS = ("query", "key", "value", "dense")
VOCAB = 384
NAMES = ("baseline", "lora", "galore", "galore8bit", "lora+galore8bit")
# Small enough for width-32 models: GaLore rank below 32, 8-bit states on the tiny matrices.
TINY_CONFIG = {
    "baseline": {},
    "lora": {"lora_dropout": 0.0},
    "galore": {"rank": 8},
    "galore8bit": {"rank": 8, "min_8bit_size": 256},
    "lora+galore8bit": {"rank": 4, "min_8bit_size": 64, "lora_dropout": 0.0},
}
LR = {"baseline": 1e-2, "galore": 1e-2, "galore8bit": 1e-2, "lora": 1e-2, "lora+galore8bit": 3e-2}


@pytest.fixture(autouse=True)
def single_thread():
    """Width-32 models: thread start-up costs more than it saves (5-30x slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def plugin(name: str) -> lowmem.Optimizer:
    from lowmem.plugins.optimizers import baseline, galore, galore8bit, lora, lora_galore8bit

    return {
        "baseline": baseline.Baseline,
        "lora": lora.LoRA,
        "galore": galore.GaLore,
        "galore8bit": galore8bit.GaLore8bit,
        "lora+galore8bit": lora_galore8bit.LoRAGaLore8bit,
    }[name]()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=VOCAB))


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0))


def tiny_roberta_classifier(seed: int = 0):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    return RobertaForSequenceClassification(RobertaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
        num_labels=3, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


MODELS = {  # name -> (factory, targets, objective)
    "llama": (tiny_llama, LLAMA_TARGETS, lowmem.CAUSAL_LM),
    "gpt2": (tiny_gpt2, GPT2_TARGETS, lowmem.CAUSAL_LM),
    "roberta": (tiny_roberta_classifier, ROBERTA_TARGETS, lowmem.CLASSIFICATION),
}


def batch_for(objective: str, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (4, 16), generator=generator)
    if objective == lowmem.CLASSIFICATION:
        return {"input_ids": ids, "labels": torch.tensor([0, 1, 2, 1])}
    return {"input_ids": ids, "labels": ids}


def settings_for(name: str, model_key: str = "llama", **overrides) -> lowmem.OptimizerSettings:
    _, targets, objective = MODELS[model_key]
    values = {"lr": LR[name], "config": TINY_CONFIG[name], "target_modules": targets, "objective": objective,
              "max_grad_norm": 0.0}
    values.update(overrides)
    return lowmem.OptimizerSettings(**values)


def setup(name: str, model_key: str = "llama", **overrides):
    """(plugin, prepared model, optimizer, settings)."""
    settings = settings_for(name, model_key, **overrides)
    optimizer_plugin = plugin(name)
    model = optimizer_plugin.prepare_model(MODELS[model_key][0](), settings)
    return optimizer_plugin, model, optimizer_plugin.build(model, settings), settings


def train(model, optimizer, batch, steps: int, bf16: bool = False, grad_accum: int = 1, scheduler=None):
    losses = []
    for _ in range(steps):
        for _ in range(grad_accum):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**batch).loss
            (loss / grad_accum).backward()
            losses.append(loss.item())
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad()
    return losses


# -- registration ----------------------------------------------------------------------------
def test_plugin_modules_register_without_importing_torch():
    code = (
        "import sys\n"
        "from lowmem.registry import Registry\n"
        "import importlib\n"
        "r = Registry()\n"
        "for n in ('baseline', 'lora', 'galore', 'galore8bit', 'lora_galore8bit'):\n"
        "    r.add(importlib.import_module('lowmem.plugins.optimizers.' + n), n, 'built-in')\n"
        "print(sorted(r.optimizers), [m for m in ('torch', 'peft', 'bitsandbytes') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{sorted(NAMES)} []"


def test_config_files_and_defaults():
    assert plugin("lora").config_files == ("lora",)
    assert plugin("galore").config_files == ("galore",)
    assert plugin("lora+galore8bit").config_files == ("lora", "galore")
    assert plugin("galore").default_config == {"rank": 128, "update_proj_gap": 200, "scale": 0.25,
                                               "proj_type": "std", "per_layer": False}
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
    head = {n: p.detach().clone() for n, p in model.named_parameters() if "classifier" in n and p.requires_grad}
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in head} == {
        "dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"}
    train(model, optimizer, batch_for(lowmem.CLASSIFICATION), steps=2)
    assert all(not torch.equal(p, dict(model.named_parameters())[n]) for n, p in head.items())


def test_lora_masked_lm_adapts_the_body_only():
    from transformers import RobertaConfig, RobertaForMaskedLM

    model = RobertaForMaskedLM(RobertaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64))
    settings = settings_for("lora", "roberta", objective=lowmem.MASKED_LM)
    model = plugin("lora").prepare_model(model, settings)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and "lm_head" not in n for n in trainable)


def test_lora_trainable_count_on_llama_60m_shape():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                             num_attention_heads=8, vocab_size=32000))
    settings = lowmem.OptimizerSettings(lr=1e-3, target_modules=LLAMA_TARGETS)
    model = plugin("lora").prepare_model(model, settings)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 624_640


def test_galore_groups_project_only_target_weights():
    _, model, optimizer, _ = setup("galore", "gpt2")
    projected, plain = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert projected["rank"] == 8 and "rank" not in plain
    assert sorted({names[id(p)].split(".")[-2] for p in projected["params"]}) == ["c_attn", "c_fc", "c_proj"]
    assert all(p.dim() == 2 for p in projected["params"])
    plain_names = [names[id(p)] for p in plain["params"]]
    assert "transformer.wte.weight" in plain_names and any(n.endswith(".bias") for n in plain_names)
    assert len(projected["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_galore_keeps_roberta_classifier_out_of_projection():
    _, model, optimizer, _ = setup("galore", "roberta")
    projected_ids = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert id(model.classifier.dense.weight) not in projected_ids
    assert id(model.roberta.encoder.layer[0].intermediate.dense.weight) in projected_ids


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
        settings = lowmem.OptimizerSettings(lr=1e-3, target_modules=LLAMA_TARGETS)
        optimizer_plugin = plugin(name)
        model = optimizer_plugin.prepare_model(model, settings)
        assert optimizer_plugin.state_bytes(model, settings) == value, name


# -- state round trip ------------------------------------------------------------------------
def assert_plain_state(value, where="state"):
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str | int), f"{where}: key {key!r}"
            assert_plain_state(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            assert_plain_state(item, f"{where}[{i}]")
    else:
        assert value is None or isinstance(value, torch.Tensor | int | float | str | bool), f"{where}: {value!r}"


@pytest.mark.parametrize("per_layer", [False, True], ids=["whole", "per-layer"])
@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip_resumes_exactly(name, per_layer):
    if per_layer and "galore" not in name:
        pytest.skip("per-layer mode is a GaLore option")
    # A gap of 4 makes the resumed steps (4, 5) cross a projector refresh.
    config = {**TINY_CONFIG[name], **({"per_layer": True, "update_proj_gap": 4} if "galore" in name else {})}
    if not per_layer:
        config.pop("per_layer", None)
    optimizer_plugin, model, optimizer, settings = setup(name, config=config)
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


def test_resume_uses_the_saved_projection_matrix():
    _, model, optimizer, settings = setup("galore")
    train(model, optimizer, batch_for(lowmem.CAUSAL_LM), steps=1)
    saved = optimizer.state_dict()
    fresh = plugin("galore").build(model, settings)
    fresh.load_state_dict(saved)
    for p in optimizer.param_groups[0]["params"]:
        projector = fresh.state[p]["projector"]
        assert torch.equal(projector.ortho_matrix, optimizer.state[p]["projector"].ortho_matrix)
        assert projector.proj_type == "std" and projector.rank == 8


# -- per-layer mode --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["galore", "galore8bit"])
def test_per_layer_with_accumulation_matches_the_whole_model_optimizer(name):
    batch = batch_for(lowmem.CAUSAL_LM)
    runs = {}
    for per_layer in (False, True):
        config = {**TINY_CONFIG[name], "per_layer": per_layer}
        _, model, optimizer, _ = setup(name, config=config, grad_accum=2)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
        train(model, optimizer, batch, steps=3, grad_accum=2, scheduler=scheduler)
        runs[per_layer] = (model, optimizer)
        if per_layer:
            assert all(g["lr"] == LR[name] * 0.5 ** 3 for inner in optimizer.inner_optimizers
                       for g in inner.param_groups)
            assert all(p.grad is None for p in model.parameters())
    for a, b in zip(runs[False][0].parameters(), runs[True][0].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_per_layer_zero_grad_restarts_the_window():
    _, model, optimizer, _ = setup("galore", config={"rank": 8, "per_layer": True}, grad_accum=2)
    before = [p.detach().clone() for p in model.parameters()]
    model(**batch_for(lowmem.CAUSAL_LM)).loss.backward()
    optimizer.zero_grad()  # a skipped micro-batch: nothing may step on the next one alone
    model(**batch_for(lowmem.CAUSAL_LM)).loss.backward()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [({"max_grad_norm": 1.0}, "--max-grad-norm 0"), ({"world_size": 2}, "single process")],
)
def test_per_layer_refuses_what_cannot_combine(overrides, needle):
    with pytest.raises(lowmem.ConfigError, match="per_layer") as info:
        setup("galore", config={"rank": 8, "per_layer": True}, **overrides)
    assert needle in str(info.value)


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
    from lowmem.config import merge_optimizer_config

    with pytest.raises(lowmem.ConfigError) as info:
        merge_optimizer_config(plugin(name), [("my.json", values)])
    assert key in str(info.value) and "my.json" in str(info.value)


@pytest.mark.parametrize("name", ["galore", "galore8bit"])
def test_rank_larger_than_a_matrix_is_refused_at_build(name):
    with pytest.raises(lowmem.ConfigError, match=r"'rank' 48 .*\(32x32\)"):
        setup(name, config={"rank": 48})


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
        torch.testing.assert_close(merged(input_ids=batch["input_ids"]).logits, expected, atol=1e-4, rtol=1e-4)
        adapter = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
        torch.testing.assert_close(adapter(input_ids=batch["input_ids"]).logits, expected, atol=1e-5, rtol=1e-5)
    assert any(".lora_A." in n for n, _ in model.named_parameters())  # the training model kept its adapters
