"""The batching pipeline the training loop calls: dataset records -> token batches.

Text objectives pack documents (each followed by EOS) into ``max_length`` blocks; prompt/completion
and chat examples (``lowmem.examples``) become one row each, or are packed whole into rows with
``packing``; classification pads each batch to its longest row (``lowmem.batching`` builds
them). Every batch depends only on (seed, epoch, global batch index), never on the global RNG,
so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowmem.api import CAUSAL_LM, CHAT, CLASSIFICATION, MASKED_LM, SFT, DataRequest, Dataset
from lowmem.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

IGNORE_INDEX = -100  # label value the losses skip
MASK_PROBABILITY = 0.15
ENCODE_CHUNK = 256  # texts per tokenizer call: the Rust tokenizer encodes a list in parallel
# Tokenized texts kept per tokenizer in this process; beyond it (streamed corpora) re-tokenize.
MAX_CACHED_TOKENS = 5_000_000  # ~200 MB of Python ints at most; the embedded corpus is 0.5 M
EVAL_EPOCH = -1  # masking-seed epoch for eval batches, distinct from every training epoch

Batch = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class DataSpec:
    dataset: Dataset
    source: str | None
    objective: str
    tokenizer: Any
    max_length: int
    batch_size: int
    seed: int
    shuffle: bool
    cache_dir: Path
    rank: int = 0
    world_size: int = 1
    kind: str = "text"  # the dataset's kind (lowmem.api: TEXT, SFT, CHAT, CLASSIFICATION, REGRESSION)
    packing: bool = False  # causal LM: keep attention within each document / example


def dataset_kind(spec: DataSpec) -> str:
    return spec.dataset.kind_of(spec.source)


def label_names(spec: DataSpec) -> list[str]:
    return list(spec.dataset.label_names(_request(spec, "train", epoch=0, shuffled=False)))


def count_tokens(batch: Batch) -> int:
    """Real (non-padding) input tokens in ``batch``."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["lowmem_tokens"].sum())  # packed rows carry no attention mask


def model_inputs(batch: Batch) -> Batch:
    """What the model is called with: the batch without lowmem's own bookkeeping."""
    return {k: v for k, v in batch.items() if not k.startswith("lowmem_")}


def train_batches(spec: DataSpec, epoch: int, skip: int = 0) -> Iterator[Batch]:
    """One pass over the train split: the batches of this rank, after the first ``skip`` global
    batches. Global batch i goes to rank i % world_size; with several ranks, a final round that
    does not give every rank a batch is dropped, so all ranks take the same number of steps."""
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    request = _request(spec, "train", epoch=epoch, shuffled=spec.shuffle)
    batches = _global_batches(spec, spec.dataset.records(request), epoch=epoch, skip=skip)
    return _batches_of_rank(batches, spec.rank, spec.world_size)


def eval_batches(spec: DataSpec, limit: int, split: str = "eval") -> list[Batch]:
    """The first ``limit`` batches of a held-out split in source order; identical on every call."""
    return list(_cached_eval_batches(spec, limit, split))


@functools.lru_cache(maxsize=8)
def _cached_eval_batches(spec: DataSpec, limit: int, split: str) -> tuple[Batch, ...]:
    request = _request(spec, split, epoch=0, shuffled=False)
    batches = _global_batches(spec, spec.dataset.records(request), epoch=EVAL_EPOCH, skip=0)
    found = []
    for index, make_batch in batches:
        if index >= limit:
            break
        found.append(make_batch())
    return tuple(found)


def _request(spec: DataSpec, split: str, epoch: int, shuffled: bool) -> DataRequest:
    return DataRequest(
        split=split,
        seed=spec.seed if shuffled else None,
        epoch=epoch,
        source=spec.source,
        cache_dir=Path(spec.cache_dir),
    )


# A global batch is produced as (index, build): ranks only build their own batches.
GlobalBatches = Iterator[tuple[int, Callable[[], Batch]]]


def _global_batches(
    spec: DataSpec, records: Iterable[dict[str, Any]], epoch: int, skip: int
) -> GlobalBatches:
    from lowmem import batching

    if spec.objective == CLASSIFICATION:
        return batching.classification_batches(spec, records, skip)
    if spec.objective == CAUSAL_LM and spec.kind in (SFT, CHAT):
        return batching.example_batches(spec, records, skip)
    if spec.objective in (CAUSAL_LM, MASKED_LM):
        return batching.packed_batches(spec, records, epoch, skip)
    raise ConfigError(f"no batching for objective {spec.objective!r}")


def _batches_of_rank(batches: GlobalBatches, rank: int, world_size: int) -> Iterator[Batch]:
    if world_size == 1:
        for _, make_batch in batches:
            yield make_batch()
        return
    mine = None
    for index, make_batch in batches:
        if index % world_size == rank:
            mine = make_batch
        if index % world_size == world_size - 1 and mine is not None:
            yield mine()  # the round is complete: every rank has a batch for this step
            mine = None


# -- tokenizing, with a per-process cache ---------------------------------------------------------
def record_texts(records: Iterable[dict[str, Any]]) -> Iterator[str]:
    for record in records:
        text = record.get("text")
        if not isinstance(text, str):
            raise ConfigError(f"a record's 'text' must be a string, got {type(text).__name__}")
        yield text


def encoded_documents(tokenizer: Any, texts: Iterable[str]) -> Iterator[list[int]]:
    """Token ids of each text without special tokens (packing adds EOS itself), in order."""
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == ENCODE_CHUNK:
            yield from encode_texts(tokenizer, chunk, max_length=None)
            chunk = []
    if chunk:
        yield from encode_texts(tokenizer, chunk, max_length=None)


class _TokenCache:
    def __init__(self) -> None:
        self.ids: dict[tuple[int | None, str], list[int]] = {}
        self.tokens = 0


_caches: weakref.WeakKeyDictionary[Any, _TokenCache] = weakref.WeakKeyDictionary()


def encode_texts(tokenizer: Any, texts: list[str], max_length: int | None) -> list[list[int]]:
    """``max_length=None``: the whole text, no special tokens (packing). Otherwise one truncated
    sequence with the tokenizer's own special tokens (classification)."""
    cache = _caches.setdefault(tokenizer, _TokenCache())
    missing = list(dict.fromkeys(t for t in texts if (max_length, t) not in cache.ids))
    if missing:
        if max_length is None:
            encoded = tokenizer(missing, add_special_tokens=False, verbose=False)["input_ids"]
        else:
            encoded = tokenizer(missing, truncation=True, max_length=max_length, verbose=False)["input_ids"]
        if cache.tokens >= MAX_CACHED_TOKENS:
            found = dict(zip(missing, encoded, strict=True))
            return [cache.ids[(max_length, t)] if (max_length, t) in cache.ids else found[t] for t in texts]
        for text, ids in zip(missing, encoded, strict=True):
            cache.ids[(max_length, text)] = ids
            cache.tokens += len(ids)
    return [cache.ids[(max_length, t)] for t in texts]
