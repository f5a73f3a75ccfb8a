"""Datasets and the batching pipeline: splits, shuffling, packing, masking, resume, local files."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import replace
from itertools import islice
from pathlib import Path

import pytest

import lowmem
from lowmem.data import DataSpec, count_tokens, dataset_kind, eval_batches, label_names, train_batches

CACHE = Path(os.environ["LOWMEM_CACHE_DIR"])
PARAGRAPHS = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(60)]


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text")
    (folder / "book.txt").write_text("\n\n".join(PARAGRAPHS) + "\n")
    return folder


def spec_for(registry, tokenizer, dataset="stdlib-docs", source=None, objective=lowmem.CAUSAL_LM, **changes):
    base = DataSpec(
        dataset=registry.dataset(dataset), source=source, objective=objective, tokenizer=tokenizer,
        max_length=32, batch_size=4, seed=7, shuffle=True, cache_dir=CACHE,
    )
    return replace(base, **changes)


def records(registry, name, split, source=None, seed=None, epoch=0):
    request = lowmem.DataRequest(split, seed=seed, epoch=epoch, source=source, cache_dir=CACHE)
    return list(registry.dataset(name).records(request))


def same_batches(a, b) -> bool:
    import torch

    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


# -- the built-in datasets ---------------------------------------------------------------------------
def test_stdlib_docs_is_about_two_megabytes_with_a_disjoint_deterministic_eval_split(registry):
    train, evals = records(registry, "stdlib-docs", "train"), records(registry, "stdlib-docs", "eval")
    chars = sum(len(r["text"]) for r in train + evals)
    assert 1_500_000 < chars < 4_000_000
    assert 0.02 < len(evals) / (len(train) + len(evals)) < 0.10
    assert not {r["text"] for r in train} & {r["text"] for r in evals}
    assert records(registry, "stdlib-docs", "eval") == evals
    assert list((CACHE / "datasets").glob("stdlib-docs-*py*.jsonl"))


def test_records_shuffle_by_seed_and_epoch(registry):
    plain = records(registry, "stdlib-docs", "train")
    first = records(registry, "stdlib-docs", "train", seed=3, epoch=0)
    assert first == records(registry, "stdlib-docs", "train", seed=3, epoch=0)
    assert first != plain and sorted(map(str, first)) == sorted(map(str, plain))
    assert first != records(registry, "stdlib-docs", "train", seed=3, epoch=1)


def test_stdlib_topics_has_several_balanced_learnable_classes(registry):
    names = registry.dataset("stdlib-topics").label_names(lowmem.DataRequest("train"))
    train, evals = records(registry, "stdlib-topics", "train"), records(registry, "stdlib-topics", "eval")
    assert len(names) >= 4
    for split in (train, evals):
        counts = Counter(r["label"] for r in split)
        assert set(counts) == set(range(len(names)))
        assert max(counts.values()) / len(split) < 0.3  # majority-class rate: 1/7 by construction
    assert 0.05 < len(evals) / (len(train) + len(evals)) < 0.15
    assert len({r["label"] for r in evals[:16]}) >= 4  # a short eval already sees most classes
    assert not {r["text"] for r in train} & {r["text"] for r in evals}


# -- packing and batches -----------------------------------------------------------------------------
def test_packing_concatenates_documents_with_eos_and_pads_only_the_last_block(
    registry, tokenizer, text_folder
):
    import torch

    spec = spec_for(registry, tokenizer, "files", str(text_folder), shuffle=False)
    batches = list(train_batches(spec, epoch=0))
    stream = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches]).tolist()
    expected = []
    for record in records(registry, "files", "train", source=str(text_folder)):
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        expected += ids + [tokenizer.eos_token_id]
    assert stream == expected
    assert all(b["input_ids"].shape[1] == 32 for b in batches)
    assert all(b["attention_mask"].all() for b in batches[:-1])
    last = batches[-1]
    assert not last["attention_mask"].all()
    assert (last["labels"][last["attention_mask"] == 0] == -100).all()
    assert torch.equal(last["labels"][last["attention_mask"] == 1],
                       last["input_ids"][last["attention_mask"] == 1])
    assert all(b[k].dtype == torch.int64 for b in batches for k in b)
    assert sum(count_tokens(b) for b in batches) == len(expected)


def test_masked_lm_masks_fifteen_percent_reproducibly(registry, tokenizer):
    spec = spec_for(registry, tokenizer, objective=lowmem.MASKED_LM, max_length=64, batch_size=8)
    first = list(islice(train_batches(spec, epoch=0, skip=0), 3))
    again = list(islice(train_batches(spec, epoch=0), 3))
    assert same_batches(first, again)
    targets = sum(int((b["labels"] != -100).sum()) for b in first)
    real = sum(count_tokens(b) for b in first)
    assert 0.10 < targets / real < 0.20
    masked = sum(int((b["input_ids"][b["labels"] != -100] == tokenizer.mask_token_id).sum()) for b in first)
    assert 0.65 < masked / targets < 0.95
    assert not same_batches(first, list(islice(train_batches(spec, epoch=1), 3)))


def test_classification_batches_pad_per_batch_and_carry_class_labels(registry, tokenizer):
    spec = spec_for(registry, tokenizer, "stdlib-topics", objective=lowmem.CLASSIFICATION, max_length=48)
    assert dataset_kind(spec) == lowmem.CLASSIFICATION and label_names(spec)[0] == "gui"
    batch = next(iter(train_batches(spec, epoch=0)))
    assert batch["labels"].shape == (4,) and batch["input_ids"].shape[1] <= 48
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    assert int(batch["labels"].max()) < len(label_names(spec))


@pytest.mark.parametrize(
    ("dataset", "objective"),
    [("stdlib-docs", lowmem.CAUSAL_LM), ("stdlib-docs", lowmem.MASKED_LM),
     ("stdlib-topics", lowmem.CLASSIFICATION)],
)
def test_resume_skip_gives_exactly_the_remaining_batches(registry, tokenizer, dataset, objective):
    spec = spec_for(registry, tokenizer, dataset, objective=objective, batch_size=32, max_length=128)
    full = list(train_batches(spec, epoch=2))
    assert len(full) > 5
    assert same_batches(list(train_batches(spec, epoch=2, skip=5)), full[5:])
    assert same_batches(list(train_batches(spec, epoch=2)), full)  # deterministic across calls
    assert not same_batches(list(train_batches(spec, epoch=3))[:5], full[:5])
    assert list(train_batches(spec, epoch=2, skip=len(full) + 3)) == []


def test_ranks_split_global_batches_round_robin(registry, tokenizer):
    spec = spec_for(registry, tokenizer, batch_size=16, max_length=64)
    full = list(train_batches(spec, epoch=0))
    rank0 = list(train_batches(replace(spec, rank=0, world_size=2), epoch=0))
    rank1 = list(train_batches(replace(spec, rank=1, world_size=2), epoch=0))
    rounds = len(full) // 2
    assert len(rank0) == len(rank1) == rounds  # an incomplete last round is dropped on all ranks
    assert same_batches(rank0, full[0 : 2 * rounds : 2]) and same_batches(rank1, full[1 : 2 * rounds : 2])
    resumed = list(train_batches(replace(spec, rank=1, world_size=2), epoch=0, skip=4))
    assert same_batches(resumed, rank1[2:])


def test_eval_batches_are_unshuffled_and_identical_every_call(registry, tokenizer):
    spec = spec_for(registry, tokenizer, objective=lowmem.MASKED_LM)
    first = eval_batches(spec, limit=3)
    assert len(first) == 3 and same_batches(first, eval_batches(spec, limit=3))
    assert same_batches(first, eval_batches(replace(spec, shuffle=False), limit=3))  # never shuffled
    assert len(eval_batches(spec, limit=10_000)) < 10_000  # the whole eval split, then it stops


# -- local files ------------------------------------------------------------------------------------
def write_formats(folder: Path) -> dict[str, Path]:
    import pandas as pd

    rows = [{"text": f"document number {i} about {'cats' if i % 2 else 'dogs'}"} for i in range(40)]
    paths = {"jsonl": folder / "data.jsonl", "csv": folder / "data.csv", "parquet": folder / "data.parquet"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_csv(paths["csv"], index=False)
    pd.DataFrame(rows).to_parquet(paths["parquet"])
    return paths


def test_each_local_format_loads_as_a_text_dataset(registry, tmp_path, text_folder):
    files = registry.dataset("files")
    for path in [*write_formats(tmp_path).values(), text_folder / "book.txt"]:
        assert files.kind_of(str(path)) == "text"
        texts = [r["text"] for split in ("train", "eval")
                 for r in records(registry, "files", split, str(path))]
        assert len(texts) in (40, 60), path
    txt = [r["text"] for s in ("train", "eval") for r in records(registry, "files", s, str(text_folder))]
    assert sorted(txt) == sorted(PARAGRAPHS)  # .txt: one document per blank-line-separated paragraph


def test_a_labelled_csv_is_a_classification_dataset_with_sorted_string_labels(registry, tmp_path):
    import pandas as pd

    rows = [{"text": f"review {i}: {'great' if i % 3 else 'awful'} film", "label": "pos" if i % 3 else "neg"}
            for i in range(50)]
    pd.DataFrame(rows).to_csv(tmp_path / "reviews.csv", index=False)
    source = str(tmp_path / "reviews.csv")
    dataset = registry.dataset("files")
    assert dataset.kind_of(source) == lowmem.CLASSIFICATION
    assert dataset.label_names(lowmem.DataRequest("train", source=source)) == ["neg", "pos"]
    labelled = records(registry, "files", "train", source) + records(registry, "files", "eval", source)
    assert all(r["label"] == (1 if "great" in r["text"] else 0) for r in labelled) and len(labelled) == 50


def test_a_folder_uses_its_validation_file_as_the_eval_split(registry, tmp_path):
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"train {i}"}) + "\n" for i in range(30)))
    (tmp_path / "validation.jsonl").write_text(
        "".join(json.dumps({"text": f"held out {i}"}) + "\n" for i in range(5)))
    assert len(records(registry, "files", "train", str(tmp_path))) == 30
    assert [r["text"] for r in records(registry, "files", "eval", str(tmp_path))] == [
        f"held out {i}" for i in range(5)]


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("notext.csv", "body,label\nhello,1\n", "no 'text' column"),
        ("broken.jsonl", '{"text": "fine"}\n{"text": \n', "cannot read it as json"),
        ("data.xlsx", "whatever", "unsupported file type"),
    ],
)
def test_bad_files_are_config_errors_naming_the_file(registry, tmp_path, name, content, problem):
    (tmp_path / name).write_text(content)
    with pytest.raises(lowmem.ConfigError, match=problem) as failure:
        records(registry, "files", "train", str(tmp_path / name))
    assert name in str(failure.value)


def test_hub_datasets_fail_fast_and_clearly_offline(registry):
    from lowmem.plugins.datasets.hub import HubSource

    assert HubSource.parse("allenai/c4") == HubSource("allenai/c4", "en")
    assert HubSource.parse("glue/sst2") == HubSource("nyu-mll/glue", "sst2")
    assert HubSource.parse("org/data:cfg") == HubSource("org/data", "cfg")
    with pytest.raises(lowmem.ConfigError, match="hub is switched off"):
        records(registry, "hub", "train", "allenai/c4")
