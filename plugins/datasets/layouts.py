"""The record layouts lowmem trains on, recognised from a table's columns and checked row by row.

* ``messages``: chat, a list of ``{"role", "content"}`` (system, user, assistant);
* ``prompt`` + ``completion``: supervised finetuning;
* ``text`` or ``sentence``, or a GLUE sentence pair (``sentence1``/``sentence2``,
  ``question``/``sentence``, ``question1``/``question2``, ``premise``/``hypothesis``), with an
  optional ``label``: integer or string labels make a classification set, float labels a
  regression set; without a label, ``text`` is language modelling.

Every problem is a ``ConfigError`` naming the file, the row or column, and what was expected.
"""

from __future__ import annotations

import json
from typing import Any

import lowmem
from lowmem.api import CHAT, REGRESSION, SFT, TEXT

PAIRS = (("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"),
         ("premise", "hypothesis"))
SINGLE = ("text", "sentence")
ROLES = ("system", "user", "assistant")
EXPECTED = ("expected 'text', 'prompt' + 'completion', 'messages', or a sentence pair "
            "(sentence1/sentence2, question/sentence, question1/question2, premise/hypothesis)")


def detect(columns: list[str], where: str) -> tuple[str, tuple[str, ...]]:
    """(layout, the columns it reads) from a table's column names."""
    if "messages" in columns:
        return CHAT, ("messages",)
    if "prompt" in columns or "completion" in columns:
        missing = [c for c in ("prompt", "completion") if c not in columns]
        if missing:
            raise lowmem.ConfigError(f"{where}: column {missing[0]!r} is missing: rows with a prompt need "
                                     "a completion (and the other way round)")
        return SFT, ("prompt", "completion")
    for pair in PAIRS:
        if all(c in columns for c in pair):
            return "pair", pair
    for column in SINGLE:
        if column in columns:
            return TEXT, (column,)
    found = ", ".join(columns) or "none"
    raise lowmem.ConfigError(f"{where}: no 'text' column (columns: {found}); {EXPECTED}")


def records(rows: list[dict[str, Any]], layout: str, fields: tuple[str, ...],
            where: str) -> list[dict[str, Any]]:
    """Rows as lowmem records (``text``/``text_pair``/``label``, ``prompt``/``completion`` or
    ``messages``), checked; empty texts are dropped, empty completions are errors."""
    out = []
    for number, row in enumerate(rows, start=1):
        here = f"{where}: row {number}"
        if layout == CHAT:
            out.append({"messages": check_messages(row["messages"], here)})
        elif layout == SFT:
            prompt, completion = row["prompt"], row["completion"]
            for name, value in (("prompt", prompt), ("completion", completion)):
                if not isinstance(value, str):
                    raise lowmem.ConfigError(f"{here}: {name!r} must be a string, got {value!r}")
            if not completion.strip():
                raise lowmem.ConfigError(f"{here}: 'completion' is empty: there is nothing to learn")
            out.append({"prompt": prompt, "completion": completion})
        else:
            record = {"text": row[fields[0]]}
            if layout == "pair":
                record["text_pair"] = row[fields[1]]
            for name, value in record.items():
                if not isinstance(value, str):
                    raise lowmem.ConfigError(f"{here}: {name!r} must be a string, got {value!r}")
            if "label" in row:
                record["label"] = row["label"]
            if record["text"].strip():
                out.append(record)
    return out


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if isinstance(messages, str):  # a CSV cell holding JSON
        try:
            messages = json.loads(messages)
        except ValueError:
            raise lowmem.ConfigError(f"{where}: 'messages' is not a list of messages") from None
    if not isinstance(messages, list) or not messages:
        raise lowmem.ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    checked = []
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise lowmem.ConfigError(
                f"{where}: each message needs a 'role' and a string 'content', got {turn!r}")
        if turn.get("role") not in ROLES:
            raise lowmem.ConfigError(f"{where}: unknown role {turn.get('role')!r}; expected one of "
                                     f"{', '.join(ROLES)}")
        if turn["role"] == "assistant" and not turn["content"].strip():
            raise lowmem.ConfigError(f"{where}: an assistant turn is empty: there is nothing to learn")
        checked.append({"role": turn["role"], "content": turn["content"]})
    if not any(turn["role"] == "assistant" for turn in checked):
        raise lowmem.ConfigError(f"{where}: no assistant turn: the loss is taken on assistant turns only")
    return checked


def label_kind(values: list[Any], where: str) -> str:
    """CLASSIFICATION for ints or strings, REGRESSION for floats; mixing ints and strings, or
    booleans and missing labels, is an error."""
    kinds = set()
    for value in values:
        if value is None or isinstance(value, bool):
            raise lowmem.ConfigError(f"{where}: column 'label' has {value!r}; labels must be ints, strings "
                                     "or floats")
        kinds.add("str" if isinstance(value, str) else "float" if isinstance(value, float) else "int")
    if "str" in kinds and len(kinds) > 1:
        raise lowmem.ConfigError(f"{where}: column 'label' mixes numbers and strings; use one type")
    return REGRESSION if "float" in kinds else lowmem.CLASSIFICATION


def split_key(record: dict[str, Any]) -> str:
    """What decides a record's train/eval split: its content, so duplicates never straddle it."""
    if "messages" in record:
        return json.dumps(record["messages"], sort_keys=True)
    if "prompt" in record:
        return record["prompt"] + "\x00" + record["completion"]
    return record["text"] + "\x00" + record.get("text_pair", "")
