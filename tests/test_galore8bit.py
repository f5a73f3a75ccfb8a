"""lowmem's 8-bit GaLore optimizer against 32-bit GaLore, and the galore_torch bugs it avoids."""

from __future__ import annotations

import logging

import pytest

import lowmem

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
torch = pytest.importorskip("torch")

from test_optimizers import TINY_CONFIG, batch_for, setup, single_thread, train  # noqa: E402, F401

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
    assert set(first["__bnb_optimizer_quant_state__"]) == {"state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"}
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


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("per_layer", [False, True])
def test_galore8bit_on_cuda(per_layer):
    from test_optimizers import plugin, settings_for, tiny_llama

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
