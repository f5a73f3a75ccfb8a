"""The GLUE metrics, from predictions and labels (plain Python: a few thousand examples)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def accuracy(predicted: Sequence[int], labels: Sequence[int]) -> float:
    return sum(p == y for p, y in zip(predicted, labels, strict=True)) / max(len(labels), 1)


def f1(predicted: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class (MRPC, QQP: label 1, "equivalent" / "duplicate")."""
    tp = sum(p == positive and y == positive for p, y in zip(predicted, labels, strict=True))
    fp = sum(p == positive and y != positive for p, y in zip(predicted, labels, strict=True))
    fn = sum(p != positive and y == positive for p, y in zip(predicted, labels, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews_correlation(predicted: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation of two binary sequences (CoLA's metric); 0 when undefined."""
    pairs = list(zip(predicted, labels, strict=True))
    tp = sum(p == 1 and y == 1 for p, y in pairs)
    tn = sum(p == 0 and y == 0 for p, y in pairs)
    fp = sum(p == 1 and y == 0 for p, y in pairs)
    fn = sum(p == 0 and y == 1 for p, y in pairs)
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; 0 when either side is constant."""
    n = len(x)
    if n < 2:
        return 0.0
    mean_x, mean_y = sum(x) / n, sum(y) / n
    cov = sum((a - mean_x) * (b - mean_y) for a, b in zip(x, y, strict=True))
    var_x = sum((a - mean_x) ** 2 for a in x)
    var_y = sum((b - mean_y) ** 2 for b in y)
    return cov / math.sqrt(var_x * var_y) if var_x and var_y else 0.0


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's on the ranks."""
    return pearson(ranks(x), ranks(y))
