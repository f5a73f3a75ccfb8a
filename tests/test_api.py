"""The Python API: ``lowmem.train(TrainConfig) -> RunResult``, typed errors instead of exits,
one ExitCode mapping, one default per setting, and the resolved config as config.json."""

from __future__ import annotations

import dataclasses
import json
import signal

import pytest

import lowmem
from lowmem.config import TrainConfig


def tiny_config(tmp_path, **changes) -> TrainConfig:
    values = dict(mode="pretraining", optimizer="galore", model="tiny-llama", batch_size=4, max_length=32,
                  num_training_tokens=1024, dtype="fp32", lr=3e-3, log_every=1, eval_batches=2,
                  optimizer_config={"rank": 4, "update_proj_gap": 3}, output_dir=str(tmp_path / "run"))
    return TrainConfig(**{**values, **changes})


def test_train_returns_a_run_result_equal_to_summary_json(tiny_registry, tmp_path):
    result = lowmem.train(tiny_config(tmp_path), tiny_registry, say=lambda message: None)
    assert isinstance(result, lowmem.RunResult)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary == result.to_json() and lowmem.RunResult.from_json(summary) == result
    assert {f.name for f in dataclasses.fields(lowmem.RunResult)} == set(summary)
    assert result.steps == 8 and result.tokens == 1024 and result.eval_perplexity > 1
    assert result.eval_accuracy is None and result.world_size == 1
    # tokens/s counts the training steps only: model build, evaluation and saving are outside.
    assert 0 < result.train_seconds < result.wall_seconds
    assert result.tokens_per_second == pytest.approx(result.tokens / result.train_seconds)
    assert result.step_seconds == pytest.approx(result.train_seconds / result.steps)


def test_config_json_is_the_resolved_config_and_resolving_again_changes_nothing(tiny_registry, tmp_path):
    from lowmem.resolve import resolve_config

    lowmem.train(tiny_config(tmp_path), tiny_registry, say=lambda message: None)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    resolved = TrainConfig.from_json(saved)
    assert resolved.dataset == "stdlib-docs"  # the dataset plugin marked as the pretraining default
    assert resolved.optimizer_config == {**tiny_registry.optimizer("galore").default_config,
                                         "rank": 4, "update_proj_gap": 3}
    again = resolve_config(dataclasses.replace(resolved, output_dir=str(tmp_path / "other")), tiny_registry,
                           say=lambda message: None)
    assert dataclasses.replace(again, output_dir=resolved.output_dir) == resolved
    # What was really built: the optimizer class and its groups, biases/norms undecayed.
    assert saved["optimizer_class"] == "LowmemGaLoreAdamW"
    groups = saved["param_groups"]
    assert any(g["weight_decay"] == 0.0 and any("norm" in n for n in g["examples"]) for g in groups)
    assert any(g.get("rank") == 4 for g in groups)


@pytest.mark.parametrize("changes,needle", [
    ({"optimizer": "adam9"}, "unknown optimizer 'adam9'"),
    ({"batch_size": 0}, "batch_size must be positive"),
    ({"dtype": "fp8"}, "dtype 'fp8'"),
    ({"optimizer_config": {"rnak": 4}}, "unknown key 'rnak'"),
    ({"max_length": 4096}, "4096"),
    # From Python a string is not a switch: "false" would be true.
    ({"lean_loss": "false"}, "lean_loss must be bool, got 'false'"),
    ({"batch_size": True}, "batch_size must be int, got True"),
    ({"max_steps": 2.5}, "max_steps must be int or None, got 2.5"),
    ({"optimizer_config": [1]}, "optimizer_config must be a dict of settings, got [1]"),
    ({"report_to": "wandb"}, "report_to must be a tuple of names, got 'wandb'"),
])
def test_bad_input_raises_config_error_never_exits(tiny_registry, tmp_path, changes, needle):
    try:
        lowmem.train(tiny_config(tmp_path, **changes), tiny_registry, say=lambda message: None)
    except SystemExit:  # pragma: no cover - the failure this test exists for
        pytest.fail("lowmem.train called sys.exit")
    except lowmem.ConfigError as exc:
        assert needle in str(exc)
    else:
        pytest.fail("no ConfigError")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_exit_codes_come_from_one_mapping():
    from lowmem.errors import exit_code_of

    cases = {
        lowmem.ConfigError("x"): 2, lowmem.CheckpointError("x"): 2, lowmem.NonFiniteError("x"): 3,
        lowmem.PluginFault("x"): 1, lowmem.Interrupted("x", signal.SIGINT): 130,
        lowmem.Interrupted("x", signal.SIGTERM): 143, RuntimeError("x"): 1, KeyboardInterrupt(): 130,
    }
    for exc, code in cases.items():
        assert exit_code_of(exc) == code and int(exit_code_of(exc)) == code
    assert {code.name for code in lowmem.ExitCode} >= {"OK", "BAD_INPUT", "NONFINITE", "INTERRUPTED"}


