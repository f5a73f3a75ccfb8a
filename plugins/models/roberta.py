"""RoBERTa-base: pretrained as a masked LM, finetuned as a sequence classifier."""

from __future__ import annotations

from typing import Any, ClassVar

import lowmem
from lowmem.modeling import build_model


class Roberta(lowmem.Model):
    """A RoBERTa encoder; subclasses set the shape through ``hf_config``."""

    name = "roberta"
    description = "RoBERTa-base (125M): width 768, 12 layers, 12 heads"
    vocab_size = 50265
    max_positions = 512  # usable tokens; see config() for the embedding table's size
    # transformers RobertaConfig arguments other than the vocabulary size and positions.
    hf_config: ClassVar[dict[str, Any]] = {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    }
    target_modules = ("query", "key", "value", "dense")
    tokenizer_id = "roberta-base"
    pretrained_id = "roberta-base"

    def objective(self, mode: str, dataset_kind: str) -> str:
        if mode == "finetuning" and dataset_kind == lowmem.CLASSIFICATION:
            return lowmem.CLASSIFICATION
        return lowmem.MASKED_LM  # an encoder has no causal objective

    def config(self, request: lowmem.ModelRequest) -> Any:
        from transformers import RobertaConfig

        pad_token_id = 1 if request.pad_token_id is None else request.pad_token_id
        # RoBERTa numbers positions from pad_token_id + 1, so the table needs that many extra rows
        # (roberta-base: pad 1, 512 tokens -> 514 positions).
        return RobertaConfig(
            vocab_size=request.vocab_size,
            max_position_embeddings=self.max_positions + pad_token_id + 1,
            pad_token_id=pad_token_id,
            type_vocab_size=1,
            **self.hf_config,
        )

    def build(self, request: lowmem.ModelRequest) -> Any:
        return build_model(request, self.config)


@lowmem.hookimpl
def register_models(register):
    register(Roberta())
