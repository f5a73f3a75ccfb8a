"""The optimizers built on other packages (adamw8bit, adafactor, apollo, apollo-mini, adam-mini, muon,
lomo, adalomo) and GaLore's randomized SVD, on tiny models (CPU, seconds)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lowmem

torch = pytest.importorskip("torch")

from support_optimizers import (  # noqa: E402
    LR,
    MODELS,
    MORE_MODULES,
    MORE_NAMES,
    TINY_CONFIG,
    all_groups,
    batch_for,
    decay_of,
    differing_parameters,
    exempt_from_decay,
    plugin,
    resume_differences,
    settings_for,
    setup,
    tiny_llama,
    train,
    train_registry_model,
)

from lowmem.plugins.optimizers import extras  # noqa: E402

APOLLO = extras.installed("apollo_torch")  # an extra: pip install 'lowmem[apollo]'
NAMES = tuple(n for n in MORE_NAMES if APOLLO or not n.startswith("apollo"))
IN_BACKWARD = ("lomo", "adalomo")  # always update from gradient hooks
PER_LAYER = tuple(n for n in NAMES if n not in IN_BACKWARD)  # "per_layer": true is an option
needs_apollo = pytest.mark.skipif(not APOLLO, reason="apollo-torch is not installed")


def config_of(name, per_layer=False, **values):
    return {**TINY_CONFIG[name], **({"per_layer": True} if per_layer else {}), **values}


# -- registration and availability -----------------------------------------------------------
def test_plugin_modules_register_without_importing_torch():
    code = (
        "import sys, importlib\n"
        "from lowmem.registry import Registry\n"
        "r = Registry()\n"
        f"for n in {sorted(set(MORE_MODULES.values()))!r}:\n"
        "    r.add(importlib.import_module('lowmem.plugins.optimizers.' + n), n, 'built-in')\n"
        "descriptions = [e.obj.description for e in r.optimizers.values()]  # 'not installed' checks too\n"
        "heavy = ('torch', 'transformers', 'bitsandbytes', 'apollo_torch', 'adam_mini', 'lomo_optim')\n"
        "print(sorted(r.optimizers), [m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{sorted(MORE_MODULES)} []"


def test_a_missing_package_is_named_with_its_pip_command(monkeypatch):
    monkeypatch.setattr(extras, "find_spec", lambda module: None)
    apollo = plugin("apollo")
    assert apollo.description.endswith("(not installed: pip install 'lowmem[apollo]')")
    with pytest.raises(lowmem.ConfigError, match=r"pip install 'lowmem\[apollo\]'"):
        apollo.check_config(apollo.default_config)
    with pytest.raises(lowmem.ConfigError, match="apollo_torch"):
        apollo.build(tiny_llama(), settings_for("apollo"))
    monkeypatch.setattr("lowmem.plugins.optimizers.muon.torch_version", lambda: (2, 8))
    muon = plugin("muon")
    assert "needs torch >= 2.9" in muon.description
    with pytest.raises(lowmem.ConfigError, match="torch >= 2.9"):
        muon.check_config(muon.default_config)


# -- training, state bytes, resume, per-layer ------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_loss_falls_on_tiny_llama(name):
    _, model, optimizer, _ = setup(name)
    losses = train(model, optimizer, batch_for(lowmem.CAUSAL_LM), steps=12)
    assert losses[-1] < losses[0] - 0.5, losses


STATE_CASES = [(n, m, False) for m in ("llama", "gpt2") for n in NAMES]
STATE_CASES += [(n, "llama", True) for n in PER_LAYER]


@pytest.mark.parametrize(("name", "model_key", "per_layer"), STATE_CASES)
def test_state_bytes_equal_measured(name, model_key, per_layer):
    from lowmem.memory import optimizer_state_bytes

    optimizer_plugin, model, optimizer, settings = setup(name, model_key, config=config_of(name, per_layer))
    train(model, optimizer, batch_for(lowmem.CAUSAL_LM), steps=3)
    measured = optimizer_state_bytes(optimizer)
    assert optimizer_plugin.state_bytes(model, settings) == measured
    assert (measured == 0) == (name == "lomo")  # plain SGD has no state


# A projection gap of 4: the resumed steps (4, 5) cross a refresh (a new random / SVD matrix).
GAP = {"update_proj_gap": 4}
RESUME_CASES = [(n, config_of(n)) for n in NAMES] + [(n, config_of(n, True)) for n in PER_LAYER] + [
    ("galore", config_of("galore", svd="randomized", **GAP)),
    ("galore8bit", config_of("galore8bit", True, svd="randomized", **GAP)),
]
if APOLLO:
    RESUME_CASES += [("apollo", config_of("apollo", proj=proj, **GAP)) for proj in ("random", "svd")]


@pytest.mark.parametrize(("name", "config"), RESUME_CASES, ids=lambda v: str(v) if isinstance(v, dict) else v)
def test_weights_only_round_trip_resumes_bitwise(name, config):
    assert not resume_differences(name, config, weight_decay=0.1)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_pure_resumes_bitwise(name):
    # torch's loader casts state to the weight's dtype: Adafactor's fp32 statistics must survive it.
    assert not resume_differences(name, TINY_CONFIG[name], dtype=torch.bfloat16, weight_decay=0.1)


@pytest.mark.parametrize("name", [*PER_LAYER, "galore"])
def test_per_layer_with_accumulation_equals_the_whole_model_optimizer(name):
    batch = batch_for(lowmem.CAUSAL_LM)
    models = []
    for per_layer in (False, True):
        config = config_of(name, per_layer, **({"svd": "randomized"} if name == "galore" else {}))
        _, model, optimizer, _ = setup(name, config=config, grad_accum=2, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
        train(model, optimizer, batch, steps=3, grad_accum=2, scheduler=scheduler)
        models.append(model)
        assert {g["lr"] for g in all_groups(optimizer)} == {LR[name] * 0.5 ** 3}  # the schedule drives all
    assert not differing_parameters(*models)


@pytest.mark.parametrize("name", ["lomo", "muon"])
def test_updating_in_backward_refuses_what_cannot_combine(name):
    # Several processes: lowmem steps per-layer optimizers after DDP's reduction and refuses LOMO
    # there (test_distributed).
    refused = (({"max_grad_norm": 1.0}, "--max-grad-norm 0"),)
    for overrides, needle in refused:
        with pytest.raises(lowmem.ConfigError, match=needle):
            setup(name, config=config_of(name, per_layer=True), **overrides)


def test_refusals_exit_with_code_2(cli, tmp_path):
    config = tmp_path / "lomo.json"
    config.write_text('{"per_layer": false}')
    result = cli("estimate", "--model", "tiny-llama", "--max-length", "64", "--optimizer", "lomo",
                 "--optimizer-config", config)
    assert result.exit_code == 2 and "'per_layer' must be true for lomo" in result.output


@pytest.mark.parametrize("name", NAMES)
def test_estimate_on_a_meta_model_equals_measured(registry, name):
    from lowmem import memory
    from lowmem.estimate import estimate

    model_plugin, optimizer_plugin = registry.model("tiny-llama"), registry.optimizer(name)
    result = estimate(model_plugin, optimizer_plugin, mode="pretraining", objective=lowmem.CAUSAL_LM,
                      batch_size=2, max_length=16, dtype="bf16", optimizer_config=TINY_CONFIG[name],
                      per_layer=False)
    assert result.state_source == "plugin"
    config = {**optimizer_plugin.default_config, **TINY_CONFIG[name]}
    optimizer, most_gradient_bytes = train_registry_model(model_plugin, optimizer_plugin, config)
    assert result.optimizer_states == memory.optimizer_state_bytes(optimizer)
    if name in IN_BACKWARD:  # one gradient alive at a time, as the estimate's per-layer figure says
        assert result.per_layer and result.gradients == most_gradient_bytes


@pytest.mark.parametrize("decay_all", [False, True], ids=["default", "decay-all"])
@pytest.mark.parametrize("name", NAMES)
def test_decay_follows_decay_norms_and_biases(name, decay_all):
    _, model, optimizer, _ = setup(name, "roberta", weight_decay=0.1, decay_norms_and_biases=decay_all)
    decay, exempt = decay_of(optimizer), exempt_from_decay(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert set(decay) == {id(p) for p in trainable} and exempt
    assert all(decay[id(p)] == (0.0 if id(p) in exempt and not decay_all else 0.1) for p in trainable)


# -- per package -----------------------------------------------------------------------------
def test_adamw8bit_and_adafactor_get_the_intended_settings():
    _, model, optimizer, _ = setup("adamw8bit")
    train(model, optimizer, batch_for(lowmem.CAUSAL_LM), steps=1)
    args = optimizer.args  # by keyword: no positional misbinding (max_unorm, skip_zeros)
    assert (args.optim_bits, args.max_unorm, args.skip_zeros, args.min_8bit_size) == (8, 0.0, False, 256)
    assert optimizer.state[model.model.layers[0].mlp.up_proj.weight]["state1"].dtype == torch.uint8
    groups = setup("adafactor")[2].param_groups  # lowmem's LR and schedule drive Adafactor
    keys = ("relative_step", "scale_parameter", "warmup_init", "lr")
    assert {tuple(g[k] for k in keys) for g in groups} == {(False, False, False, LR["adafactor"])}


def test_adam_mini_takes_its_shape_from_the_model_config(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # a multi-GPU machine, one process
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=384))
    optimizer = plugin("adam-mini").build(model, settings_for("adam-mini"))
    assert (optimizer.dim, optimizer.n_heads, optimizer.n_kv_heads, optimizer.world_size) == (32, 4, 2, 1)
    train(model, optimizer, batch_for(lowmem.CAUSAL_LM), steps=2)  # no collectives without a process group
    assert optimizer.state[model.model.layers[0].self_attn.k_proj.weight]["vmean"].shape == (2, 1)


@pytest.mark.parametrize("model_key", ["roberta", "gpt2"])
def test_adam_mini_trains_roberta_and_gpt2(model_key):
    # RoBERTa's "attention.output.LayerNorm.weight" would go to Adam-mini's per-row branch and crash.
    _, model, optimizer, _ = setup("adam-mini", model_key)
    losses = train(model, optimizer, batch_for(MODELS[model_key][2]), steps=12)
    assert losses[-1] < losses[0] - 0.1, losses


def test_muon_exposes_both_optimizers_as_one():
    _, model, optimizer, _ = setup("muon")
    muon_ids = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    assert optimizer.param_groups == optimizer.muon.param_groups + optimizer.adamw.param_groups
    assert all(p.dim() == 2 for p in model.parameters() if id(p) in muon_ids)
    assert muon_ids.isdisjoint(id(p) for g in optimizer.adamw.param_groups for p in g["params"])
    assert muon_ids.isdisjoint({id(model.model.embed_tokens.weight), id(model.lm_head.weight)})
    train(model, optimizer, batch_for(lowmem.CAUSAL_LM), steps=1)
    assert {id(p) for p in optimizer.state} == {id(p) for p in model.parameters()}
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", IN_BACKWARD)
def test_lomo_updates_equal_the_package_fused_backward(name, monkeypatch):
    import lomo_optim

    _, model, optimizer, _ = setup(name, weight_decay=0.1, decay_norms_and_biases=True)
    assert optimizer.steps_in_backward
    reference = tiny_llama()
    if name == "adalomo":  # the package's state goes .cuda() at construction: keep it on the CPU
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    package = getattr(lomo_optim, {"lomo": "Lomo", "adalomo": "AdaLomo"}[name])(
        reference, lr=LR[name], weight_decay=0.1)
    for seed in range(3):
        batch = batch_for(lowmem.CAUSAL_LM, seed=seed)
        train(model, optimizer, batch, steps=1)
        package.fused_backward(reference(**batch).loss, LR[name])
    assert not differing_parameters(model, reference)


@pytest.mark.parametrize("name", IN_BACKWARD)
def test_lomo_accumulates_exactly(name):
    batch = batch_for(lowmem.CAUSAL_LM)
    models = []
    for accum in (1, 2):
        _, model, optimizer, _ = setup(name, grad_accum=accum)
        before = [p.detach().clone() for p in model.parameters()]
        (model(**batch).loss / accum).backward()
        assert (accum == 2) == all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        if accum == 2:  # the window's last micro-batch updates
            (model(**batch).loss / accum).backward()
        optimizer.step()
        optimizer.zero_grad()
        train(model, optimizer, batch, steps=2, grad_accum=accum)
        # The most gradient memory held at once: one weight's gradient, or all while accumulating.
        sizes = [p.numel() * p.element_size() for p in model.parameters()]
        assert optimizer.peak_gradient_bytes == (max(sizes) if accum == 1 else sum(sizes))
        assert optimizer.held_gradient_bytes == 0
        models.append(model)
    assert not differing_parameters(*models)  # g/2 + g/2 == g exactly


def test_adalomo_state_lives_on_the_parameters_device():
    import lomo_optim

    if not torch.cuda.is_available():  # the package's own constructor cannot run here
        with pytest.raises((AssertionError, RuntimeError)):
            lomo_optim.AdaLomo(tiny_llama(), lr=0.1)
    _, model, optimizer, _ = setup("adalomo")
    for p in model.parameters():
        assert {(t.device, t.dtype) for t in optimizer.state[p].values()} == {(p.device, torch.float32)}
    shared = optimizer.engine.exp_avg_sq_row["lm_head.weight"]  # the package updates these very tensors
    assert shared is optimizer.state[model.lm_head.weight]["exp_avg_sq_row"]


# -- GaLore's randomized SVD -------------------------------------------------------------------
def test_randomized_svd_trains_differs_from_full_and_stays_close():
    from lowmem.plugins.optimizers.galore_common import CompactProjector, RandomizedProjector

    runs, start = {}, [p.detach().clone() for p in tiny_llama().parameters()]
    for svd in ("full", "randomized"):
        _, model, optimizer, _ = setup("galore", config=config_of("galore", svd=svd, update_proj_gap=3))
        assert ("svd" in optimizer.param_groups[0]) == (svd == "randomized")  # default groups unchanged
        losses = train(model, optimizer, batch_for(lowmem.CAUSAL_LM), steps=8)  # two refreshes
        assert losses[-1] < losses[0] - 0.5, losses
        runs[svd] = [p.detach() for p in model.parameters()]
    # Not identical, but the randomized run's total update is within 20% of the full one's (about 5%).
    difference = sum((r - f).square().sum() for r, f in zip(runs["randomized"], runs["full"], strict=True))
    update = sum((f - s).square().sum() for f, s in zip(runs["full"], start, strict=True))
    assert 0 < difference.sqrt() < 0.2 * update.sqrt()
    gradient = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    rng = torch.get_rng_state()
    full = CompactProjector(8).get_orthogonal_matrix(gradient, 8, "right")
    randomized = RandomizedProjector(8).get_orthogonal_matrix(gradient, 8, "right")
    assert torch.equal(torch.get_rng_state(), rng)  # the training RNG stream is untouched
    assert randomized.shape == full.shape == (8, 32) and randomized.is_contiguous()
    overlap = (randomized @ full.T).square().sum() / 8  # 1.0: the same subspace
    assert 0.8 < overlap < 1.0


# -- configuration errors --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "values", "key"),
    [
        ("adamw8bit", {"min_8bit_size": 0}, "'min_8bit_size'"),
        ("adafactor", {"decay_rate": 0.5}, "'decay_rate'"),
        ("adafactor", {"beta1": 1.0}, "'beta1'"),
        pytest.param("apollo", {"proj": "qr"}, "'proj' must be one of random, svd", marks=needs_apollo),
        pytest.param("apollo", {"scale_type": "row"}, "'scale_type' must be one of channel, tensor",
                     marks=needs_apollo),
        pytest.param("apollo", {"proj_type": "left"}, "'proj_type' left needs 'scale_type' tensor",
                     marks=needs_apollo),
        pytest.param("apollo-mini", {"proj_type": "full"}, "must be one of std, reverse_std, left, right,",
                     marks=needs_apollo),
        pytest.param("apollo", {"rank": 0}, "'rank'", marks=needs_apollo),
        ("adam-mini", {"betas": [0.9]}, "'betas'"),
        ("muon", {"adjust_lr_fn": "x"}, "'adjust_lr_fn' must be one of match_rms_adamw, original"),
        ("muon", {"ns_steps": 0}, "'ns_steps'"),
        ("lomo", {"per_layer": False}, "'per_layer' must be true"),
        ("adalomo", {"clip_threshold": 0}, "'clip_threshold'"),
        ("galore", {"svd": "qr"}, "'svd' must be one of full, randomized"),
        ("galore8bit", {"proj_type": "x"}, "'proj_type' must be one of std, reverse_std, left, right, full"),
        ("lora+galore8bit", {"svd": "lowrank"}, "'svd'"),
    ],
)
def test_bad_settings_name_the_key(name, values, key):
    optimizer_plugin = plugin(name)
    with pytest.raises(lowmem.ConfigError) as info:
        optimizer_plugin.check_config({**optimizer_plugin.default_config, **values})
    assert key in str(info.value)


@needs_apollo
def test_apollo_rank_above_a_matrix_is_refused_at_build():
    with pytest.raises(lowmem.ConfigError, match="'rank' 64 is larger than the smaller dimension"):
        setup("apollo", config={"rank": 64})  # the tiny llama's matrices are 32 wide
