"""Conformance of optimizer plugins: ``lowmem check-optimizer`` / ``lowmem.testing`` pass for every
installed optimizer and fail, with the right reason, for plugins that break the contract; and no
silent fallbacks: settings that apply to nothing are refused, config.json says what was built."""

from __future__ import annotations

import json

import pytest
import torch

import lowmem
from lowmem.testing import CHECKS, FAIL, PASS, WARN, assert_conforms, check_optimizer


def installed_optimizers() -> list[str]:
    from lowmem.compare import installed
    from lowmem.registry import load_registry

    registry = load_registry("", say=lambda message: None)
    return sorted(name for name, entry in registry.optimizers.items() if installed(entry))


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def adamw_bytes(model) -> int:
    return sum(2 * p.numel() * p.element_size() + 4 for p in trainable(model))


# -- plugins that break the contract, one way each ---------------------------------------------
class ForgetfulAdamW(torch.optim.AdamW):
    def state_dict(self):
        state_dict = super().state_dict()
        state_dict["state"] = {}  # the moments are not saved
        return state_dict


class Note:
    """Not a tensor or plain value: torch.load(weights_only=True) refuses it."""


class PicklingAdamW(torch.optim.AdamW):
    def state_dict(self):
        state_dict = super().state_dict()
        state_dict["note"] = Note()
        return state_dict


class FixedLRSGD(torch.optim.Optimizer):
    """Reads the LR it was built with, never the one the scheduler sets in param_groups."""

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})
        self.built_lr = lr

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-self.built_lr)


class Broken(lowmem.Optimizer):
    name, description, optimizer_class = "", "breaks the contract (tests)", torch.optim.AdamW
    bytes_factor: float | None = 1.0

    def build(self, model, settings):
        return self.optimizer_class(trainable(model), lr=settings.lr)

    def state_bytes(self, model, settings):
        return None if self.bytes_factor is None else int(adamw_bytes(model) * self.bytes_factor)


class DropsState(Broken):
    name, optimizer_class = "drops-state", ForgetfulAdamW


class PicklesState(Broken):
    name, optimizer_class = "pickles-state", PicklingAdamW


class UnderReports(Broken):
    name, bytes_factor = "under-reports", 0.5


class IgnoresScheduler(Broken):
    name, optimizer_class, bytes_factor = "ignores-scheduler", FixedLRSGD, 0.0


class UnknownBytes(Broken):
    name, bytes_factor = "unknown-bytes", None


class IgnoresPerLayer(Broken):
    """Declares a per-layer mode, but never updates inside backward."""

    name, default_config = "ignores-per-layer", {"per_layer": False}


BROKEN = (DropsState, PicklesState, UnderReports, IgnoresScheduler, UnknownBytes, IgnoresPerLayer)


class BrokenPlugins:
    @lowmem.hookimpl
    def register_optimizers(self, register):
        for cls in BROKEN:
            register(cls())


@pytest.fixture(scope="module")
def broken_registry():
    from lowmem.registry import Registry

    registry = Registry()
    registry.add(BrokenPlugins(), "broken", "lowmem-broken 0.1")
    return registry


def statuses(results) -> dict[str, str]:
    assert [r.name for r in results] == list(CHECKS)
    return {r.name: r.status for r in results}


# -- every installed optimizer conforms --------------------------------------------------------
def test_check_optimizer_command_passes_for_the_reference(cli):
    result = cli("check-optimizer", "baseline")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "check-optimizer baseline (built-in)"
    assert lines[1].split() == ["check", "status", "detail"]
    for name, line in zip(CHECKS, lines[2:], strict=False):  # plain columns: stdout is not a terminal
        assert line.startswith(name + " ") and line[len(name):].split()[0] == PASS, line
    assert lines[-1].startswith("7 passed, 0 warnings, 0 failed in ") and not result.stderr


@pytest.mark.parametrize("name", [n for n in installed_optimizers() if n != "baseline"])
def test_every_installed_optimizer_conforms(name, registry):
    results = assert_conforms(name, registry=registry)
    assert all(r.status == PASS for r in results), [r for r in results if r.status != PASS]


# -- plugins that break the contract fail, with the reason -------------------------------------
SAVE_REFUSED = "torch.load(weights_only=True) refuses the state: state_dict()['note'] is a Note"


@pytest.mark.parametrize("name,failures", [
    ("drops-state", {"state round trip": "0 come back from load_state_dict (0 bytes): state is lost",
                     "bitwise resume": "differ from the uninterrupted run"}),
    ("pickles-state", {"state round trip": SAVE_REFUSED, "bitwise resume": SAVE_REFUSED}),
    ("under-reports", {"state_bytes": "(-50.0%)"}),
    ("ignores-scheduler", {"lr schedule": "does not use the LR the scheduler sets in param_groups"}),
    ("ignores-per-layer", {"per-layer": "per_layer: true built an optimizer without steps_in_backward"}),
])
def test_a_plugin_that_breaks_the_contract_fails_with_the_reason(broken_registry, name, failures):
    results = check_optimizer(name, registry=broken_registry)
    assert {n for n, status in statuses(results).items() if status == FAIL} == set(failures)
    for result in results:
        assert result.status == PASS or failures[result.name] in result.reason, result
    with pytest.raises(AssertionError, match=sorted(failures)[0]):
        assert_conforms(name, registry=broken_registry)


