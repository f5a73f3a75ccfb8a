"""Helpers the built-in datasets share: stable train/eval splits, seeded shuffles, JSONL caches.

Standard library only, so registering the datasets stays cheap.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone: Python's ``hash`` is salted per process."""
    import hashlib  # ~7 ms (OpenSSL start-up): not at registration time

    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_eval_split(key: str, eval_fraction: float) -> bool:
    return stable_fraction(key) < eval_fraction


def select_split(items: Iterable[T], split: str, eval_fraction: float, key: Callable[[T], str]) -> list[T]:
    """The items of ``split`` ("train" or "eval"), decided per item so the split never depends on
    the order or the number of the other items."""
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'eval'")
    want_eval = split == "eval"
    return [item for item in items if in_eval_split(key(item), eval_fraction) == want_eval]


def shuffled(items: Sequence[T], seed: int | None, epoch: int) -> list[T]:
    """``items`` in an order fixed by (seed, epoch); ``seed=None`` keeps the source order."""
    result = list(items)
    if seed is not None:
        # A string seed is hashed with SHA-512 by ``random``: identical on every platform and run.
        random.Random(f"lowmem:{seed}:{epoch}").shuffle(result)
    return result


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl_atomically(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write to a temporary file in the same folder, then rename: two processes building the same
    cache at once both succeed, and a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    import tempfile

    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def cached_rows(path: Path | None, build: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows read from the JSONL cache at ``path``, built (and cached when ``path`` is set) if absent."""
    if path is not None and path.is_file():
        try:
            return read_jsonl(path)
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt below
    rows = build()
    if path is not None:
        write_jsonl_atomically(path, rows)
    return rows


_rows_in_process: dict[tuple[str, Path | None], list[dict[str, Any]]] = {}


def built_once(name: str, cache_dir: Path | None,
               build: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The rows of an embedded dataset: built once per Python version into a JSONL file under
    ``cache_dir`` and kept in memory for the rest of the process."""
    path = None if cache_dir is None else Path(cache_dir) / "datasets" / f"{name}.jsonl"
    if (name, path) not in _rows_in_process:
        _rows_in_process[(name, path)] = cached_rows(path, build)
    return _rows_in_process[(name, path)]


def text_records(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Only the public fields of cached rows (caches may keep provenance alongside)."""
    for row in rows:
        record = {"text": row["text"]}
        if "label" in row:
            record["label"] = row["label"]
        yield record
