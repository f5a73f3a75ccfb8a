"""The batching pipeline the training loop calls: dataset records -> token batches.

Text objectives pack documents (each followed by EOS) into ``max_length`` blocks; classification
pads each batch to its longest row. Every batch depends only on (seed, epoch, global batch index),
never on the global RNG, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import hashlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowmem.api import CAUSAL_LM, CLASSIFICATION, MASKED_LM, DataRequest, Dataset
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


def dataset_kind(spec: DataSpec) -> str:
    return spec.dataset.kind_of(spec.source)


def label_names(spec: DataSpec) -> list[str]:
    return list(spec.dataset.label_names(_request(spec, "train", epoch=0, shuffled=False)))


def count_tokens(batch: Batch) -> int:
    """Real (non-padding) input tokens in ``batch``."""
    return int(batch["attention_mask"].sum())


def train_batches(spec: DataSpec, epoch: int, skip: int = 0) -> Iterator[Batch]:
    """One pass over the train split: the batches of this rank, after the first ``skip`` global
    batches. Global batch i goes to rank i % world_size; with several ranks, a final round that
    does not give every rank a batch is dropped, so all ranks take the same number of steps."""
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    request = _request(spec, "train", epoch=epoch, shuffled=spec.shuffle)
    batches = _global_batches(spec, spec.dataset.records(request), epoch=epoch, skip=skip)
    return _batches_of_rank(batches, spec.rank, spec.world_size)


def eval_batches(spec: DataSpec, limit: int) -> list[Batch]:
    """The first ``limit`` batches of the eval split in source order; identical on every call."""
    return list(_cached_eval_batches(spec, limit))


@functools.lru_cache(maxsize=8)
def _cached_eval_batches(spec: DataSpec, limit: int) -> tuple[Batch, ...]:
    request = _request(spec, "eval", epoch=0, shuffled=False)
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
    if spec.objective == CLASSIFICATION:
        return _classification_batches(spec, records, skip)
    if spec.objective in (CAUSAL_LM, MASKED_LM):
        return _packed_batches(spec, records, epoch, skip)
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


# -- text: packing -------------------------------------------------------------------------------
def _packed_batches(
    spec: DataSpec, records: Iterable[dict[str, Any]], epoch: int, skip: int
) -> GlobalBatches:
    """Documents, each followed by EOS, concatenated and cut into ``max_length`` blocks; global
    batch i holds tokens [i * batch_size * max_length, ...) of the epoch's stream, so skipping
    batches only needs the token counts."""
    tokenizer = spec.tokenizer
    if tokenizer.eos_token_id is None:
        raise ConfigError("packing documents needs a tokenizer with an EOS token")
    batch_tokens = spec.batch_size * spec.max_length
    to_skip = skip * batch_tokens
    buffer: list[int] = []
    index = skip
    for ids in _encoded_documents(tokenizer, _texts(records)):
        if to_skip:
            dropped = min(to_skip, len(ids) + 1)
            to_skip -= dropped
            buffer.extend((ids + [tokenizer.eos_token_id])[dropped:])
        else:
            buffer.extend(ids)
            buffer.append(tokenizer.eos_token_id)
        while len(buffer) >= batch_tokens:
            yield index, functools.partial(_packed_batch, spec, buffer[:batch_tokens], epoch, index)
            del buffer[:batch_tokens]
            index += 1
    if buffer:
        yield index, functools.partial(_packed_batch, spec, buffer, epoch, index)


def _packed_batch(spec: DataSpec, tokens: list[int], epoch: int, index: int) -> Batch:
    import torch

    length = spec.max_length
    rows = -(-len(tokens) // length)
    input_ids = torch.full((rows * length,), spec.tokenizer.pad_token_id, dtype=torch.int64)
    input_ids[: len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
    attention_mask = torch.zeros(rows * length, dtype=torch.int64)
    attention_mask[: len(tokens)] = 1
    input_ids, attention_mask = input_ids.view(rows, length), attention_mask.view(rows, length)
    if spec.objective == MASKED_LM:
        generator = torch.Generator().manual_seed(_mask_seed(spec.seed, epoch, index))
        input_ids, labels = mask_tokens(input_ids, attention_mask, spec.tokenizer, generator)
    else:
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _mask_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(f"mask:{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed takes at most 64 bits


def mask_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer: Any, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: 15% of the real, non-special tokens are predicted; of those 80% become the
    mask token, 10% a random token, 10% stay. Returns (inputs, labels)."""
    import torch

    if tokenizer.mask_token_id is None:
        raise ConfigError("masked-LM training needs a tokenizer with a mask token")
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=input_ids.dtype)
    eligible = attention_mask.bool() & ~torch.isin(input_ids, special)
    chosen = eligible & (torch.rand(input_ids.shape, generator=generator) < MASK_PROBABILITY)
    if eligible.any() and not chosen.any():
        # A batch without a single target would give a NaN loss.
        chosen.view(-1)[int(eligible.view(-1).nonzero()[0])] = True
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    action = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(len(tokenizer), input_ids.shape, generator=generator, dtype=input_ids.dtype)
    masked = input_ids.masked_fill(chosen & (action < 0.8), tokenizer.mask_token_id)
    randomize = chosen & (action >= 0.8) & (action < 0.9)
    masked = torch.where(randomize, random_ids, masked)
    return masked, labels


# -- classification --------------------------------------------------------------------------------
def _classification_batches(spec: DataSpec, records: Iterable[dict[str, Any]], skip: int) -> GlobalBatches:
    chunk: list[dict[str, Any]] = []
    index = 0
    for record in records:
        if index < skip:  # skipped batches are never tokenized
            chunk.append(record)
            if len(chunk) == spec.batch_size:
                chunk, index = [], index + 1
            continue
        if "label" not in record:
            raise ConfigError(
                f"dataset {spec.dataset.name!r} has a record without a label: classification needs one"
            )
        chunk.append(record)
        if len(chunk) == spec.batch_size:
            yield index, functools.partial(_classification_batch, spec, chunk)
            chunk, index = [], index + 1
    if chunk and index >= skip:
        yield index, functools.partial(_classification_batch, spec, chunk)


def _classification_batch(spec: DataSpec, records: list[dict[str, Any]]) -> Batch:
    import torch

    tokenizer = spec.tokenizer
    encoded = list(_encode(tokenizer, [r["text"] for r in records], max_length=spec.max_length))
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.int64)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        attention_mask[row, : len(ids)] = 1
    labels = torch.tensor([int(r["label"]) for r in records], dtype=torch.int64)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# -- tokenizing, with a per-process cache ---------------------------------------------------------
def _texts(records: Iterable[dict[str, Any]]) -> Iterator[str]:
    for record in records:
        text = record.get("text")
        if not isinstance(text, str):
            raise ConfigError(f"a record's 'text' must be a string, got {type(text).__name__}")
        yield text


def _encoded_documents(tokenizer: Any, texts: Iterable[str]) -> Iterator[list[int]]:
    """Token ids of each text without special tokens (packing adds EOS itself), in order."""
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == ENCODE_CHUNK:
            yield from _encode(tokenizer, chunk, max_length=None)
            chunk = []
    if chunk:
        yield from _encode(tokenizer, chunk, max_length=None)


class _TokenCache:
    def __init__(self) -> None:
        self.ids: dict[tuple[int | None, str], list[int]] = {}
        self.tokens = 0


_caches: weakref.WeakKeyDictionary[Any, _TokenCache] = weakref.WeakKeyDictionary()


def _encode(tokenizer: Any, texts: list[str], max_length: int | None) -> list[list[int]]:
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