def test_every_train_option_takes_its_default_from_train_config():
    from lowmem.cli_options import TRAIN_OPTIONS, train_parameters
    from lowmem.config import default_of

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {o.field for o in TRAIN_OPTIONS} <= fields
    for parameter, option in zip(train_parameters(), TRAIN_OPTIONS, strict=True):
        if option.field in ("mode", "optimizer", "model"):
            continue
        info = parameter.annotation.__metadata__[0]
        value = parameter.default
        if info.callback is not None and isinstance(value, str):  # typed as on a command line
            value = info.callback(value)
        assert value == default_of(option.field), option.field


def test_the_cli_builds_the_same_config_python_would(cli, monkeypatch, tmp_path):
    from lowmem import training

    seen = []

    def capture(config, registry=None, say=None):
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(training, "train", capture)
    result = cli("train", "--mode", "pretraining", "--optimizer", "baseline", "--model", "tiny-llama")
    assert result.exit_code == 0, result.output
    assert seen == [TrainConfig(mode="pretraining", optimizer="baseline", model="tiny-llama")]


def test_step_makes_one_collective_and_one_host_read(tiny_registry, tmp_path, monkeypatch):
    """Per optimizer step: one reduction of the step's figures, whatever --grad-accum is."""
    from lowmem.distributed import DistContext

    calls = []
    monkeypatch.setattr(DistContext, "sum_", lambda self, tensor: calls.append(tensor.numel()) or tensor)
    result = lowmem.train(tiny_config(tmp_path, grad_accum=2, optimizer="baseline", optimizer_config={}),
                          tiny_registry, say=lambda message: None)
    # loss, tokens, non-finite, stop, the norm of gradients stepped on inside backward
    assert len(calls) == result.steps and set(calls) == {5}


def test_registration_goes_through_pluggy_ordering_and_wrappers():
    from lowmem.registry import Registry

    class Named(lowmem.Optimizer):
        description = "test"

        def __init__(self, name):
            self.name = name

    calls = []

    class Early:
        @lowmem.hookimpl(tryfirst=True)
        def register_optimizers(self, register):
            calls.append("early")
            register(Named("early"))

    class Late:
        @lowmem.hookimpl
        def register_optimizers(self, register):
            calls.append("late")
            register(Named("late"))

    class Wrapper:
        @lowmem.hookimpl(wrapper=True)
        def register_optimizers(self, register):
            calls.append("wrapper-before")
            result = yield
            calls.append("wrapper-after")
            return result

    registry = Registry()
    registry.add(Early(), "early", "e 1", collect=False)
    registry.add(Late(), "late", "l 1", collect=False)
    registry.add(Wrapper(), "wrapper", "w 1", collect=False)
    registry.collect()
    assert calls == ["wrapper-before", "early", "late", "wrapper-after"]
    assert list(registry.optimizers) == ["early", "late"]
    assert registry.optimizers["late"].origin == "l 1"


def test_plugin_attributes_replace_names_in_the_core(tiny_registry):
    assert tiny_registry.default_dataset("pretraining") == "stdlib-docs"
    assert tiny_registry.default_dataset("finetuning") == "stdlib-topics"
    assert tiny_registry.tokenizer_corpus().name == "stdlib-docs"
    assert tiny_registry.reference_optimizer() == "baseline"


def test_per_layer_switch_over_a_setting_of_false_says_so(tiny_registry, tmp_path):
    said: list[str] = []
    config = tiny_config(tmp_path, per_layer=True, max_steps=1, max_grad_norm=0.0,
                         optimizer_config={"rank": 4, "per_layer": False})
    lowmem.train(config, tiny_registry, say=said.append)
    assert "note: --per-layer overrides per_layer false in optimizer_config" in said
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optimizer_config"]["per_layer"] is True
