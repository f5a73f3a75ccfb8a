"""lowmem's GaLore optimizers against galore_torch: identical 32-bit updates, the 8-bit optimizer's
direction, the galore_torch bugs it avoids, and the ranks galore_torch's projector can handle."""

from __future__ import annotations

import pytest

import lowmem

torch = pytest.importorskip("torch")

from support_optimizers import (  # noqa: E402
    LR,
    TINY_CONFIG,
    batch_for,
    plugin,
    settings_for,
    setup,
    tiny_llama,
    train,
)

# Every projected moment of the width-32 llama at rank 8 has >= 256 elements: all 8-bit.
EIGHT_BIT = {"rank": 8, "min_8bit_size": 256}


def projected_params(optimizer):
    return [p for g in optimizer.param_groups if "rank" in g for p in g["params"]]


def test_keyword_construction_gives_bitsandbytes_the_intended_settings():
    _, _, optimizer, _ = setup("galore8bit", config=EIGHT_BIT)
    # galore_torch passes these positionally with the pre-0.45 signature and ends up with
    # max_unorm=100, skip_zeros=True on bitsandbytes 0.50.
    assert (optimizer.args.optim_bits, optimizer.args.max_unorm, optimizer.args.skip_zeros) == (8, 0.0, False)
    assert optimizer.args.min_8bit_size == 256 and optimizer.is_paged is False


def test_update_direction_matches_32bit_galore():
    starts, updates = {}, {}
    for name in ("galore", "galore8bit"):
        config = EIGHT_BIT if name == "galore8bit" else TINY_CONFIG["galore"]
        _, model, optimizer, _ = setup(name, config=config, lr=1e-3)
        weights = projected_params(optimizer)
        start = [w.detach().clone() for w in weights]
        for seed in range(4):  # the same, different batches for both
            train(model, optimizer, batch_for(lowmem.CAUSAL_LM, seed=seed), steps=1)
        starts[name] = start
        updates[name] = [w.detach() - s for w, s in zip(weights, start, strict=True)]
        if name == "galore8bit":
            for w in weights:
                state = optimizer.state[w]
                assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
                assert state["state1"].shape != w.shape  # low-rank moments
    for a, b in zip(starts["galore"], starts["galore8bit"], strict=True):
        assert torch.equal(a, b)
    for full, eight in zip(updates["galore"], updates["galore8bit"], strict=True):
        assert eight.abs().max() > 0
        cosine = torch.nn.functional.cosine_similarity(full.flatten(), eight.flatten(), dim=0)
        assert cosine > 0.9, cosine


