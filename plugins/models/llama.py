"""LLaMA-shaped decoders from the GaLore paper (60M, 1B, 7B), built from scratch for pretraining."""

from __future__ import annotations

from typing import Any, ClassVar

import lowmem
from lowmem.modeling import build_model


class Llama(lowmem.Model):
    """A LLaMA decoder; subclasses set the shape through ``hf_config``."""

    name = "llama"
    description = "LLaMA decoder"
    vocab_size = 32000
    max_positions = 1024
    # transformers LlamaConfig arguments other than the vocabulary size and positions.
    hf_config: ClassVar[dict[str, Any]] = {}
    target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    tokenizer_id = "t5-base"  # the tokenizer GaLore's LLaMA experiments used
    pretrained_id = None

    def config(self, request: lowmem.ModelRequest) -> Any:
        from transformers import LlamaConfig

        settings = {"hidden_act": "silu", "tie_word_embeddings": False, **self.hf_config}
        return LlamaConfig(
            vocab_size=request.vocab_size, max_position_embeddings=self.max_positions, **settings
        )

    def build(self, request: lowmem.ModelRequest) -> Any:
        return build_model(request, self.config)


def llama_shape(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
    }


class Llama60M(Llama):
    name = "llama_60m"
    description = "LLaMA 60M (GaLore paper): width 512, 8 layers, 8 heads"
    hf_config = llama_shape(512, 1376, 8, 8)


class Llama1B(Llama):
    name = "llama_1b"
    description = "LLaMA 1B (GaLore paper): width 2048, 24 layers, 32 heads"
    hf_config = llama_shape(2048, 5461, 24, 32)


class Llama7B(Llama):
    name = "llama_7b"
    description = "LLaMA 7B (GaLore paper): width 4096, 32 layers, 32 heads, 2048 positions"
    max_positions = 2048
    hf_config = llama_shape(4096, 11008, 32, 32)


@lowmem.hookimpl
def register_models(register):
    for cls in (Llama60M, Llama1B, Llama7B):
        register(cls())
