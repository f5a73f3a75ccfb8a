"""``stdlib-docs``: about 2 MB of technical English that ships with every CPython, so pretraining
works offline: the interactive help topics plus the standard library's docstrings.

One document per help topic and one per module (its docstrings in source order). The corpus is
built once per Python version and cached as JSONL; 5% of the documents, picked by a hash of the
document's name, form the eval split.
"""

from __future__ import annotations

import ast
import functools
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lowmem
from lowmem.plugins.datasets.common import built_once, select_split, shuffled, text_records

# Part of the cache file name: bump it when the extraction changes, so old caches are ignored.
FORMAT_VERSION = 1
EVAL_FRACTION = 0.05
# Folders whose files are test data, GUI demos or third-party code rather than library docs.
SKIPPED_FOLDERS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"})
PYTHON_TAG = f"py{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True)
class Docstring:
    module: str  # dotted module name, e.g. "email.mime.text"
    qualname: str  # "" for the module docstring, else "Class" or "Class.method"
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path | None = None) -> list[tuple[str, Path]]:
    """(module name, file) for the standard library's .py files, sorted for determinism."""
    root = root or stdlib_root()
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if SKIPPED_FOLDERS.intersection(relative.parts[:-1]):
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts and all(part.isidentifier() for part in parts):
            found.append((".".join(parts), path))
    return found


def module_docstrings(module: str, path: Path) -> Iterator[Docstring]:
    """The docstrings of one file, module first, then classes and functions in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return  # a few stdlib files are deliberately unparsable samples
    text = ast.get_docstring(tree)
    if text:
        yield Docstring(module, "", text)
    yield from _nested_docstrings(module, tree.body, prefix="")


def _nested_docstrings(module: str, body: Iterable[ast.stmt], prefix: str) -> Iterator[Docstring]:
    for node in body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            qualname = prefix + node.name
            text = ast.get_docstring(node)
            if text:
                yield Docstring(module, qualname, text)
            if isinstance(node, ast.ClassDef):
                yield from _nested_docstrings(module, node.body, prefix=qualname + ".")


@functools.lru_cache(maxsize=1)
def all_docstrings() -> tuple[Docstring, ...]:
    """Every docstring of the standard library; parsed once per process (~5 s), as both built-in
    datasets read it."""
    return tuple(doc for module, path in stdlib_sources() for doc in module_docstrings(module, path))


def build_documents() -> list[dict[str, Any]]:
    """Rows of ``{"name", "text"}``: help topics (sorted by name), then modules (sorted by file)."""
    from pydoc_data.topics import topics

    rows = [{"name": f"topic:{name}", "text": topics[name].strip()} for name in sorted(topics)]
    by_module: dict[str, list[str]] = {}
    for doc in all_docstrings():
        by_module.setdefault(doc.module, []).append(doc.text)
    rows.extend(
        {"name": f"module:{module}", "text": "\n\n".join(texts)} for module, texts in by_module.items()
    )
    return [row for row in rows if row["text"]]


def documents(cache_dir: Path | None) -> list[dict[str, Any]]:
    """The whole corpus, from the JSONL cache under ``cache_dir`` when there is one."""
    return built_once(f"stdlib-docs-v{FORMAT_VERSION}-{PYTHON_TAG}", cache_dir, build_documents)


class StdlibDocs(lowmem.Dataset):
    name = "stdlib-docs"
    default_for = ("pretraining",)
    tokenizer_corpus = True  # the offline fallback BPE is trained on this text
    description = "Python's help topics and standard-library docstrings (~2 MB, offline)"
    kind = "text"

    def records(self, request: lowmem.DataRequest) -> Iterator[dict[str, Any]]:
        rows = select_split(
            documents(request.cache_dir), request.split, EVAL_FRACTION, key=lambda row: row["name"]
        )
        return text_records(shuffled(rows, request.seed, request.epoch))


@lowmem.hookimpl
def register_datasets(register):
    register(StdlibDocs())