def test_quantization_state_is_wrapped_and_survives_a_weights_only_load(tmp_path):
    _, model, optimizer, _ = setup("galore8bit", config=EIGHT_BIT)
    train(model, optimizer, batch_for(lowmem.CAUSAL_LM), steps=2)
    path = tmp_path / "optimizer.pt"
    torch.save(optimizer.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    first = loaded["state"][0]
    assert set(first["__bnb_optimizer_quant_state__"]) == {
        "state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"}
    assert first["__bnb_optimizer_quant_state__"]["state1"].dtype == torch.uint8
    assert set(first["projector"]) == {"ortho_matrix", "rank", "update_proj_gap", "scale"}


def test_no_cuda_calls_on_cpu(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cuda was called on CPU")

    for attr in ("synchronize", "current_device", "current_stream"):
        monkeypatch.setattr(torch.cuda, attr, forbidden)
    for name, config in (("galore8bit", EIGHT_BIT), ("galore8bit", {**EIGHT_BIT, "per_layer": True}),
                         ("lora+galore8bit", TINY_CONFIG["lora+galore8bit"])):
        _, model, optimizer, _ = setup(name, config=config)
        train(model, optimizer, batch_for(lowmem.CAUSAL_LM), steps=2)


def test_lora_a_factor_waits_for_a_nonzero_gradient():
    _, model, optimizer, _ = setup("lora+galore8bit")
    factors = dict(model.named_parameters())
    a_factor = next(p for n, p in factors.items() if ".lora_A." in n)
    b_factor = next(p for n, p in factors.items() if ".lora_B." in n)
    train(model, optimizer, batch_for(lowmem.CAUSAL_LM), steps=1)
    # B starts at zero, so A's first gradient is exactly zero: no projector from an SVD of zeros.
    assert "projector" not in optimizer.state[a_factor]
    assert "projector" in optimizer.state[b_factor]
    train(model, optimizer, batch_for(lowmem.CAUSAL_LM), steps=1)
    assert optimizer.state[a_factor]["projector"].ortho_matrix.shape == (8, 4)  # r x rank: left side


def test_lora_galore8bit_moments_are_low_rank():
    _, model, optimizer, _ = setup("lora+galore8bit")
    train(model, optimizer, batch_for(lowmem.CAUSAL_LM), steps=2)
    for name, p in model.named_parameters():
        if ".lora_B." in name and "q_proj" in name:
            assert optimizer.state[p]["state1"].shape == (32, 4)  # out x rank, not out x r


# -- grouping, resume, per-layer mode ---------------------------------------------------------
def test_galore_groups_project_only_target_weights():
    _, model, optimizer, _ = setup("galore", "gpt2")
    projected, *plain = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert projected["rank"] == 8 and len(plain) == 2 and all("rank" not in g for g in plain)
    assert sorted({names[id(p)].split(".")[-2] for p in projected["params"]}) == ["c_attn", "c_fc", "c_proj"]
    assert all(p.dim() == 2 for p in projected["params"])
    plain_names = [names[id(p)] for g in plain for p in g["params"]]
    assert "transformer.wte.weight" in plain_names and any(n.endswith(".bias") for n in plain_names)
    assert len(projected["params"]) + len(plain_names) == len(list(model.parameters()))


def test_galore_keeps_roberta_classifier_out_of_projection():
    _, model, optimizer, _ = setup("galore", "roberta")
    projected_ids = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert id(model.classifier.dense.weight) not in projected_ids
    assert id(model.roberta.encoder.layer[0].intermediate.dense.weight) in projected_ids


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


@pytest.mark.parametrize(("overrides", "needle"), [({"max_grad_norm": 1.0}, "--max-grad-norm 0")])
def test_per_layer_refuses_what_cannot_combine(overrides, needle):
    """Several processes are fine: each weight steps on its averaged gradient (test_fsdp_galore)."""
    with pytest.raises(lowmem.ConfigError, match="per_layer") as info:
        setup("galore", config={"rank": 8, "per_layer": True}, **overrides)
    assert needle in str(info.value)


# -- against galore_torch -------------------------------------------------------------------
GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SHAPES = [(4, 4), (4, 6), (6, 4)]


def test_galore_updates_equal_galore_torch_exactly():
    """The same groups (decay split included) in galore_torch.GaLoreAdamW with its default eps:
    identical parameters after steps crossing two projection refreshes."""
    from galore_torch import GaLoreAdamW

    config = {**TINY_CONFIG["galore"], "update_proj_gap": 3}
    _, model, optimizer, _ = setup("galore", config=config, weight_decay=0.1)
    reference = tiny_llama()
    by_name, names = dict(reference.named_parameters()), {id(p): n for n, p in model.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k in ("weight_decay", *GALORE_KEYS)},
               "params": [by_name[names[id(p)]] for p in g["params"]]} for g in optimizer.param_groups]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.1, 0.0]
    reference_optimizer = GaLoreAdamW(groups, lr=LR["galore"], no_deprecation_warning=True)
    for seed in range(7):
        batch = batch_for(lowmem.CAUSAL_LM, seed=seed)
        train(model, optimizer, batch, steps=1)
        train(reference, reference_optimizer, batch, steps=1)
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name


