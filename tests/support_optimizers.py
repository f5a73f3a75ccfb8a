"""Shared set-up for the optimizer tests: tiny LLaMA / GPT-2 / RoBERTa models, the five built-in
optimizer plugins with settings for them, a training loop. Plain helpers, no tests, no fixtures.
"""

from __future__ import annotations

import logging

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import torch  # noqa: E402

import lowmem  # noqa: E402

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
# The optimizers built on other packages (tests/test_more_optimizers.py); the same helpers apply.
MORE_NAMES = ("adamw8bit", "adafactor", "apollo", "apollo-mini", "adam-mini", "muon", "lomo", "adalomo")
MORE_MODULES = {"adamw8bit": "adamw8bit", "adafactor": "adafactor", "apollo": "apollo",
                "apollo-mini": "apollo_mini", "adam-mini": "adammini", "muon": "muon", "lomo": "lomo",
                "adalomo": "adalomo"}
TINY_CONFIG.update({"adamw8bit": {"min_8bit_size": 256}, "adafactor": {}, "apollo": {"rank": 8},
                    "apollo-mini": {}, "adam-mini": {}, "muon": {}, "lomo": {}, "adalomo": {}})
# LOMO is SGD: it needs a far larger step than the Adam family.
LR.update({"adamw8bit": 1e-2, "adafactor": 1e-2, "apollo": 1e-2, "apollo-mini": 1e-2, "adam-mini": 1e-2,
           "muon": 1e-2, "lomo": 1.0, "adalomo": 0.1})


def plugin(name: str) -> lowmem.Optimizer:
    from lowmem.plugins.optimizers import baseline, galore, galore8bit, lora, lora_galore8bit

    if name in MORE_MODULES:
        return more_plugin(name)
    return {
        "baseline": baseline.Baseline,
        "lora": lora.LoRA,
        "galore": galore.GaLore,
        "galore8bit": galore8bit.GaLore8bit,
        "lora+galore8bit": lora_galore8bit.LoRAGaLore8bit,
    }[name]()


def more_plugin(name: str) -> lowmem.Optimizer:
    """One of MORE_NAMES, from the one plugin object its module registers."""
    import importlib

    module = importlib.import_module(f"lowmem.plugins.optimizers.{MORE_MODULES[name]}")
    found: list = []
    module.register_optimizers(found.append)
    return next(p for p in found if p.name == name)


def full_config(name: str, values: dict | None = None) -> dict:
    """What lowmem passes a plugin: its default_config overlaid by ``values`` (TINY_CONFIG when
    None), checked by the plugin's check_config."""
    optimizer_plugin = plugin(name)
    config = {**optimizer_plugin.default_config, **(TINY_CONFIG[name] if values is None else values)}
    optimizer_plugin.check_config(config)
    return config


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


def settings_for(name: str, model_key: str = "llama", config: dict | None = None,
                 **overrides) -> lowmem.OptimizerSettings:
    """Settings as lowmem builds them; ``config`` (default TINY_CONFIG[name]) over the defaults."""
    _, targets, objective = MODELS[model_key]
    values = {"lr": LR[name], "config": full_config(name, config), "target_modules": targets,
              "objective": objective, "max_grad_norm": 0.0}
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


def all_groups(optimizer) -> list[dict]:
    """Every param group that steps: the inner optimizers' groups in per-layer mode."""
    inner = getattr(optimizer, "inner_optimizers", None)
    if inner is None:
        return list(optimizer.param_groups)
    return [group for inner_optimizer in inner for group in inner_optimizer.param_groups]


def decay_of(optimizer) -> dict[int, float]:
    """id(parameter) -> the weight_decay of its group; a parameter in two groups fails."""
    found: dict[int, float] = {}
    for group in all_groups(optimizer):
        for p in group["params"]:
            assert id(p) not in found, "a parameter is in two groups"
            found[id(p)] = group["weight_decay"]
    return found


def exempt_from_decay(model) -> set[int]:
    """ids of the biases and normalisation weights of ``model``, found independently of lowmem's
    rule: parameters named ...bias, and those of LayerNorm / LlamaRMSNorm modules."""
    exempt = {id(p) for n, p in model.named_parameters() if n.endswith(".bias")}
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm) or type(module).__name__ == "LlamaRMSNorm":
            exempt |= {id(p) for p in module.parameters(recurse=False)}
    return exempt


def assert_plain_state(value, where="state"):
    """Only tensors and plain values: what torch.load(weights_only=True) reads back."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str | int), f"{where}: key {key!r}"
            assert_plain_state(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            assert_plain_state(item, f"{where}[{i}]")
    else:
        plain = value is None or isinstance(value, torch.Tensor | int | float | str | bool)
        assert plain, f"{where}: {value!r}"


def round_trip(state: dict) -> dict:
    """``state`` through torch.save and torch.load(weights_only=True), as a checkpoint does."""
    import io

    assert_plain_state(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def differing_parameters(a, b) -> list[str]:
    """Names of the parameters of models ``a`` and ``b`` that differ in any bit."""
    pairs = zip(a.named_parameters(), b.parameters(), strict=True)
    return [n for (n, x), y in pairs if not torch.equal(x, y)]


def resume_differences(name: str, config: dict, dtype=torch.float32, **overrides) -> list[str]:
    """Train a tiny llama (weights in ``dtype``: bfloat16 is bf16-pure) 3 steps, save the optimizer
    state through a weights_only round trip, load it into a freshly built optimizer on a copy of
    the model, take 2 more steps with both: the names of the parameters that differ in any bit
    (none when resume is exact)."""
    optimizer_plugin, settings = plugin(name), settings_for(name, config=config, **overrides)

    def build(seed):
        model = optimizer_plugin.prepare_model(tiny_llama(seed).to(dtype), settings)
        return model, optimizer_plugin.build(model, settings)

    (model, optimizer), (resumed, resumed_optimizer) = build(0), build(5)
    batch = batch_for(lowmem.CAUSAL_LM)
    train(model, optimizer, batch, steps=3)
    resumed.load_state_dict(model.state_dict())
    resumed_optimizer.load_state_dict(round_trip(optimizer.state_dict()))
    train(model, optimizer, batch, steps=2)
    train(resumed, resumed_optimizer, batch, steps=2)
    return differing_parameters(model, resumed)


def train_registry_model(model_plugin, optimizer_plugin, config: dict):
    """Build ``model_plugin``'s real model and the optimizer as a run does, take two bf16-autocast
    steps; returns (optimizer, the most gradient bytes alive at once)."""
    from lowmem import memory

    settings = lowmem.OptimizerSettings(lr=1e-3, config=config, target_modules=model_plugin.target_modules)
    torch.manual_seed(0)
    model = model_plugin.build(lowmem.ModelRequest(lowmem.CAUSAL_LM, vocab_size=model_plugin.vocab_size))
    model = optimizer_plugin.prepare_model(model, settings)
    most = [0]

    def watch(_param):  # registered before the optimizer's hooks: sees each gradient before they free it
        most[0] = max(most[0], memory.gradient_bytes(model))

    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(watch)
    optimizer = optimizer_plugin.build(model, settings)
    ids = torch.randint(0, model_plugin.vocab_size, (2, 16))
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer, most[0]
