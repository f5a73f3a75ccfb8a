"""``files``: the user's own data, a file or a folder of .txt, .jsonl/.json, .csv or .parquet files.

* ``.txt``: one document per paragraph (text separated by blank lines), so a single large file
  still shuffles and splits at a useful granularity.
* the other formats: one record per row; a ``text`` column is required. A ``label`` column (ints
  or strings) makes the dataset a classification set; labels map to the index of their value in
  the sorted list of all values.
* eval split: in a folder, files named ``eval``/``valid``/``validation``/``test`` (e.g.
  ``validation.csv``, ``test-0.jsonl``); otherwise a fixed 5% of the text records (10% for
  classification), picked by a hash of the text so duplicates never straddle the split.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lowmem
from lowmem import ConfigError
from lowmem.plugins.datasets.common import select_split, shuffled
from lowmem.text import first_line

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
EVAL_FILE = re.compile(r"^(eval|valid|validation|test)([-_.].*)?$", re.IGNORECASE)
EVAL_FRACTION = {"text": 0.05, lowmem.CLASSIFICATION: 0.10}


@dataclass(frozen=True)
class LoadedFiles:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]] | None  # None: no eval file, split train by hash
    label_names: list[str]

    @property
    def kind(self) -> str:
        return lowmem.CLASSIFICATION if self.label_names else "text"


def data_files(source: str) -> tuple[list[Path], list[Path]]:
    """(train files, eval files) of a file or folder, sorted; ConfigError when there are none."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise ConfigError(f"{path}: unsupported file type; use one of {', '.join(sorted(BUILDERS))}")
        return [path], []
    if not path.is_dir():
        raise ConfigError(f"{path}: no such file or folder")
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
    if not found:
        raise ConfigError(f"{path}: no data files ({', '.join(sorted(BUILDERS))}) in this folder")
    evals = [p for p in found if EVAL_FILE.match(p.stem)]
    train = [p for p in found if p not in evals]
    if not train:
        raise ConfigError(f"{path}: only eval files ({', '.join(p.name for p in evals)}); add training data")
    return train, evals


def read_rows(path: Path, cache_dir: Path | None) -> list[dict[str, Any]]:
    """The rows of one file through ``datasets``; a ConfigError names the file and the problem."""
    import datasets

    builder = BUILDERS[path.suffix.lower()]
    options: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # lowmem shows its own progress; a bar per file is noise
    try:
        table = datasets.load_dataset(
            builder,
            data_files=str(path),
            split="train",
            cache_dir=None if cache_dir is None else str(Path(cache_dir) / "hf-datasets"),
            **options,
        )
    except Exception as exc:  # noqa: BLE001 - every parser failure becomes one clear message
        cause = exc.__cause__ or exc
        raise ConfigError(
            f"{path}: cannot read it as {builder} ({type(cause).__name__}: {first_line(cause)})"
        ) from None
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    if "text" not in table.column_names:
        columns = ", ".join(table.column_names) or "none"
        raise ConfigError(f"{path}: no 'text' column (columns: {columns})")
    wanted = ["text", "label"] if "label" in table.column_names else ["text"]
    rows = table.select_columns(wanted).to_list()
    for number, row in enumerate(rows, start=1):
        if not isinstance(row["text"], str):
            raise ConfigError(f"{path}: row {number}: 'text' must be a string, got {row['text']!r}")
        if "label" in row and (row["label"] is None or isinstance(row["label"], float | bool)):
            raise ConfigError(
                f"{path}: row {number}: 'label' must be an int or a string, got {row['label']!r}"
            )
    if builder == "text":
        # Paragraphs keep the newlines around them; a document is the paragraph itself.
        rows = [{"text": row["text"].strip()} for row in rows]
    return [row for row in rows if row["text"].strip()]


def load_files(source: str, cache_dir: Path | None) -> LoadedFiles:
    train_files, eval_files = data_files(source)
    by_file = {path: read_rows(path, cache_dir) for path in [*train_files, *eval_files]}
    labelled = {path for path, rows in by_file.items() if rows and "label" in rows[0]}
    if labelled and labelled != {path for path, rows in by_file.items() if rows}:
        unlabelled = sorted(str(p) for p in by_file if p not in labelled and by_file[p])
        raise ConfigError(
            f"{source}: some files have a 'label' column and some do not ({', '.join(unlabelled)})"
        )
    names: list[str] = []
    if labelled:
        values = {row["label"] for rows in by_file.values() for row in rows}
        if len({type(v) for v in values}) > 1:
            raise ConfigError(f"{source}: 'label' mixes numbers and strings")
        ordered = sorted(values)
        index = {value: i for i, value in enumerate(ordered)}
        names = [str(value) for value in ordered]
        for rows in by_file.values():
            for row in rows:
                row["label"] = index[row["label"]]
    train = [row for path in train_files for row in by_file[path]]
    evals = [row for path in eval_files for row in by_file[path]] if eval_files else None
    if not train:
        raise ConfigError(f"{source}: the training files hold no text")
    return LoadedFiles(train=train, eval=evals, label_names=names)


_loaded: dict[str, tuple[Any, LoadedFiles]] = {}


def loaded(source: str | None, cache_dir: Path | None) -> LoadedFiles:
    """The files of ``source``, read once per process unless they change."""
    if not source:
        raise ConfigError("the files dataset needs a path: pass --dataset PATH")
    key = str(Path(source).expanduser().resolve())
    stamp = _stamp(source)
    if key not in _loaded or _loaded[key][0] != stamp:
        _loaded[key] = (stamp, load_files(source, cache_dir))
    return _loaded[key][1]


def _stamp(source: str) -> tuple[tuple[str, float, int], ...]:
    train, evals = data_files(source)
    return tuple((str(p), p.stat().st_mtime, p.stat().st_size) for p in [*train, *evals])


class Files(lowmem.Dataset):
    name = "files"
    description = "local .txt/.jsonl/.csv/.parquet files or a folder of them (--dataset PATH)"
    kind = "text"

    def kind_of(self, source: str | None) -> str:
        return loaded(source, None).kind

    def label_names(self, request: lowmem.DataRequest) -> list[str]:
        return list(loaded(request.source, request.cache_dir).label_names)

    def records(self, request: lowmem.DataRequest) -> Iterator[dict[str, Any]]:
        data = loaded(request.source, request.cache_dir)
        if data.eval is not None:
            rows = data.train if request.split == "train" else data.eval
        else:
            rows = select_split(
                data.train, request.split, EVAL_FRACTION[data.kind], key=lambda row: row["text"]
            )
        return (dict(row) for row in shuffled(rows, request.seed, request.epoch))


@lowmem.hookimpl
def register_datasets(register):
    register(Files())
