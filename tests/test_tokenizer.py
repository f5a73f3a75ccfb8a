"""Tokenizer choice and the offline BPE fallback: exact vocabulary, special tokens, caching."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from tiny_plugin import TINY_VOCAB

import lowmem
from lowmem import tokenizer as tokenizer_module
from lowmem.tokenizer import (
    bpe_cache_folder,
    ensure_special_tokens,
    load_tokenizer,
    save_atomically,
    train_bpe,
)

SAMPLE = "Return a new list containing all items from the iterable in ascending order."


@pytest.fixture(scope="module")
def cache_dir() -> Path:
    # The session cache conftest set up: the corpus and tokenizers are built once for all tests.
    return Path(os.environ["LOWMEM_CACHE_DIR"])


def fallback(registry, cache_dir, model="tiny-llama", messages=None, **options):
    return load_tokenizer(
        tokenizer=options.get("tokenizer"),
        model_path=options.get("model_path"),
        model_plugin=registry.model(model),
        cache_dir=cache_dir,
        registry=registry,
        say=(messages.append if messages is not None else lambda message: None),
    )


def test_offline_fallback_is_a_bpe_of_the_model_vocab_size_with_special_tokens(registry, cache_dir):
    messages: list[str] = []
    tok = fallback(registry, cache_dir, messages=messages)
    assert len(tok) == TINY_VOCAB
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>" and tok.mask_token == "<mask>"
    assert tok.pad_token_id == 1  # RoBERTa's pad id: its position ids start after it
    assert any("t5-base" in m and "byte-level BPE" in m for m in messages)
    assert tok.decode(tok(SAMPLE, add_special_tokens=False)["input_ids"]) == SAMPLE
    folder = bpe_cache_folder(cache_dir, TINY_VOCAB)
    assert folder.name == f"bpe-{TINY_VOCAB}-py{sys.version_info.major}.{sys.version_info.minor}"
    assert (folder / "tokenizer.json").is_file()


def test_second_load_comes_from_the_cache_with_the_same_ids(registry, cache_dir, monkeypatch):
    first = fallback(registry, cache_dir)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded, not retrained")

    monkeypatch.setattr(tokenizer_module, "train_bpe", no_training)
    second = fallback(registry, cache_dir)
    assert second(SAMPLE)["input_ids"] == first(SAMPLE)["input_ids"]
    assert len(second) == len(first)


def test_paper_vocab_of_32000_is_reached_on_the_embedded_corpus(registry, cache_dir):
    request = lowmem.DataRequest("train", cache_dir=cache_dir)
    texts = [r["text"] for r in registry.dataset("stdlib-docs").records(request)]
    tok = train_bpe(texts, 32000)
    assert len(tok) == 32000
    # Most of it is learned merges; the rest (when the corpus runs out of merges) reserved tokens.
    reserved = [t for t in tok.get_vocab() if t.startswith("<reserved_")]
    assert len(reserved) < 8000
    assert len(tok(SAMPLE, add_special_tokens=False)["input_ids"]) < len(SAMPLE.split()) * 2


def test_explicit_tokenizer_folder_and_model_path_folder_are_used(registry, cache_dir, tmp_path):
    base = fallback(registry, cache_dir)
    base.save_pretrained(tmp_path / "tok")
    explicit = fallback(registry, cache_dir, tokenizer=str(tmp_path / "tok"))
    from_model = fallback(registry, cache_dir, model_path=str(tmp_path / "tok"))
    assert explicit(SAMPLE)["input_ids"] == base(SAMPLE)["input_ids"] == from_model(SAMPLE)["input_ids"]


def test_a_folder_without_tokenizer_files_is_a_config_error(registry, cache_dir, tmp_path):
    with pytest.raises(lowmem.ConfigError, match="no tokenizer files"):
        fallback(registry, cache_dir, tokenizer=str(tmp_path))


def test_a_tokenizer_without_pad_pads_with_eos_and_gets_a_mask_for_masked_lm(registry, cache_dir):
    from transformers import PreTrainedTokenizerFast

    base = fallback(registry, cache_dir)
    bare = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token="</s>")
    assert bare.pad_token is None and bare.mask_token is None
    ensured = ensure_special_tokens(bare, needs_mask=True)
    assert ensured.pad_token == "</s>" and ensured.mask_token is not None


def test_masked_lm_models_always_get_a_mask_token(registry, cache_dir):
    tok = fallback(registry, cache_dir, model="tiny-roberta")
    assert tok.mask_token_id is not None and tok.pad_token_id is not None


def test_saving_into_an_existing_cache_folder_keeps_it_intact(registry, cache_dir, tmp_path):
    tok = fallback(registry, cache_dir)
    target = tmp_path / "bpe"
    save_atomically(tok, target)
    save_atomically(tok, target)  # a second process finishing later must not fail or corrupt it
    assert (target / "tokenizer.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["bpe"]


def test_a_model_path_hub_id_brings_its_own_tokenizer_or_a_clear_error_offline(registry, cache_dir):
    # Weights and tokenizer must match: no silent fallback to the BPE for a named checkpoint.
    with pytest.raises(lowmem.ConfigError, match="--model-path someone/missing-model"):
        fallback(registry, cache_dir, model_path="someone/missing-model")
