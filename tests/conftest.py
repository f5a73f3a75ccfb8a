"""Shared test set-up: no network, a private cache, and tiny models registered through the API."""

from __future__ import annotations

import os
import tempfile

# Before anything imports huggingface_hub / transformers / datasets: never touch the network.
for _switch in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_switch] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["LOWMEM_LOAD_PLUGINS"] = ""  # installed third-party plugins stay out of the tests
os.environ.setdefault("LOWMEM_CACHE_DIR", tempfile.mkdtemp(prefix="lowmem-test-cache-"))
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="lowmem-test-hf-"))

import pytest  # noqa: E402

import lowmem  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Width-32 models run several times faster on one thread than on two busy cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

TINY_VOCAB = 384


def tiny_model_classes():
    """Tiny variants of the built-in models (2 layers, width 32), for CPU tests."""
    from lowmem.plugins.models.gpt2 import GPT2
    from lowmem.plugins.models.llama import Llama
    from lowmem.plugins.models.roberta import Roberta

    class TinyLlama(Llama):
        name = "tiny-llama"
        description = "2-layer LLaMA, width 32 (tests)"
        vocab_size = TINY_VOCAB
        max_positions = 128
        hf_config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 4}

    class TinyGPT2(GPT2):
        name = "tiny-gpt2"
        description = "2-layer GPT-2, width 32 (tests)"
        vocab_size = TINY_VOCAB
        max_positions = 128
        hf_config = {"n_embd": 32, "n_layer": 2, "n_head": 4}

    class TinyRoberta(Roberta):
        name = "tiny-roberta"
        description = "2-layer RoBERTa, width 32 (tests)"
        vocab_size = TINY_VOCAB
        max_positions = 128
        hf_config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4}

    return TinyLlama, TinyGPT2, TinyRoberta


class TinyModels:
    """A test plugin, registered exactly as a third party's would be."""

    @lowmem.hookimpl
    def register_models(self, register):
        for cls in tiny_model_classes():
            register(cls())


@pytest.fixture
def tiny_registry():
    """A fresh registry: built-ins plus the tiny test models, no entry points."""
    from lowmem.registry import load_registry

    return load_registry("", extra=[TinyModels()])


@pytest.fixture
def cli(monkeypatch):
    """A CliRunner-driven ``lowmem`` with the tiny models registered; returns invoke(args)."""
    from typer.testing import CliRunner

    from lowmem import cli as cli_module

    monkeypatch.setattr(cli_module, "EXTRA_PLUGINS", [TinyModels()])
    monkeypatch.setenv("COLUMNS", "200")  # rich tables unwrapped, so names are asserted whole
    cli_module.reset_registry()
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(cli_module.app, [str(a) for a in args])

    yield invoke
    cli_module.reset_registry()
