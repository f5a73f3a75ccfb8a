"""The model ``lowmem check-optimizer`` trains: a 2-layer LLaMA through the built-in plugin, wide
enough (128) for GaLore's and APOLLO's default rank, on a registry of its own so it never shows
in ``lowmem list-models``."""

from __future__ import annotations

import lowmem
from lowmem.plugins.models.llama import Llama
from lowmem.registry import Registry

CHECK_MODEL = "lowmem-check-llama"
VOCAB = 128


class CheckLlama(Llama):
    name = CHECK_MODEL
    description = "2-layer LLaMA, width 128 (lowmem check-optimizer)"
    vocab_size = VOCAB
    max_positions = 64
    hf_config = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 4}


class _CheckModel:
    @lowmem.hookimpl
    def register_models(self, register):
        register(CheckLlama())


def check_registry() -> Registry:
    """A fresh registry holding the check model alone."""
    registry = Registry()
    registry.add(_CheckModel(), "lowmem.testing", "built-in")
    return registry
