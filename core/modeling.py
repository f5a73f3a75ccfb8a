"""What the built-in model plugins share: objective -> transformers Auto class, random or meta
initialisation from a config, loading weights (refusing unrequested remote code), and deciding
where finetuning weights come from without touching the network.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowmem.api import CAUSAL_LM, CLASSIFICATION, MASKED_LM, Model, ModelRequest
from lowmem.errors import ConfigError
from lowmem.text import first_line

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

AUTO_CLASS_NAMES = {
    CAUSAL_LM: "AutoModelForCausalLM",
    MASKED_LM: "AutoModelForMaskedLM",
    CLASSIFICATION: "AutoModelForSequenceClassification",
}
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def auto_class(objective: str) -> Any:
    import transformers

    if objective not in AUTO_CLASS_NAMES:
        raise ConfigError(f"unknown objective {objective!r}; expected one of: {', '.join(AUTO_CLASS_NAMES)}")
    return getattr(transformers, AUTO_CLASS_NAMES[objective])


def build_model(request: ModelRequest, make_config: Callable[[ModelRequest], Any]) -> torch.nn.Module:
    """The network for ``request``: random weights from ``make_config(request)``, or weights loaded
    from ``request.weights``; on the meta device when asked (shapes only, no memory)."""
    import torch

    cls = auto_class(request.objective)
    if request.weights is None:
        config = make_config(request)
    else:
        refuse_unrequested_remote_code(request.weights, request.trust_remote_code)
        if request.device != "meta":
            return load_pretrained(cls, request)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(request.weights, trust_remote_code=request.trust_remote_code)
        config.vocab_size = request.vocab_size
    set_task_fields(config, request)
    with torch.device(request.device):
        return cls.from_config(config, trust_remote_code=request.trust_remote_code)


def set_task_fields(config: Any, request: ModelRequest) -> None:
    # Default BOS/EOS ids belong to the architecture's original tokenizer; outside this
    # vocabulary they would point past the embedding table.
    for field in ("bos_token_id", "eos_token_id"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value >= request.vocab_size:
            setattr(config, field, None)
    # Sequence classification finds each row's last real token through pad_token_id.
    if request.pad_token_id is not None:
        config.pad_token_id = request.pad_token_id
    if request.objective == CLASSIFICATION:
        config.num_labels = request.num_labels


def load_pretrained(cls: Any, request: ModelRequest) -> torch.nn.Module:
    import torch

    extra: dict[str, Any] = {}
    if request.objective == CLASSIFICATION:
        extra["num_labels"] = request.num_labels
    if request.pad_token_id is not None:
        extra["pad_token_id"] = request.pad_token_id
    try:
        # fp32 master weights whatever the checkpoint stores; autocast handles bf16/fp16 compute.
        model = cls.from_pretrained(
            request.weights, trust_remote_code=request.trust_remote_code, dtype=torch.float32, **extra
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"could not load weights from {request.weights}: {first_line(exc)}") from None
    if model.get_input_embeddings().num_embeddings != request.vocab_size:
        model.resize_token_embeddings(request.vocab_size)
    return model.to(request.device)


def refuse_unrequested_remote_code(weights: str, trust_remote_code: bool) -> None:
    """A checkpoint whose config maps to its own Python code runs that code when loaded: only when
    the user said so. Checked before transformers reads anything else."""
    if trust_remote_code:
        return
    config_path = local_config_file(weights)
    if config_path is None:
        return  # not available locally: transformers itself refuses remote code without the flag
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config_path}: not a readable config.json ({first_line(exc)})") from None
    if isinstance(config, dict) and config.get("auto_map"):
        raise ConfigError(f"{weights} ships its own code; pass --trust-remote-code to allow it")


def local_config_file(weights: str) -> Path | None:
    folder = Path(weights).expanduser()
    if folder.is_dir():
        return folder / "config.json" if (folder / "config.json").is_file() else None
    cached = cached_hub_file(weights, "config.json")
    return Path(cached) if cached else None


def cached_hub_file(repo_id: str, filename: str) -> str | None:
    """The path of ``filename`` of hub repo ``repo_id`` in the local cache, or None. Never downloads."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a valid repo id
        return None
    return found if isinstance(found, str) else None


