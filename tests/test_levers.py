"""Memory levers besides the optimizer: activation checkpointing, torch.compile."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import lowmem


def run(registry, tmp_path, name, **changes):
    values = dict(mode="pretraining", optimizer="baseline", model="tiny-llama", batch_size=4, max_length=32,
                  num_training_tokens=1024, dtype="fp32", log_every=1, eval_batches=1,
                  output_dir=str(tmp_path / name))
    lowmem.train(lowmem.TrainConfig(**{**values, **changes}), registry, say=lambda message: None)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [(row["loss"], row["grad_norm"]) for row in rows if "loss" in row]


@pytest.mark.parametrize("optimizer,config", [
    ("baseline", {}), ("lora", {"lora_dropout": 0.1}), ("galore8bit", {"rank": 4, "min_8bit_size": 64}),
    ("galore", {"rank": 4, "per_layer": True}),
])
def test_checkpointing_gives_bitwise_the_same_losses(tiny_registry, tmp_path, optimizer, config):
    """Recomputing each block in backward (dropout included, for LoRA) changes no bit on CPU."""
    extra = {"max_grad_norm": 0.0} if config.get("per_layer") else {}
    plain = run(tiny_registry, tmp_path, "plain", optimizer=optimizer, optimizer_config=config, **extra)
    checkpointed = run(tiny_registry, tmp_path, "checkpointed", optimizer=optimizer, optimizer_config=config,
                       activation_checkpointing=True, **extra)
    assert plain == checkpointed and len(plain) == 8


def test_compile_trains_a_tiny_model(tiny_registry, tmp_path):
    rows = run(tiny_registry, tmp_path, "compiled", compile=True, num_training_tokens=512)
    assert len(rows) == 4
    # The first step compiles: its time is reported apart, so the speed is the compiled steps'.
    summary = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    assert summary["compile_seconds"] > 0 and summary["step_seconds"] * 3 == \
        pytest.approx(summary["train_seconds"])
    assert summary["step_seconds"] < summary["compile_seconds"]


@pytest.mark.slow  # two inductor compilations: about 45 s on 2 cores
def test_compile_with_lora_and_checkpointing_trains_as_without(tiny_registry, tmp_path):
    """Inductor's kernels round differently from eager ones: close, not bitwise."""
    lora = dict(optimizer="lora", optimizer_config={"lora_dropout": 0.0}, activation_checkpointing=True,
                num_training_tokens=512)
    compiled = run(tiny_registry, tmp_path, "compiled", compile=True, **lora)
    eager = run(tiny_registry, tmp_path, "eager", **lora)
    assert len(compiled) == 4
    assert [loss for loss, _ in compiled] == pytest.approx([loss for loss, _ in eager], rel=1e-4)


def test_compile_without_inductor_is_refused_in_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch._inductor", None)  # an import of it now fails
    result = cli("train", "--mode", "pretraining", "--optimizer", "baseline", "--model", "tiny-llama",
                 "--max_length", "32", "--num_training_tokens", "256", "--compile",
                 "--output-dir", str(tmp_path / "run"))
    assert result.exit_code == 2 and "--compile" in result.output and "inductor" in result.output
    assert "Traceback" not in result.output


