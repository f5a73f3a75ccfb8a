"""GPT-2 small: pretrained from scratch, or finetuned from the ``gpt2`` checkpoint when it is at hand."""

from __future__ import annotations

from typing import Any, ClassVar

import lowmem
from lowmem.modeling import build_model


class GPT2(lowmem.Model):
    """A GPT-2 decoder; subclasses set the shape through ``hf_config``."""

    name = "gpt2"
    description = "GPT-2 small (124M): width 768, 12 layers, 12 heads"
    vocab_size = 50257
    max_positions = 1024
    # transformers GPT2Config arguments other than the vocabulary size and positions.
    hf_config: ClassVar[dict[str, Any]] = {"n_embd": 768, "n_layer": 12, "n_head": 12}
    target_modules = ("c_attn", "c_proj", "c_fc")
    tokenizer_id = "gpt2"
    pretrained_id = "gpt2"

    def config(self, request: lowmem.ModelRequest) -> Any:
        from transformers import GPT2Config

        return GPT2Config(vocab_size=request.vocab_size, n_positions=self.max_positions, **self.hf_config)

    def build(self, request: lowmem.ModelRequest) -> Any:
        return build_model(request, self.config)


@lowmem.hookimpl
def register_models(register):
    register(GPT2())