def cached_weights_folder(repo_id: str) -> str | None:
    """The cached snapshot folder of ``repo_id`` when it holds config and weights, else None."""
    config = cached_hub_file(repo_id, "config.json")
    if config is None:
        return None
    folder = Path(config).parent
    # Fetching a tokenizer also caches config.json: check the weights themselves are there.
    return str(folder) if any(cached_hub_file(repo_id, name) for name in WEIGHT_FILES) else None


def find_weights(
    model_plugin: Model, mode: str, model_path: str | None, test: bool, say: Callable[[str], None]
) -> str | None:
    """Where finetuning starts from: ``--model-path``, else the plugin's pretrained weights if they
    are cached locally, else (``--test`` only) random weights. Pretraining starts from random."""
    if mode == "pretraining":
        return None
    if model_path is not None:
        return model_path
    hub_id = model_plugin.pretrained_id
    if hub_id is not None and Path(hub_id).is_dir():  # a model given as a folder: its own weights
        return hub_id
    cached = cached_weights_folder(hub_id) if hub_id else None
    if cached is not None:
        return cached
    if test:
        what = f"{model_plugin.name} ({hub_id})" if hub_id else model_plugin.name
        say(f"warning: no pretrained weights for {what} offline; --test falls back to random init")
        return None
    if hub_id is None:
        raise ConfigError(
            f"model {model_plugin.name!r} has no published pretrained weights to finetune; "
            "pass --model-path DIR (a Hugging Face folder, e.g. one saved by a lowmem pretraining run)"
        )
    raise ConfigError(
        f"finetuning {model_plugin.name!r} needs pretrained weights, and {hub_id!r} is not in the local "
        f"Hugging Face cache; pass --model-path DIR (or the hub id {hub_id} to download it), "
        f"or pre-download it with `huggingface-cli download {hub_id}`"
    )


def hub_is_offline() -> bool:
    import os

    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


# -- which layers LoRA adapts and GaLore projects ------------------------------------------
REGEX_CHARACTERS = set("*+?[](){}|^$\\")
ALL_LINEAR = "all-linear"


def is_matrix_layer(module: Any) -> bool:
    """nn.Linear and GPT-2's Conv1D: the layers LoRA and GaLore work on."""
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def block_linear_names(model: Any) -> tuple[str, ...]:
    """Names (relative to one block, e.g. ``self_attn.q_proj``) of every linear layer inside the
    transformer blocks: the blocks are the longest ModuleList of the model's body, so embeddings,
    poolers and heads are left out."""
    import torch

    body = getattr(model, "base_model", model)
    lists = [m for m in body.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return ()
    blocks = max(lists, key=len)
    names: dict[str, None] = {}
    for block in blocks:
        for name, module in block.named_modules():
            if name and is_matrix_layer(module):
                names.setdefault(name, None)
    return tuple(names)


def choose_targets(model: Any, option: str, plugin: Model) -> tuple[str, ...]:
    """The target layers for ``--target-modules``: empty -> the model plugin's own (or those it
    finds on the model); ``all-linear`` -> every linear layer but the output head; a regular
    expression -> the layers whose qualified names match it whole; else comma-separated names,
    each matching a qualified name or its ending (peft's and Trainer's conventions)."""
    import re

    option = option.strip()
    if not option:
        return tuple(plugin.target_modules) or plugin.find_targets(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = [(n, m) for n, m in model.named_modules() if is_matrix_layer(m) and m is not head]
    if option == ALL_LINEAR:
        found = [n for n, _ in layers]
    elif REGEX_CHARACTERS & set(option):
        try:
            pattern = re.compile(option)
        except re.error as exc:
            raise ConfigError(f"--target-modules {option!r} is not a valid regular expression: {exc}"
                              ) from None
        found = [n for n, _ in layers if pattern.fullmatch(n)]
    else:
        wanted = [name.strip() for name in option.split(",") if name.strip()]
        found = [w for w in wanted if any(n == w or n.endswith("." + w) for n, _ in layers)]
        missing = [w for w in wanted if w not in found]
        if missing:
            raise ConfigError(
                f"--target-modules: no linear layer of this model is named {', '.join(missing)}")
    if not found:
        raise ConfigError(f"--target-modules {option!r} matches no linear layer of this model")
    return tuple(found)


def config_check_errors() -> tuple[type[Exception], ...]:
    """huggingface_hub's validation errors (transformers 5 checks configs with them; they are
    not ValueErrors)."""
    import huggingface_hub.errors

    found = getattr(huggingface_hub.errors, "StrictDataclassError", None)
    return (found,) if isinstance(found, type) and issubclass(found, Exception) else ()