def galore_torch_steps(shape, rank, proj_type) -> bool:
    """Whether galore_torch's GaLoreAdamW can step a weight of ``shape`` at ``rank``."""
    from galore_torch import GaLoreAdamW

    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape, generator=generator))
    group = {"params": [weight], "rank": rank, "update_proj_gap": 1, "scale": 0.25, "proj_type": proj_type}
    optimizer = GaLoreAdamW([group], lr=1e-3, no_deprecation_warning=True)
    try:
        for _ in range(2):
            weight.grad = torch.randn(shape, generator=generator)
            optimizer.step()
    except RuntimeError:  # "mat1 and mat2 shapes cannot be multiplied"
        return False
    return True


def test_reverse_std_at_the_smaller_dimension_of_a_wide_matrix_crashes_galore_torch():
    assert not galore_torch_steps((4, 6), 4, "reverse_std")
    assert galore_torch_steps((4, 6), 3, "reverse_std") and galore_torch_steps((6, 4), 4, "reverse_std")


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
def test_check_rank_refuses_exactly_what_galore_torch_cannot_do(shape, proj_type):
    from lowmem.plugins.optimizers.galore_common import check_rank

    for rank in range(1, max(shape) + 1):
        try:
            check_rank([("w", torch.zeros(shape))], rank, proj_type)
            refused = False
        except lowmem.ConfigError:
            refused = True
        works = rank <= min(shape) and galore_torch_steps(shape, rank, proj_type)
        assert refused == (not works), rank


@pytest.mark.parametrize("name", ["galore", "galore8bit"])
def test_rank_larger_than_a_matrix_is_refused_at_build(name):
    with pytest.raises(lowmem.ConfigError, match=r"'rank' 48 .*\(32x32\) with proj_type std.*at most 32"):
        setup(name, config={**TINY_CONFIG[name], "rank": 48})


@pytest.mark.parametrize("name", ["galore", "galore8bit"])
def test_reverse_std_at_the_smaller_dimension_is_refused_at_build(name):
    with pytest.raises(lowmem.ConfigError) as info:
        setup(name, config={**TINY_CONFIG[name], "rank": 32, "proj_type": "reverse_std"})
    message = str(info.value)
    assert "\n" not in message
    for needle in ("model.layers.0.mlp.down_proj.weight (32x64)", "'rank' 32", "proj_type reverse_std",
                   "at most 31"):
        assert needle in message


@pytest.mark.parametrize(("name", "proj_type"), [("galore", p) for p in PROJ_TYPES] + [
    ("galore8bit", "reverse_std")])
def test_every_proj_type_trains_at_its_largest_rank(name, proj_type):
    from lowmem.memory import optimizer_state_bytes as measured_state_bytes

    rank = 31 if proj_type == "reverse_std" else 32  # the smaller dimension of every target
    config = {**TINY_CONFIG[name], "rank": rank, "proj_type": proj_type}
    optimizer_plugin, model, optimizer, settings = setup(name, config=config)
    losses = train(model, optimizer, batch_for(lowmem.CAUSAL_LM), steps=3)
    assert losses[-1] < losses[0]
    assert optimizer_plugin.state_bytes(model, settings) == measured_state_bytes(optimizer)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("per_layer", [False, True])
def test_galore8bit_on_cuda(per_layer):
    from lowmem.memory import optimizer_state_bytes as measured_state_bytes

    settings = settings_for("galore8bit", config={**EIGHT_BIT, "per_layer": per_layer})
    optimizer_plugin = plugin("galore8bit")
    model = optimizer_plugin.prepare_model(tiny_llama().cuda(), settings)
    optimizer = optimizer_plugin.build(model, settings)
    batch = {k: v.cuda() for k, v in batch_for(lowmem.CAUSAL_LM).items()}
    losses = train(model, optimizer, batch, steps=12, bf16=False)
    assert losses[-1] < losses[0] - 0.2
    assert optimizer_plugin.state_bytes(model, settings) == measured_state_bytes(optimizer)
    assert all(optimizer.state[p]["state1"].device.type == "cuda" for p in model.parameters())
