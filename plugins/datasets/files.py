"""``files``: the user's own data, a file or a folder of .txt, .jsonl/.json, .csv/.tsv or .parquet
files.

* ``.txt``: one document per paragraph (text separated by blank lines), so a single large file
  still shuffles and splits at a useful granularity.
* the other formats: one record per row, in a layout recognised from the columns
  (``layouts.py``: text, prompt/completion, messages, GLUE sentence pairs). A ``label`` column
  of ints or strings makes a classification set (labels map to the index of their value in the
  sorted list of all values), of floats a regression set.
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
from lowmem.api import REGRESSION, TEXT
from lowmem.plugins.datasets import layouts
from lowmem.plugins.datasets.common import select_split, shuffled
from lowmem.text import first_line

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv",
            ".parquet": "parquet"}
EVAL_FILE = re.compile(r"^(eval|valid|validation|test)([-_.].*)?$", re.IGNORECASE)
EVAL_FRACTION = {TEXT: 0.05}  # 10% for the other kinds


@dataclass(frozen=True)
class LoadedFiles:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]] | None  # None: no eval file, split train by hash
    label_names: list[str]
    kind: str  # TEXT, SFT, CHAT, CLASSIFICATION or REGRESSION


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


def read_rows(path: Path, cache_dir: Path | None) -> tuple[str, list[dict[str, Any]]]:
    """(layout, records) of one file, read through ``datasets``; a ConfigError names the file
    and the problem."""
    import datasets

    builder = BUILDERS[path.suffix.lower()]
    options: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    if path.suffix.lower() == ".tsv":
        options["sep"] = "\t"
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
    layout, fields = layouts.detect(list(table.column_names), str(path))
    labelled = "label" in table.column_names and layout in (TEXT, "pair")
    wanted = [*fields, "label"] if labelled else list(fields)
    rows = layouts.records(table.select_columns(wanted).to_list(), layout, fields, str(path))
    if builder == "text":
        # Paragraphs keep the newlines around them; a document is the paragraph itself.
        rows = [{"text": row["text"].strip()} for row in rows]
    return layout, rows


def load_files(source: str, cache_dir: Path | None) -> LoadedFiles:
    train_files, eval_files = data_files(source)
    read = {path: read_rows(path, cache_dir) for path in [*train_files, *eval_files]}
    seen = {layout for layout, _ in read.values()}
    labelled = {path for path, (_, rows) in read.items() if rows and "label" in rows[0]}
    if labelled and labelled != {path for path, (_, rows) in read.items() if rows}:
        unlabelled = sorted(str(p) for p, (_, rows) in read.items() if p not in labelled and rows)
        raise ConfigError(
            f"{source}: some files have a 'label' column and some do not ({', '.join(unlabelled)})"
        )
    if len(seen) > 1 and not (labelled and seen <= {TEXT, "pair"}):
        raise ConfigError(f"{source}: the files mix layouts ({', '.join(sorted(seen))}); use one")
    if "pair" in seen and not labelled:
        raise ConfigError(f"{source}: sentence pairs need a 'label' column")
    kind = next(iter(seen))
    names: list[str] = []
    if labelled:
        values = [row["label"] for _, rows in read.values() for row in rows]
        kind = layouts.label_kind(values, f"{source}")
        ordered = sorted(set(values)) if kind != REGRESSION else []
        index = {value: i for i, value in enumerate(ordered)}
        names = [str(value) for value in ordered]
        for _, rows in read.values():
            for row in rows:
                row["label"] = float(row["label"]) if kind == REGRESSION else index[row["label"]]
    train = [row for path in train_files for row in read[path][1]]
    evals = [row for path in eval_files for row in read[path][1]] if eval_files else None
    if not train:
        raise ConfigError(f"{source}: the training files hold no examples")
    return LoadedFiles(train=train, eval=evals, label_names=names, kind=kind)


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
    description = "local .txt/.jsonl/.json/.csv/.tsv/.parquet files or a folder of them (--dataset PATH)"
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
            rows = select_split(data.train, request.split, EVAL_FRACTION.get(data.kind, 0.10),
                                key=layouts.split_key)
        return (dict(row) for row in shuffled(rows, request.seed, request.epoch))


@lowmem.hookimpl
def register_datasets(register):
    register(Files())
