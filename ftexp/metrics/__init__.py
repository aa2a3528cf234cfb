"""Metrics through the ``evaluate`` API, loaded by path from one folder per metric beside this
file (``evaluate.load("rouge")`` would fetch code from the Hub and fail offline); see core.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

METRICS_DIR = Path(__file__).resolve().parent
SHIPPED_METRICS = ("rouge", "accuracy", "f1", "exact_match", "token_f1")


def metric_path(name: str) -> Path:
    """The script of the shipped metric ``name``."""
    path = METRICS_DIR / name / f"{name}.py"
    if name not in SHIPPED_METRICS or not path.exists():
        raise ValueError(f"unknown metric {name!r}; ftexp ships: {', '.join(SHIPPED_METRICS)}")
    return path


def evaluate_library():
    """The ``evaluate`` library, even where the repository's own ``evaluate.py`` script
    shadows it (Python started in the repository's root puts the root first on sys.path)."""
    loaded = sys.modules.get("evaluate")
    if hasattr(loaded, "load") and hasattr(loaded, "Metric"):
        return loaded
    saved_path = list(sys.path)
    sys.modules.pop("evaluate", None)
    sys.path[:] = [p for p in sys.path if not (Path(p or os.getcwd()) / "evaluate.py").is_file()]
    try:
        return __import__("evaluate")
    finally:
        sys.path[:] = saved_path


def load_metric(name: str):
    """The ``evaluate`` metric ``name`` from ftexp's own modules (never the Hub), kept in
    memory: no cache files, so parallel runs never contend for a lock."""
    return evaluate_library().load(str(metric_path(name).parent), keep_in_memory=True)


def classification_scores(parsed: Sequence[int | None], gold: Sequence[int], *, num_labels: int,
                          prefix: str = "eval/") -> dict:
    """Accuracy and F1; an irregular output (None) is a wrong prediction. Binary tasks report
    F1 of the second label (SST-2: "positive"), more labels macro F1 over the real labels."""
    pred = [-1 if p is None else int(p) for p in parsed]
    gold = [int(g) for g in gold]
    if not gold:
        return {f"{prefix}accuracy": 0.0, f"{prefix}f1": 0.0, f"{prefix}n": 0}
    labels = [1] if num_labels == 2 else list(range(num_labels))
    accuracy = load_metric("accuracy").compute(predictions=pred, references=gold)["accuracy"]
    f1 = load_metric("f1").compute(predictions=pred, references=gold, labels=labels, average="macro")["f1"]
    return {f"{prefix}accuracy": float(accuracy), f"{prefix}f1": float(f1), f"{prefix}n": len(gold)}
