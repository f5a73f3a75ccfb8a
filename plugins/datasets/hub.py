"""``hub``: a Hugging Face hub dataset, streamed. The source names it:

* ``"allenai/c4"``: the repo (C4 gets its ``en`` config);
* ``"repo:config"``: a config explicitly, e.g. ``"allenai/c4:realnewslike"``;
* ``"glue/sst2"``: a benchmark family and its task, for finetuning.

Text comes from a ``text``/``sentence``/``content`` column; a ``label`` column makes it a
classification set. Shuffling uses a buffer (the whole corpus never fits in memory), reseeded per
epoch through ``set_epoch``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lowmem
from lowmem import ConfigError
from lowmem.text import first_line

SHUFFLE_BUFFER = 10_000
TEXT_COLUMNS = ("text", "sentence", "content", "document")
# Benchmark families whose tasks are configs: "glue/sst2" means repo nyu-mll/glue, config sst2.
FAMILIES = {"glue": "nyu-mll/glue", "super_glue": "aps/super_glue"}
DEFAULT_CONFIGS = {"allenai/c4": "en"}
SPLIT_NAMES = {"train": ("train",), "eval": ("validation", "test")}


@dataclass(frozen=True)
class HubSource:
    repo: str
    config: str | None

    @classmethod
    def parse(cls, source: str | None) -> HubSource:
        if not source:
            raise ConfigError("the hub dataset needs a hub id: pass --dataset ORG/NAME")
        repo, _, config = source.partition(":")
        family, _, task = repo.partition("/")
        if not config and family in FAMILIES and task:
            return cls(FAMILIES[family], task)
        return cls(repo, config or DEFAULT_CONFIGS.get(repo))

    def __str__(self) -> str:
        return self.repo + (f":{self.config}" if self.config else "")


def hub_offline() -> bool:
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def open_split(source: HubSource, split: str) -> Any:
    """The streamed split, or a ConfigError that says why the hub could not provide it."""
    if hub_offline():
        raise ConfigError(
            f"dataset {source} is on the Hugging Face hub, and the hub is switched off here "
            "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); use a local --dataset PATH or a built-in dataset"
        )
    import datasets

    last_error: Exception | None = None
    for name in SPLIT_NAMES[split]:
        try:
            return datasets.load_dataset(source.repo, source.config, split=name, streaming=True)
        except ValueError as exc:  # an unknown split name: try the next candidate
            last_error = exc
        except Exception as exc:  # noqa: BLE001 - network and hub failures become one message
            raise ConfigError(
                f"dataset {source}: could not open it on the Hugging Face hub "
                f"({type(exc).__name__}: {first_line(exc)}); offline? use a local --dataset PATH"
            ) from None
    raise ConfigError(f"dataset {source} has no {'/'.join(SPLIT_NAMES[split])} split ({last_error})")


def text_column(source: HubSource, columns: list[str]) -> str:
    for name in TEXT_COLUMNS:
        if name in columns:
            return name
    raise ConfigError(
        f"dataset {source}: no text column ({', '.join(TEXT_COLUMNS)}); columns: {', '.join(columns)}"
    )


def columns_of(stream: Any) -> list[str]:
    if stream.features is not None:
        return list(stream.features)
    first = next(iter(stream), None)
    return list(first) if first else []


class Hub(lowmem.Dataset):
    name = "hub"
    description = "a Hugging Face hub dataset, streamed (--dataset allenai/c4, glue/sst2, repo:config)"
    kind = "text"

    def kind_of(self, source: str | None) -> str:
        stream = open_split(HubSource.parse(source), "train")
        return lowmem.CLASSIFICATION if "label" in columns_of(stream) else "text"

    def label_names(self, request: lowmem.DataRequest) -> list[str]:
        stream = open_split(HubSource.parse(request.source), "train")
        feature = (stream.features or {}).get("label")
        return list(getattr(feature, "names", None) or [])

    def records(self, request: lowmem.DataRequest) -> Iterator[dict[str, Any]]:
        source = HubSource.parse(request.source)
        stream = open_split(source, request.split)
        columns = columns_of(stream)
        column = text_column(source, columns)
        if request.seed is not None:
            stream = stream.shuffle(seed=request.seed, buffer_size=SHUFFLE_BUFFER)
            stream.set_epoch(request.epoch)
        labelled = "label" in columns
        for row in stream:
            # GLUE's test splits carry label -1 (hidden): not usable for evaluation.
            if labelled and row["label"] is not None and row["label"] >= 0:
                yield {"text": row[column], "label": int(row["label"])}
            elif not labelled:
                yield {"text": row[column]}


@lowmem.hookimpl
def register_datasets(register):
    register(Hub())
