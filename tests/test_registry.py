"""The plugin contract: every hook, entry-point isolation, conflicts, misspelt hooks."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap

import pytest

import lowmem
from lowmem.registry import Registry, load_registry


class LionOptimizer(lowmem.Optimizer):
    name = "lion"
    description = "Lion: sign momentum"
    default_config = {"betas": [0.9, 0.99]}

    def build(self, model, settings):
        import torch

        return torch.optim.SGD(model.parameters(), lr=settings.lr)


class NoteModel(lowmem.Model):
    name = "note-model"
    description = "a test model"


class NoteDataset(lowmem.Dataset):
    name = "note-data"
    description = "a test dataset"

    def records(self, request):
        yield {"text": "hello"}


class AllHooks:
    @lowmem.hookimpl
    def register_optimizers(self, register):
        register(LionOptimizer())

    @lowmem.hookimpl
    def register_models(self, register):
        register(NoteModel())

    @lowmem.hookimpl
    def register_datasets(self, register):
        register(NoteDataset())


def test_each_hook_registers_through_a_fresh_manager():
    registry = Registry()
    info = registry.add(AllHooks(), "all-hooks", "test-dist 1.0")
    assert info.status == "ok"
    assert sorted(info.hooks) == ["register_datasets", "register_models", "register_optimizers"]
    assert isinstance(registry.optimizer("lion"), LionOptimizer)
    assert isinstance(registry.model("note-model"), NoteModel)
    assert isinstance(registry.dataset("note-data"), NoteDataset)
    assert registry.optimizers["lion"].origin == "test-dist 1.0"


def test_unknown_name_lists_the_choices():
    registry = Registry()
    registry.add(AllHooks(), "all-hooks", "t")
    with pytest.raises(lowmem.ConfigError, match="unknown optimizer 'adamw9'.*lion"):
        registry.optimizer("adamw9")


def test_misspelt_hook_is_rejected_and_others_still_load():
    class Misspelt:
        @lowmem.hookimpl
        def register_optimisers(self, register):  # British spelling: not a lowmem hook
            register(LionOptimizer())

    registry = Registry()
    bad = registry.add(Misspelt(), "misspelt", "bad-dist 0.1")
    good = registry.add(AllHooks(), "good", "good-dist 1.0")
    assert bad.status.startswith("failed:") and "register_optimisers" in bad.status
    assert good.status == "ok"
    assert "lion" in registry.optimizers


def test_hook_that_raises_is_isolated():
    class Raises:
        @lowmem.hookimpl
        def register_optimizers(self, register):
            raise RuntimeError("boom")

    registry = Registry()
    info = registry.add(Raises(), "raises", "raise-dist 2.0")
    assert info.status == "failed: register_optimizers raised RuntimeError: boom"
    assert any("raise-dist 2.0" in w and "boom" in w for w in registry.warnings)


def test_registering_a_non_optimizer_fails_the_plugin():
    class Wrong:
        @lowmem.hookimpl
        def register_optimizers(self, register):
            register(object())

    registry = Registry()
    assert "not a lowmem.Optimizer" in registry.add(Wrong(), "wrong", "w 1").status


def test_same_name_from_two_plugins_is_an_error_naming_both():
    registry = Registry()
    registry.add(AllHooks(), "first", "alpha-dist 1.0")
    registry.add(AllHooks(), "second", "beta-dist 2.0")
    with pytest.raises(lowmem.ConfigError) as err:
        registry.optimizer("lion")
    assert "alpha-dist 1.0" in str(err.value) and "beta-dist 2.0" in str(err.value)
    assert any("registered by both" in w for w in registry.warnings)


class FakeEntryPoint:
    def __init__(self, name, target, dist_name="fake-dist", version="0.1"):
        self.name, self.value, self._target = name, f"{dist_name}:plugin", target
        self.dist = type("Dist", (), {"name": dist_name, "version": version})()

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


def _fake_entry_points(monkeypatch, eps):
    def entry_points(group=None, **kwargs):
        assert group == "lowmem"
        return list(eps)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_entry_points_good_broken_and_filtered(monkeypatch):
    _fake_entry_points(monkeypatch, [
        FakeEntryPoint("good", AllHooks(), "good-dist", "1.2"),
        FakeEntryPoint("broken", ImportError("No module named 'missing_dep'"), "broken-dist", "0.3"),
    ])
    warnings: list[str] = []
    registry = load_registry(None, say=warnings.append)
    assert registry.optimizers["lion"].origin == "good-dist 1.2"
    assert "baseline" in registry.optimizers  # built-ins still there
    broken = next(p for p in registry.plugins if p.name == "broken")
    assert broken.status.startswith("failed: import failed: ImportError")
    assert any("broken-dist 0.3" in w and "missing_dep" in w for w in warnings)

    only_broken = load_registry("broken", say=lambda m: None)
    assert "lion" not in only_broken.optimizers
    nothing = load_registry("", say=lambda m: None)
    assert [p.origin for p in nothing.plugins if p.origin != "built-in"] == []


def test_built_ins_register_through_the_hooks(tiny_registry):
    for name in ("baseline", "lora", "galore", "galore8bit", "lora+galore8bit"):
        assert tiny_registry.optimizers[name].origin == "built-in"
    for name in ("llama_60m", "llama_1b", "llama_7b", "roberta", "gpt2", "tiny-llama"):
        assert name in tiny_registry.models
    for name in ("stdlib-docs", "stdlib-topics", "files", "hub"):
        assert name in tiny_registry.datasets
    assert all(p.status == "ok" for p in tiny_registry.plugins)


def test_a_real_distribution_on_sys_path_shows_up(tmp_path, monkeypatch, cli):
    """A tiny installed distribution (dist-info + entry_points.txt) is found by importlib.metadata."""
    (tmp_path / "lowmem_lion_demo.py").write_text(textwrap.dedent('''
        import lowmem

        class Lion(lowmem.Optimizer):
            name = "lion-demo"
            description = "Lion from a third-party distribution"
            def build(self, model, settings):
                import torch
                return torch.optim.SGD(model.parameters(), lr=settings.lr)

        @lowmem.hookimpl
        def register_optimizers(register):
            register(Lion())
    '''))
    info = tmp_path / "lowmem_lion_demo-0.4.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lowmem-lion-demo\nVersion: 0.4.2\n")
    (info / "entry_points.txt").write_text("[lowmem]\nlion = lowmem_lion_demo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LOWMEM_LOAD_PLUGINS", "lion")
    result = cli("list-optimizers")
    assert result.exit_code == 0, result.output
    assert "lion-demo" in result.output and "lowmem-lion-demo 0.4.2" in result.output
    listing = cli("plugins")
    assert "lowmem-lion-demo" in listing.output and "register_optimizers" in listing.output
    sys.modules.pop("lowmem_lion_demo", None)
