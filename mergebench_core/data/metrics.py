"""Metrics a task pool can declare besides accuracy (`TaskPool.metrics`), computed on a whole test split.

GLUE reports Matthews correlation for CoLA and Spearman correlation for STS-B; text pools declare these as their
tasks' primary metrics, and the runner, the `Norm.` column, the tables and Pareto fronts then use them.
"""

from __future__ import annotations

import torch

from mergebench_core.contract.api import ACCURACY, MetricSpec


def _predictions(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1) if logits.dim() > 1 and logits.shape[-1] > 1 else logits.reshape(-1)


def matthews_corrcoef(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Matthews correlation of the arg-max predictions, in its multi-class form (Gorodkin 2004); 0 when a
    marginal is constant (the convention scikit-learn follows)."""
    pred, true = _predictions(logits).long(), labels.long()
    k = int(max(pred.max(), true.max())) + 1
    confusion = torch.bincount(true * k + pred, minlength=k * k).view(k, k).double()
    n = confusion.sum()
    correct = confusion.trace()
    t, p = confusion.sum(1), confusion.sum(0)
    cov = correct * n - (t * p).sum()
    denom = torch.sqrt((n * n - (p * p).sum()) * (n * n - (t * t).sum()))
    return float(cov / denom) if denom > 0 else 0.0


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks from 1, ties given the mean of the ranks they span."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    unique, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.bincount(inverse, minlength=len(unique)).double()
    return (sums / counts)[inverse]


def spearman(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Spearman rank correlation between a regression output (one logit per example) and the targets."""
    a, b = _ranks(logits.reshape(-1)), _ranks(labels.reshape(-1))
    a, b = a - a.mean(), b - b.mean()
    denom = torch.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


MATTHEWS = MetricSpec("matthews_corrcoef", higher_is_better=True, compute=matthews_corrcoef)
SPEARMAN = MetricSpec("spearman", higher_is_better=True, compute=spearman)

__all__ = ["ACCURACY", "MATTHEWS", "SPEARMAN", "matthews_corrcoef", "spearman"]
