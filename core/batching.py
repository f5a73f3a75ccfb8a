"""Batches from records, per objective: packed text blocks (causal and masked LM), padded
classification rows (single texts or sentence pairs, int or float labels), and prompt/completion
or chat examples (``lowmem.examples``). Each batch depends only on (seed, epoch, batch index)."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from lowmem import examples
from lowmem.api import CAUSAL_LM, MASKED_LM
from lowmem.data import (
    IGNORE_INDEX,
    MASK_PROBABILITY,
    Batch,
    DataSpec,
    GlobalBatches,
    encode_texts,
    encoded_documents,
    record_texts,
)
from lowmem.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from lowmem.assemble import Run
    from lowmem.checkpoint import TrainState


# -- text: packing -------------------------------------------------------------------------------
def packed_batches(
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
    for ids in encoded_documents(tokenizer, record_texts(records)):
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
        generator = torch.Generator().manual_seed(batch_seed("mask", spec.seed, epoch, index))
        input_ids, labels = mask_tokens(input_ids, attention_mask, spec.tokenizer, generator)
    else:
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    if spec.packing and spec.objective == CAUSAL_LM:
        # Positions restart after every EOS: transformers then keeps attention within each
        # document (it reads packing from position ids when there is no attention mask).
        positions, position = [], 0
        for token in tokens + [spec.tokenizer.pad_token_id] * (rows * length - len(tokens)):
            positions.append(position)
            position = 0 if token == spec.tokenizer.eos_token_id else position + 1
        return {"input_ids": input_ids, "labels": labels, "lowmem_tokens": attention_mask.sum(1),
                "position_ids": torch.tensor(positions, dtype=torch.int64).view(rows, length)}
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_seed(purpose: str, seed: int, epoch: int, index: int) -> int:
    """The seed of global batch ``index`` of ``epoch`` for ``purpose`` ("mask", "dropout"): the
    batch's own, whichever process or micro-batch slot takes it."""
    digest = hashlib.blake2b(f"{purpose}:{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
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
def classification_batches(spec: DataSpec, records: Iterable[dict[str, Any]], skip: int) -> GlobalBatches:
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
    texts = [r["text"] for r in records]
    if any("text_pair" in r for r in records):  # pairs are encoded together, as BERT was trained
        pairs = [r.get("text_pair", "") for r in records]
        encoded = tokenizer(texts, pairs, truncation=True, max_length=spec.max_length,
                            verbose=False)["input_ids"]
    else:
        encoded = list(encode_texts(tokenizer, texts, max_length=spec.max_length))
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.int64)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        attention_mask[row, : len(ids)] = 1
    regression = any(isinstance(r["label"], float) for r in records)
    labels = torch.tensor([r["label"] for r in records], dtype=torch.float32 if regression else torch.int64)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# -- prompt/completion and chat examples ------------------------------------------------------------
def example_batches(spec: DataSpec, records: Iterable[dict[str, Any]], skip: int) -> GlobalBatches:
    """Examples in record order, those without a target token left out; ``batch_size`` rows per
    batch, each row one example or (packing) as many whole examples as fit."""
    encoded = [examples.encode(spec.tokenizer, record, spec.max_length) for record in records]
    kept = [e for e in encoded if any(label != IGNORE_INDEX for label in e.labels)]
    rows = examples.rows(kept, spec.batch_size, spec.max_length, spec.packing)
    pad = spec.tokenizer.pad_token_id
    for index, start in enumerate(range(0, len(rows), spec.batch_size)):
        if index >= skip:
            batch_rows = rows[start:start + spec.batch_size]
            yield index, functools.partial(examples.collate, batch_rows, pad, spec.packing)


# -- the loop's batches ---------------------------------------------------------------------
class TrainBatches:
    """This rank's micro-batches across epochs, keeping ``state.epoch`` and
    ``state.batch_in_epoch`` (global batches) current for resume."""

    def __init__(self, job: Run, state: TrainState, world_size: int):
        from lowmem.data import train_batches

        self.job, self.state, self.world_size = job, state, world_size
        self.make = train_batches
        self.batches: Iterator[Any] = iter(train_batches(job.data, state.epoch, skip=state.batch_in_epoch))
        self.fruitless_epochs = 0  # epochs ended since the last step: guards against endless loops

    def next_epoch(self) -> None:
        self.state.epoch, self.state.batch_in_epoch = self.state.epoch + 1, 0
        self.batches = iter(self.make(self.job.data, self.state.epoch))

    def group(self, size: int, trim_to: int | None) -> list[dict[str, Any]] | None:
        """``size`` micro-batches (every step has exactly as many: per-layer optimizers count
        them), or None when the epoch ended first (the partial group is dropped). Pretraining
        cycles over the corpus; ``trim_to`` keeps only that many rows of each (the last step)."""
        group: list[dict[str, Any]] = []
        while len(group) < size:
            with self.job.registry.guard(self.job.data.dataset, "records"):
                batch = next(self.batches, None)
                if batch is None and self.job.config.mode == "pretraining":  # cycle until the budget
                    self.next_epoch()
                    batch = next(self.batches, None)
            if batch is None:
                self.fruitless_epochs += 1
                if self.fruitless_epochs > 1:  # a whole epoch cannot fill one step
                    raise ConfigError(
                        f"the training data is too small: one epoch does not fill a step of {size} batch(es) "
                        f"of {self.job.config.batch_size} on each of {self.world_size} process(es)")
                self.next_epoch()
                return None
            batch["lowmem_seed"] = self.seed_of_next_batch()
            self.state.batch_in_epoch += self.world_size
            group.append(batch)
        if trim_to is not None:
            group = [{k: v[:trim_to] if v.dim() else v for k, v in batch.items()} for batch in group]
        return group

    def seed_of_next_batch(self) -> Any:
        """The seed of dropout in the batch just taken, from its global index: the same on
        whichever process and in whichever micro-batch it runs, so N processes draw the masks
        one process accumulating N micro-batches draws, and no two processes draw the same."""
        import torch

        data = self.job.data
        index = self.state.batch_in_epoch + data.rank  # global batch i is rank i % world_size's
        return torch.tensor(batch_seed("dropout", data.seed, self.state.epoch, index))
