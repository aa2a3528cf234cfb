"""Metrics. Classification scores here; the evaluate-library modules shipped with
ftexp (loaded by path, never from the Hub) live beside this file.
"""

from __future__ import annotations

from typing import Sequence


def classification_scores(parsed: Sequence[int | None], gold: Sequence[int], *, num_labels: int,
                          prefix: str = "eval/") -> dict:
    """Accuracy and F1. An irregular output (None) is a wrong prediction.

    Binary tasks report F1 of the second label (SST-2: "positive"); more labels
    report macro F1 over the real labels.
    """
    from sklearn.metrics import accuracy_score, f1_score

    pred = [-1 if p is None else int(p) for p in parsed]
    gold = [int(g) for g in gold]
    if num_labels == 2:
        f1 = f1_score(gold, pred, labels=[1], average="macro", zero_division=0)
    else:
        f1 = f1_score(gold, pred, labels=list(range(num_labels)), average="macro", zero_division=0)
    return {f"{prefix}accuracy": float(accuracy_score(gold, pred)), f"{prefix}f1": float(f1), f"{prefix}n": len(gold)}