def test_unknown_state_bytes_is_a_warning_not_a_failure(broken_registry):
    results = assert_conforms("unknown-bytes", registry=broken_registry)
    assert statuses(results)["state_bytes"] == WARN and "unknown" in results[3].reason
    assert [r.status for r in results].count(PASS) == len(CHECKS) - 1


def test_the_command_exits_1_with_a_line_per_failed_check(cli, plugins):
    plugins(BrokenPlugins())
    result = cli("check-optimizer", "drops-state")
    assert result.exit_code == 1, result.output
    errors = result.stderr.splitlines()
    assert errors == [line for line in errors if line.startswith("error: drops-state: ")] and len(errors) == 2
    assert "state round trip" in errors[0] and "bitwise resume" in errors[1]
    assert "5 passed, 0 warnings, 2 failed" in result.stdout
    warned = cli("check-optimizer", "unknown-bytes")
    assert warned.exit_code == 0 and "6 passed, 1 warning, 0 failed" in warned.stdout


def test_a_plugin_object_can_be_checked_without_registering_it():
    results = check_optimizer(UnderReports())
    assert statuses(results)["state_bytes"] == FAIL


# -- bad input: exit 2, one line ---------------------------------------------------------------
@pytest.mark.parametrize("args,content,needle", [
    (("adam9",), None, "unknown optimizer 'adam9'"),
    (("galore", "--config", "{dir}/missing.json"), None, "does not exist"),
    (("galore", "--config", "{dir}/c.json"), "{not json", "is not valid JSON"),
    (("galore", "--config", "{dir}/c.json"), '{"rnak": 4}', "unknown key 'rnak'"),
    (("galore", "--config", "{dir}/c.json"), '{"rank": 0}', "'rank' must be a positive integer"),
])
def test_bad_input_exits_2_with_one_line(cli, tmp_path, args, content, needle):
    if content is not None:
        (tmp_path / "c.json").write_text(content)
    result = cli("check-optimizer", *(a.format(dir=tmp_path) for a in args))
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1 and needle in result.stderr and not result.stdout


def test_the_python_api_refuses_bad_settings(registry):
    with pytest.raises(lowmem.ConfigError, match="unknown key 'rnak'"):
        check_optimizer("galore", {"rnak": 4}, registry=registry)


def test_a_config_changes_what_is_checked(registry):
    results = check_optimizer("galore", {"rank": 8, "update_proj_gap": 10}, registry=registry)
    assert all(r.status == PASS for r in results)
    assert "state tensors" in results[1].reason


# -- no silent fallbacks -------------------------------------------------------------------------
TRAIN = ("train", "--mode", "pretraining", "--model", "tiny-llama", "--batch_size", "4", "--max_length", "32",
         "--num_training_tokens", "256", "--eval-batches", "1", "--dtype", "fp32")


@pytest.mark.parametrize("optimizer", ["lora", "lora+galore8bit"])
def test_lora_targets_that_match_nothing_are_refused(cli, tmp_path, optimizer):
    config = tmp_path / "lora.json"
    config.write_text(json.dumps({"target_modules": ["qkv_fused", "mlp_in"]}))
    result = cli(*TRAIN, "--optimizer", optimizer, "--lora_config", config, "--output-dir", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: 'target_modules': no layer of this model is named qkv_fused, mlp_in"]
    assert not (tmp_path / "run" / "config.json").exists()


def test_galore_targets_that_match_nothing_are_refused(cli, plugins, tmp_path):
    from tiny_plugin import tiny_model_classes

    class Untargeted(tiny_model_classes()[0]):
        name, target_modules = "tiny-llama-untargeted", ("attn_fused", "ffn_fused")

    class Models:
        @lowmem.hookimpl
        def register_models(self, register):
            register(Untargeted())

    plugins(Models())
    args = [a if a != "tiny-llama" else "tiny-llama-untargeted" for a in TRAIN]
    result = cli(*args, "--optimizer", "galore", "--output-dir", tmp_path / "run")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "modules named attn_fused, ffn_fused" in errors[0]


def test_config_json_records_what_was_built(cli, tmp_path):
    galore = tmp_path / "galore.json"
    galore.write_text(json.dumps({"rank": 8, "min_8bit_size": 256}))
    run = tmp_path / "run"
    result = cli(*TRAIN, "--optimizer", "galore8bit", "--galore_config", galore, "--output-dir", run)
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "config.json").read_text())
    assert saved["optimizer_class"] == "GaLoreAdamW8bit"
    assert saved["optimizer_class_path"] == "lowmem.plugins.optimizers.galore_adamw8bit.GaLoreAdamW8bit"
    projected, *plain = saved["param_groups"]
    assert projected["rank"] == 8 and projected["betas"] == [0.9, 0.999] and projected["tensors"] == 14
    assert projected["parameters"] == projected["elements"] > 0
    assert projected["projected"] == projected["quantised"] and len(projected["projected"]) == 14
    assert all(not group["projected"] for group in plain)
    # The 1-D norm weights stay below min_8bit_size: fp32 state, not quantised.
    assert any(group["quantised"] == [] and group["weight_decay"] == 0.0 for group in plain)
    assert {"torch", "transformers", "peft", "bitsandbytes", "galore-torch"} <= set(saved["versions"])
    assert saved["plugin_origins"] == {"optimizer": "built-in", "model": "test", "dataset": "built-in"}
