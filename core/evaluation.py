"""Held-out evaluation: loss weighted by real target tokens (padding excluded), with perplexity
for language modelling and accuracy for classification."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lowmem.api import CAUSAL_LM, CLASSIFICATION
from lowmem.data import eval_batches

if TYPE_CHECKING:  # pragma: no cover - typing only
    from lowmem.assemble import Run


def evaluate(run: Run) -> dict[str, float | None]:
    import torch

    run.train_model.eval()
    total_loss, total_targets, correct, examples = 0.0, 0, 0, 0
    with torch.no_grad():
        for batch in eval_batches(run.data, run.config.eval_batches):
            batch = {k: v.to(run.device) for k, v in batch.items()}
            with run.autocast():
                output = run.model(**batch)
            labels = batch["labels"]
            if run.objective == CLASSIFICATION:
                targets = labels.numel()
                correct += int((output.logits.argmax(-1) == labels).sum())
                examples += targets
            elif run.objective == CAUSAL_LM:  # the model predicts token t+1 from t
                targets = int((labels[:, 1:] != -100).sum())
            else:
                targets = int((labels != -100).sum())
            if targets:
                total_loss += float(output.loss) * targets
                total_targets += targets
    run.train_model.train()
    metric = "eval_accuracy" if run.objective == CLASSIFICATION else "eval_perplexity"
    if total_targets == 0:  # an empty held-out split measures nothing: say so, never a perfect score
        return {"eval_loss": None, metric: None}
    eval_loss = total_loss / total_targets
    if run.objective == CLASSIFICATION:
        return {"eval_loss": eval_loss, "eval_accuracy": correct / max(examples, 1)}
    return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 700.0))}
