"""Held-out evaluation: the loss on the tokens training takes its loss on (padding and, for
prompt/completion and chat data, everything but the completion or assistant turns excluded),
weighted by those tokens, and the metrics of the task: perplexity for language modelling;
accuracy for classification, with F1 and Matthews correlation for two classes; Pearson and
Spearman correlation for regression. A dataset's extra held-out splits (MNLI mismatched) add
their accuracy under a suffix."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from lowmem import metrics
from lowmem.api import CAUSAL_LM, CLASSIFICATION, REGRESSION
from lowmem.data import eval_batches, model_inputs
from lowmem.step import forward_loss

if TYPE_CHECKING:  # pragma: no cover - typing only
    from lowmem.assemble import Run


def evaluate(run: Run) -> dict[str, float | None]:
    splits = run.data.dataset.eval_splits(run.data.source)
    results: dict[str, float | None] = {}
    for split, suffix in splits.items():
        found = evaluate_split(run, split)
        if suffix:  # an extra split reports its accuracy only
            results[f"eval_accuracy{suffix}"] = found.get("eval_accuracy")
        else:
            results.update(found)
    return results


def evaluate_split(run: Run, split: str) -> dict[str, float | None]:
    import torch

    run.train_model.eval()
    total_loss, total_targets = 0.0, 0
    predicted: list[Any] = []
    labels_seen: list[Any] = []
    with torch.no_grad():
        for batch in eval_batches(run.data, run.config.eval_batches, split):
            batch = {k: v.to(run.device) for k, v in batch.items()}
            labels = batch["labels"]
            if run.lean_head is not None:  # --lean-loss (causal LMs): no whole-batch logits here either
                loss = forward_loss(run, batch)
            else:
                with run.autocast():
                    output = run.model(**model_inputs(batch))
                loss = output.loss
            if run.objective == CLASSIFICATION:
                targets = labels.numel()
                logits = output.logits.float()
                predicted += (logits.view(-1) if run.kind == REGRESSION else logits.argmax(-1)).tolist()
                labels_seen += labels.tolist()
            elif run.objective == CAUSAL_LM:  # the model predicts token t+1 from t
                targets = int((labels[:, 1:] != -100).sum())
            else:
                targets = int((labels != -100).sum())
            if targets:
                total_loss += float(loss) * targets
                total_targets += targets
    run.train_model.train()
    if total_targets == 0:  # an empty held-out split measures nothing: say so, never a perfect score
        return {"eval_loss": None, **task_metrics(run, [], [])}
    return {"eval_loss": total_loss / total_targets, **task_metrics(run, predicted, labels_seen),
            **({"eval_perplexity": math.exp(min(total_loss / total_targets, 700.0))}
               if run.objective != CLASSIFICATION else {})}


def task_metrics(run: Run, predicted: list[Any], labels: list[Any]) -> dict[str, float | None]:
    if run.objective != CLASSIFICATION:
        return {"eval_perplexity": None}
    empty = not labels
    if run.kind == REGRESSION:
        return {"eval_pearson": None if empty else metrics.pearson(predicted, labels),
                "eval_spearman": None if empty else metrics.spearman(predicted, labels)}
    found: dict[str, float | None] = {"eval_accuracy": None if empty else metrics.accuracy(predicted, labels)}
    if len(run.label_names) == 2:
        found["eval_f1"] = None if empty else metrics.f1(predicted, labels)
        correlation = None if empty else metrics.matthews_correlation(predicted, labels)
        found["eval_matthews_correlation"] = correlation
    return found
