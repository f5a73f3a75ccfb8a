"""Supervised examples for causal LMs, tokenized with the loss on what the model should learn to
write: the completion of a prompt/completion pair (with EOS appended), or the assistant turns
of a chat (rendered with the tokenizer's chat template).

Chat masks come from rendering the conversation prefix by prefix and mapping characters to
tokens, so any template works; released templates rarely carry ``{% generation %}`` markers.
A tokenizer without a template gets ``DEFAULT_CHAT_TEMPLATE``.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass
from typing import Any

from lowmem.errors import ConfigError

IGNORE_INDEX = -100
# <|role|> lines, each turn closed by EOS so the model learns where an answer ends.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    truncated: bool  # the prompt (SFT) or the conversation's end (chat) was cut to fit


_cache: weakref.WeakKeyDictionary[Any, dict[str, Example]] = weakref.WeakKeyDictionary()


def encode(tokenizer: Any, record: dict[str, Any], max_length: int) -> Example:
    """The tokens and loss labels of an SFT or chat record, at most ``max_length`` tokens."""
    cache = _cache.setdefault(tokenizer, {})
    key = f"{max_length}\x00{json.dumps(record, sort_keys=True)}"
    if key not in cache:
        if "messages" in record:
            cache[key] = encode_chat(tokenizer, record["messages"], max_length)
        else:
            cache[key] = encode_completion(tokenizer, record["prompt"], record["completion"], max_length)
    return cache[key]


def _bos(tokenizer: Any) -> list[int]:
    """[BOS] when the tokenizer starts its sequences with one (LLaMA does, Qwen2 does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("a")["input_ids"][:1] == [bos] else []


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """A prompt as training saw it before its completion: [BOS] prompt."""
    return _bos(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def encode_completion(tokenizer: Any, prompt: str, completion: str, max_length: int) -> Example:
    """[BOS] prompt completion EOS, the loss on completion and EOS; a prompt too long is cut from
    its start (the end, next to the completion, matters most), never the completion."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("prompt/completion training needs a tokenizer with an EOS token")
    bos = _bos(tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = max_length - len(bos) - len(target)
    truncated = len(prompt_ids) > max(room, 0)
    if room <= 0:  # the completion alone fills the row: keep as much of it as fits
        prompt_ids, target = [], target[: max_length - len(bos)]
    elif truncated:
        prompt_ids = prompt_ids[len(prompt_ids) - room:]
    ids = bos + prompt_ids + target
    return Example(ids, [IGNORE_INDEX] * (len(ids) - len(target)) + target, truncated)


def chat_template(tokenizer: Any) -> str:
    return tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=chat_template(tokenizer))


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (each from the
    end of the generation prompt before it to the end of the turn, end-of-turn marker included)."""
    full = render(tokenizer, messages, False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:index], True) if index else ""
        through = render(tokenizer, messages[: index + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ConfigError("this tokenizer's chat template does not render a conversation prefix by "
                              "prefix, so its assistant turns cannot be found; set another template")
        spans.append((len(before), len(through)))
    return full, spans


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> Example:
    """The rendered conversation, the loss on assistant tokens only; cut at ``max_length``."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = [token if any(start <= s and e <= end and e > s for start, end in spans) else IGNORE_INDEX
              for token, (s, e) in zip(ids, offsets, strict=True)]
    truncated = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length], truncated)


def survey(tokenizer: Any, records: list[dict[str, Any]], max_length: int) -> tuple[int, int, int]:
    """(examples, examples cut to fit, examples left without any target token) of a split."""
    cut = empty = 0
    for record in records:
        example = encode(tokenizer, record, max_length)
        cut += example.truncated
        empty += all(label == IGNORE_INDEX for label in example.labels)
    return len(records), cut, empty


def rows(examples: list[Example], batch_size: int, max_length: int, packing: bool) -> list[list[Example]]:
    """Examples grouped into rows: one each, or (packing) as many whole examples as fit in
    ``max_length`` tokens, in order."""
    if not packing:
        return [[example] for example in examples]
    packed: list[list[Example]] = []
    used = max_length
    for example in examples:
        if used + len(example.input_ids) > max_length:
            packed.append([])
            used = 0
        packed[-1].append(example)
        used += len(example.input_ids)
    return packed


def collate(row_examples: list[list[Example]], pad_id: int, packing: bool) -> dict[str, Any]:
    """A batch: rows padded to the longest. Packed rows carry ``position_ids`` that restart at
    every example and no attention mask, which is how transformers keeps attention within each
    example (models that build their mask from position ids); ``lowmem_tokens`` counts the real
    tokens of each row."""
    import torch

    width = max(sum(len(e.input_ids) for e in examples) for examples in row_examples)
    shape = (len(row_examples), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.int64)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.int64)
    positions = torch.zeros(shape, dtype=torch.int64)
    real = torch.zeros(shape, dtype=torch.int64)
    for r, examples in enumerate(row_examples):
        at = 0
        for example in examples:
            n = len(example.input_ids)
            input_ids[r, at:at + n] = torch.tensor(example.input_ids)
            labels[r, at:at + n] = torch.tensor(example.labels)
            positions[r, at:at + n] = torch.arange(n)
            real[r, at:at + n] = 1
            at += n
        positions[r, at:] = torch.arange(width - at)  # padding: a sequence of its own
    if packing:
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions,
                "lowmem_tokens": real.sum(1)}
    return {"input_ids": input_ids, "attention_mask": real, "labels": labels}
