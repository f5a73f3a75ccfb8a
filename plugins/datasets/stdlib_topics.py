"""``stdlib-topics``: an offline classification set. Each record is one standard-library docstring,
labelled with the area of the library it documents (GUI, asyncio, email, ...).

The areas are far apart in vocabulary, so the task is learnable well above chance, and every class
gets the same number of examples (the majority-class rate is 1 / number of classes). 10% of the
examples, picked by a hash, form the eval split.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lowmem
from lowmem.plugins.datasets.common import built_once, select_split, shuffled, stable_fraction, text_records
from lowmem.plugins.datasets.stdlib_docs import PYTHON_TAG, all_docstrings

# Part of the cache file name: bump it when the extraction changes, so old caches are ignored.
FORMAT_VERSION = 2
EVAL_FRACTION = 0.10
MIN_CHARS = 40  # shorter docstrings ("Return self.") carry no topic
MAX_PER_CLASS = 200
# Class name -> top-level stdlib packages documenting it. Order fixes the label index.
AREAS: dict[str, tuple[str, ...]] = {
    "gui": ("tkinter", "turtle"),
    "asyncio": ("asyncio",),
    "email": ("email", "mailbox"),
    "xml": ("xml", "xmlrpc"),
    "testing": ("unittest", "doctest"),
    "logging": ("logging",),
    "web": ("http", "urllib", "wsgiref"),
}
AREA_OF_PACKAGE = {package: area for area, packages in AREAS.items() for package in packages}
LABEL_NAMES = list(AREAS)


def example_key(row: dict[str, Any]) -> str:
    # The text alone: a docstring repeated by several overriding methods stays in one split.
    return row["text"]


def build_examples() -> list[dict[str, Any]]:
    """Balanced rows of ``{"name", "text", "label"}``: each class keeps the same number of distinct
    docstrings, chosen by a hash so the choice does not depend on file order. A text found in two
    areas is ambiguous and left out."""
    areas_of_text: dict[str, set[str]] = {}
    first_name: dict[str, str] = {}
    for doc in all_docstrings():
        area = AREA_OF_PACKAGE.get(doc.module.split(".")[0])
        if area is not None and len(doc.text) >= MIN_CHARS:
            areas_of_text.setdefault(doc.text, set()).add(area)
            first_name.setdefault(doc.text, f"{doc.module}:{doc.qualname}")
    candidates: dict[str, list[dict[str, Any]]] = {area: [] for area in AREAS}
    for text, areas in areas_of_text.items():
        if len(areas) == 1:
            (area,) = areas
            candidates[area].append(
                {"name": first_name[text], "text": text, "label": LABEL_NAMES.index(area)}
            )
    per_class = min(MAX_PER_CLASS, *(len(rows) for rows in candidates.values()))
    examples = []
    for rows in candidates.values():
        # Salted unlike the split key: the rows kept must not be biased towards the eval split.
        rows.sort(key=lambda row: stable_fraction("keep\0" + example_key(row)))
        examples.extend(rows[:per_class])
    # Classes interleaved in a fixed order: the first few eval batches already cover every class.
    examples.sort(key=lambda row: stable_fraction("order\0" + example_key(row)))
    return examples


def examples(cache_dir: Path | None) -> list[dict[str, Any]]:
    return built_once(f"stdlib-topics-v{FORMAT_VERSION}-{PYTHON_TAG}", cache_dir, build_examples)


class StdlibTopics(lowmem.Dataset):
    name = "stdlib-topics"
    default_for = ("finetuning",)
    description = f"stdlib docstrings labelled by library area ({len(AREAS)} balanced classes, offline)"
    kind = lowmem.CLASSIFICATION

    def label_names(self, request: lowmem.DataRequest) -> list[str]:
        return list(LABEL_NAMES)

    def records(self, request: lowmem.DataRequest) -> Iterator[dict[str, Any]]:
        rows = select_split(examples(request.cache_dir), request.split, EVAL_FRACTION, key=example_key)
        return text_records(shuffled(rows, request.seed, request.epoch))


@lowmem.hookimpl
def register_datasets(register):
    register(StdlibTopics())
