"""``hf``: any Hugging Face model, by folder or hub id (``--model ./my-model``, ``--model
Qwen/Qwen2.5-0.5B``), with its own tokenizer.

The objective picks the Auto class (causal LM, masked LM for encoders, sequence classification
for labelled data); LoRA and GaLore target every linear layer inside the transformer blocks
(embeddings and heads excluded). Pretraining starts from the folder's config with random
weights, finetuning from its weights. Only ``config.json`` is read until the model is built, so
``lowmem estimate --model FOLDER`` builds it on the meta device without touching the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lowmem
from lowmem.api import CLASSIFICATION_KINDS
from lowmem.modeling import build_model, cached_hub_file, config_check_errors, hub_is_offline


@lowmem.hookimpl
def register_models(register):
    register(HFModel())


def read_config(source: str) -> dict[str, Any] | None:
    """config.json of a folder, or of a hub id from the local cache (or the hub when online)."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise lowmem.ConfigError(
                f"model folder {folder} has no config.json: not a Hugging Face model folder")
        path: str | None = str(folder / "config.json")
    elif "/" in source and not source.startswith((".", "/", "~")):
        path = cached_hub_file(source, "config.json")
        if path is None and not hub_is_offline():
            from huggingface_hub import hf_hub_download

            try:
                path = hf_hub_download(source, "config.json")
            except Exception as exc:  # noqa: BLE001 - any hub failure is one line
                raise lowmem.ConfigError(f"model {source!r}: cannot get its config.json from the hub "
                                         f"({type(exc).__name__})") from None
        if path is None:
            raise lowmem.ConfigError(f"model {source!r} is not in the local Hugging Face cache and the hub "
                                     "is offline; download it first or pass a local folder")
    else:
        return None
    try:
        data = json.loads(Path(str(path)).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise lowmem.ConfigError(f"{path}: not a readable config.json ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise lowmem.ConfigError(f"{path}: no 'model_type': not a Hugging Face model config")
    return data


def is_encoder(config: dict[str, Any]) -> bool:
    """Encoders (BERT, RoBERTa, ...) pretrain as masked LMs; every other model as a causal LM."""
    architectures = " ".join(config.get("architectures") or [])
    if "CausalLM" in architectures or "LMHeadModel" in architectures:
        return False
    if "MaskedLM" in architectures or "ForPreTraining" in architectures:
        return True
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = config["model_type"]
    return model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and (
        model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or config.get("is_decoder") is False)


class HFModel(lowmem.Model):
    name = "hf"
    description = "any Hugging Face model: --model FOLDER or a hub id (its own tokenizer)"

    def __init__(self, source: str | None = None, config: dict[str, Any] | None = None):
        self.source = source
        self.hf = config or {}
        if source is not None:
            self.name = source  # type: ignore[misc]  # runs and messages show what the user named
            self.pretrained_id = source  # type: ignore[misc]  # finetuning loads the source's weights
            self.vocab_size = int(self.hf.get("vocab_size") or 0)  # type: ignore[misc]
            positions = self.hf.get("max_position_embeddings") or self.hf.get("n_positions") or 2048
            # RoBERTa-style tables reserve rows before the first position (pad id + 1).
            if self.hf.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
                positions -= int(self.hf.get("pad_token_id") or 1) + 1
            self.max_positions = int(positions)  # type: ignore[misc]

    def from_source(self, source: str) -> HFModel | None:
        config = read_config(source)
        if config is None:
            return None
        folder = Path(source).expanduser()
        return HFModel(str(folder.resolve()) if folder.is_dir() else source, config)

    def tokenizer_source(self) -> str | None:
        return self.source

    def objective(self, mode: str, dataset_kind: str) -> str:
        self.required_source()
        if mode == "finetuning" and dataset_kind in CLASSIFICATION_KINDS:
            return lowmem.CLASSIFICATION
        return lowmem.MASKED_LM if is_encoder(self.hf) else lowmem.CAUSAL_LM

    def required_source(self) -> str:
        """The folder or hub id; the registered 'hf' entry itself (``--model hf``) has none."""
        if self.source is None:
            raise lowmem.ConfigError("model 'hf' needs a source: pass --model FOLDER or a hub id")
        return self.source

    def config(self, request: lowmem.ModelRequest) -> Any:
        from transformers import AutoConfig

        source = self.required_source()
        invalid: tuple[type[Exception], ...] = (ValueError, KeyError, TypeError, OSError,
                                                *config_check_errors())
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=request.trust_remote_code)
        except invalid as exc:
            # transformers' checks of a config (an unknown model_type, a hidden size the heads do
            # not divide) are the user's input: one line, the reason first (a validation error
            # carries it as its cause).
            from lowmem.text import first_line

            reason = first_line(exc.__cause__ or exc)
            raise lowmem.ConfigError(
                f"model {self.source}: transformers cannot build its config: {reason}") from None
        config.vocab_size = request.vocab_size
        return config

    def build(self, request: lowmem.ModelRequest) -> Any:
        return build_model(request, self.config)

    def find_targets(self, model: Any) -> tuple[str, ...]:
        from lowmem.modeling import block_linear_names

        return block_linear_names(model)
