"""``glue``: the GLUE benchmark as the GaLore paper finetuned on it (``--dataset glue/mrpc``).

Eight tasks from the Hugging Face hub (``nyu-mll/glue``), read from the local datasets cache when
there, else downloaded when the hub is reachable. Training uses the train split, evaluation the
validation split (MNLI: ``validation_matched``, plus ``validation_mismatched`` reported as
``eval_accuracy_mismatched``); the test splits carry no labels. STS-B is a regression task.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lowmem
from lowmem.api import REGRESSION
from lowmem.plugins.datasets.common import shuffled
from lowmem.text import first_line

REPO = "nyu-mll/glue"
# task -> (text columns, regression?)
TASKS: dict[str, tuple[tuple[str, ...], bool]] = {
    "cola": (("sentence",), False), "sst2": (("sentence",), False),
    "mrpc": (("sentence1", "sentence2"), False), "qqp": (("question1", "question2"), False),
    "stsb": (("sentence1", "sentence2"), True), "mnli": (("premise", "hypothesis"), False),
    "qnli": (("question", "sentence"), False), "rte": (("sentence1", "sentence2"), False),
}
SPLITS = {"train": "train", "eval": "validation"}
MNLI_SPLITS = {"train": "train", "eval": "validation_matched", "eval_mismatched": "validation_mismatched"}


@lowmem.hookimpl
def register_datasets(register):
    register(Glue())


def task_of(source: str | None) -> str:
    task = (source or "").lower()
    if task not in TASKS:
        raise lowmem.ConfigError(f"unknown GLUE task {source!r}; use --dataset glue/TASK with TASK one of "
                                 f"{', '.join(TASKS)}")
    return task


_tables: dict[tuple[str, str], Any] = {}


def table(task: str, split: str) -> Any:
    """One split of one task: from the datasets cache, else the hub; a one-line error otherwise."""
    name = (MNLI_SPLITS if task == "mnli" else SPLITS)[split]
    if (task, name) not in _tables:
        import datasets

        datasets.disable_progress_bars()
        try:
            _tables[(task, name)] = datasets.load_dataset(REPO, task, split=name)
        except Exception as exc:  # noqa: BLE001 - offline, missing cache, hub errors: one line
            download = f"python -c \"import datasets; datasets.load_dataset('{REPO}', '{task}')\""
            raise lowmem.ConfigError(
                f"GLUE task {task} is not in the local datasets cache and could not be downloaded "
                f"({type(exc).__name__}: {first_line(exc)}); run once with network: {download}, or pass "
                "the task's files with --dataset PATH") from None
    return _tables[(task, name)]


class Glue(lowmem.Dataset):
    name = "glue"
    description = "GLUE tasks from the hub cache: --dataset glue/TASK (cola sst2 mrpc qqp stsb mnli qnli rte)"
    kind = lowmem.CLASSIFICATION
    takes_source = True

    def kind_of(self, source: str | None) -> str:
        return REGRESSION if TASKS[task_of(source)][1] else lowmem.CLASSIFICATION

    def label_names(self, request: lowmem.DataRequest) -> list[str]:
        task = task_of(request.source)
        if TASKS[task][1]:
            return []
        feature = table(task, "train").features["label"]
        return list(getattr(feature, "names", None) or [])

    def eval_splits(self, source: str | None) -> dict[str, str]:
        return {"eval": "", "eval_mismatched": "_mismatched"} if task_of(source) == "mnli" else {"eval": ""}

    def records(self, request: lowmem.DataRequest) -> Iterator[dict[str, Any]]:
        task = task_of(request.source)
        columns, regression = TASKS[task]
        rows = []
        for row in table(task, request.split):
            if row["label"] is None or row["label"] < 0:  # unlabelled rows (test splits)
                continue
            label = float(row["label"]) if regression else int(row["label"])
            record = {"text": row[columns[0]], "label": label}
            if len(columns) == 2:
                record["text_pair"] = row[columns[1]]
            rows.append(record)
        return iter(shuffled(rows, request.seed, request.epoch))
