"""The tiny test models as an importable plugin module, for processes the tests start (torchrun
workers) where conftest's in-process registration cannot reach. Tests make it loadable through
a fake installed distribution whose entry point names this module (see test_distributed.py)."""

from __future__ import annotations

import os

import lowmem

if os.environ.get("LOWMEM_TEST_FAULT"):  # a fault for a launched worker (tests/fault_injection.py)
    import fault_injection

    fault_injection.inject(os.environ["LOWMEM_TEST_FAULT"])

TINY_VOCAB = 384


def tiny_model_classes():
    """Tiny variants of the built-in models (2 layers, width 32), as in conftest."""
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


@lowmem.hookimpl
def register_models(register):
    for cls in tiny_model_classes():
        register(cls())
