"""Which tokenizer a run uses, and the offline fallback: a byte-level BPE trained on the embedded
corpus to exactly the model's vocabulary size.

Order: ``--tokenizer``; the tokenizer of ``--model-path`` (saved in that folder, or of that hub
id); the model's own tokenizer if it is already in the local Hugging Face cache; else the BPE,
trained once and cached. The hub is only contacted for ids the user typed.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowmem.api import MASKED_LM, DataRequest, Model
from lowmem.errors import ConfigError
from lowmem.text import first_line

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PreTrainedTokenizerFast

    from lowmem.registry import Registry

BOS, EOS, PAD, UNK, MASK = "<s>", "</s>", "<pad>", "<unk>", "<mask>"
# RoBERTa's order: pad id 1 keeps RoBERTa's position ids (which start after the pad id) in range.
SPECIAL_TOKENS = [BOS, PAD, EOS, UNK, MASK]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")


def load_tokenizer(
    *,
    tokenizer: str | None,
    model_path: str | None,
    model_plugin: Model,
    cache_dir: Path,
    registry: Registry,
    say: Callable[[str], None],
) -> PreTrainedTokenizerFast:
    """The run's tokenizer, with a pad token (and a mask token where the model pretrains as a
    masked LM). Its ``len()`` is the vocabulary size to build the model with."""
    loaded = None
    if tokenizer is not None:
        loaded = _load_named(tokenizer, option="--tokenizer")
    elif model_plugin.tokenizer_source() is not None:  # a model folder or hub id: its own tokenizer
        loaded = _load_named(str(model_plugin.tokenizer_source()), option="--model")
    elif model_path is not None and (
        has_tokenizer_files(model_path) or not Path(model_path).expanduser().exists()
    ):
        # A local folder saved with its tokenizer, or a hub id the user typed: weights and
        # tokenizer must come from the same place, or every embedding row means something else.
        loaded = _load_named(model_path, option="--model-path")
    elif model_plugin.tokenizer_id is not None:
        loaded = cached_hub_tokenizer(model_plugin.tokenizer_id)
        if loaded is None:
            say(
                f"note: tokenizer {model_plugin.tokenizer_id!r} is not in the local Hugging Face cache; "
                f"using a byte-level BPE with {model_plugin.vocab_size} tokens trained on "
                f"{registry.tokenizer_corpus().name}"
            )
    if loaded is None:
        loaded = corpus_bpe_tokenizer(model_plugin.vocab_size, Path(cache_dir), registry)
    return ensure_special_tokens(
        loaded, needs_mask=model_plugin.objective("pretraining", "text") == MASKED_LM
    )


def has_tokenizer_files(folder: str) -> bool:
    path = Path(folder).expanduser()
    return path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES)


def _load_named(name: str, option: str) -> Any:
    """A folder, or a hub id the user typed (the only case allowed to use the network)."""
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    if path.exists() and not has_tokenizer_files(str(path)):
        raise ConfigError(
            f"{option} {name}: no tokenizer files (tokenizer.json, vocab.json, ...) in that folder"
        )
    from lowmem.modeling import config_check_errors

    invalid: tuple[type[Exception], ...] = (OSError, ValueError, *config_check_errors())
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else name)
    except invalid as exc:
        reason = first_line(exc.__cause__ or exc)  # a validation error carries the reason as its cause
        raise ConfigError(f"{option} {name}: could not load a tokenizer ({reason})") from None


def cached_hub_tokenizer(hub_id: str) -> Any | None:
    """The tokenizer for ``hub_id`` if the local Hugging Face cache has it; never downloads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hub_id, local_files_only=True)
    except (OSError, ValueError, ImportError):
        return None


def ensure_special_tokens(tokenizer: Any, needs_mask: bool) -> Any:
    """Batching pads, and masked LM masks: add what a tokenizer lacks (GPT-2 pads with its EOS)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD})
    if needs_mask and tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": MASK})
    return tokenizer


def bpe_cache_folder(cache_dir: Path, vocab_size: int) -> Path:
    # The corpus is the running Python's standard library, so the tokenizer depends on its version.
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return Path(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{version}"


def corpus_bpe_tokenizer(vocab_size: int, cache_dir: Path, registry: Registry) -> Any:
    """The byte-level BPE for ``vocab_size``, trained on first use and loaded from its cache folder."""
    from transformers import PreTrainedTokenizerFast

    folder = bpe_cache_folder(cache_dir, vocab_size)
    if not (folder / "tokenizer.json").is_file():
        corpus = registry.tokenizer_corpus().records(
            DataRequest(split="train", cache_dir=Path(cache_dir))
        )
        save_atomically(train_bpe((record["text"] for record in corpus), vocab_size), folder)
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def train_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE of exactly ``vocab_size`` entries (special tokens included), wrapped as a
    transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ConfigError(
            f"a byte-level BPE needs at least {len(SPECIAL_TOKENS) + 256} tokens, not {vocab_size}"
        )
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_batched(texts), trainer=trainer)
    learned = backend.get_vocab_size()
    if learned < vocab_size:
        # The corpus ran out of merges (2 MB of docs has ~26k distinct words' worth). The model keeps
        # the requested vocabulary, and so its parameter count, through reserved placeholder tokens,
        # as LLaMA 3's tokenizer does; they never occur in text.
        backend.add_special_tokens([f"<reserved_{i}>" for i in range(vocab_size - learned)])
    bos, eos = backend.token_to_id(BOS), backend.token_to_id(EOS)
    # Single texts (classification) get <s> ... </s>; packed pretraining text asks for no specials.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}", special_tokens=[(BOS, bos), (EOS, eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, mask_token=MASK
    )


def _batched(texts: Iterable[str], size: int = 256) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def save_atomically(tokenizer: Any, folder: Path) -> None:
    """Save into a temporary sibling folder and rename it into place: when two processes train at
    once, the first rename wins and the other's copy is discarded; readers never see half a folder."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=folder.name + ".", suffix=".tmp", dir=folder.parent))
    try:
        tokenizer.save_pretrained(str(temporary))
        try:
            os.rename(temporary, folder)
        except OSError:
            if not (folder / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