def test_compile_that_inductor_cannot_carry_out_is_refused_in_one_line(cli, tmp_path, monkeypatch):
    """Inductor present, but compiling fails (a broken compiler, say): found before training."""
    import torch

    def broken_compile(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", broken_compile)
    result = cli("train", "--mode", "pretraining", "--optimizer", "baseline", "--model", "tiny-llama",
                 "--max_length", "32", "--num_training_tokens", "256", "--compile",
                 "--output-dir", str(tmp_path / "run"))
    assert result.exit_code == 2, result.output
    assert "--compile: inductor cannot compile on cpu here: InvalidCxxCompiler" in result.output
    assert "more detail" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lean_loss_equals_the_plain_loss_and_gradients(family):
    """Chunked (chunks of 7 tokens, vocab 384) against transformers' own loss, fp32."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from lowmem.lean_loss import chunked_causal_lm_loss, hidden_states_out, output_head

    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, vocab_size=384))
    else:  # tied input/output embeddings
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=384, n_positions=64))
    model.eval()  # no dropout: both forwards must see the same network
    ids = torch.randint(0, 384, (3, 20))
    labels = ids.masked_fill(torch.rand(3, 20) < 0.3, -100)
    plain = model(input_ids=ids, labels=labels).loss
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    parent, attribute, head = output_head(model)
    with hidden_states_out(parent, attribute):
        hidden = model(input_ids=ids).logits
    lean = chunked_causal_lm_loss(hidden, head, labels, chunk=7)
    lean.backward()
    assert torch.allclose(lean, plain, rtol=1e-6, atol=0)
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, expected[name], rtol=1e-5, atol=1e-7), name
    assert model.get_output_embeddings() is head  # the head is back in place

    # No target at all: the plain mean is 0/0, NaN, and so is the lean one (a run's non-finite
    # check then treats both alike).
    nothing = torch.full_like(labels, -100)
    with hidden_states_out(parent, attribute):
        hidden = model(input_ids=ids).logits
    assert model(input_ids=ids, labels=nothing).loss.isnan()
    assert chunked_causal_lm_loss(hidden, head, nothing, chunk=7).isnan()


def test_lean_loss_leaves_models_whose_loss_is_more_than_cross_entropy():
    """A mixture of experts with its router loss on, or logits soft-capped: the usual loss stays."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, MixtralConfig, MixtralForCausalLM

    from lowmem.lean_loss import output_head

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=384)
    experts = dict(small, num_local_experts=2, num_experts_per_tok=1)
    assert output_head(MixtralForCausalLM(MixtralConfig(**experts))) is not None
    assert output_head(MixtralForCausalLM(MixtralConfig(**experts, output_router_logits=True))) is None
    assert output_head(Gemma2ForCausalLM(Gemma2Config(**small, head_dim=8, final_logit_softcapping=30.0))) \
        is None


def test_lean_loss_trains_like_the_plain_loss(tiny_registry, tmp_path):
    plain = run(tiny_registry, tmp_path, "plain")
    lean = run(tiny_registry, tmp_path, "lean", lean_loss=True)
    for (a, _), (b, _) in zip(plain, lean, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)
    # The evaluation takes the chunked loss too (no whole-batch logits there either), and agrees.
    evals = [json.loads((tmp_path / name / "summary.json").read_text())["eval_loss"]
             for name in ("plain", "lean")]
    assert evals[0] == pytest.approx(evals[1], rel=1e-4)
    applied = [json.loads((tmp_path / name / "config.json").read_text())["applied_lean_loss"]
               for name in ("plain", "lean")]
    assert applied == [False, True]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels need CUDA")
def test_liger_lean_loss_equals_the_chunked_one_on_cuda():
    pytest.importorskip("liger_kernel")
    from lowmem.lean_loss import causal_lm_loss, chunked_causal_lm_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 500, bias=False).cuda()
    hidden = torch.randn(2, 33, 64, device="cuda", requires_grad=True)
    labels = torch.randint(0, 500, (2, 33), device="cuda")
    labels[0, :5] = -100
    fused = causal_lm_loss(hidden, head, labels)
    chunked = chunked_causal_lm_loss(hidden, head, labels)
    assert torch.allclose(fused, chunked, rtol=1e-5)
    (grad_fused,) = torch.autograd.grad(fused, hidden)
    (grad_chunked,) = torch.autograd.grad(chunked, hidden)
    assert torch.allclose(grad_fused, grad_chunked, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # two inductor compilations: about 60 s on 2 cores
def test_compile_with_the_lean_loss_trains_as_without(tiny_registry, tmp_path):
    """The head swapped out for the lean loss is traced like any module: compiled, the run takes the
    chunked loss and steps as the eager one does, to inductor's rounding."""
    lean = dict(lean_loss=True, num_training_tokens=512)
    compiled = run(tiny_registry, tmp_path, "compiled", compile=True, **lean)
    eager = run(tiny_registry, tmp_path, "eager", **lean)
    assert len(compiled) == 4
    assert [loss for loss, _ in compiled] == pytest.approx([loss for loss, _ in eager], rel=1e-4)
    config = json.loads((tmp_path / "compiled" / "config.json").read_text())
    assert config["compile"] and config["applied_lean_loss"]
