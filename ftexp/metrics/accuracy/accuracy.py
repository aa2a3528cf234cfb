"""Accuracy as an ``evaluate`` metric, shipped with ftexp and loaded by path.

Matches ``sklearn.metrics.accuracy_score``: the (weighted) share of predictions equal
to their reference, or the count of them with ``normalize=False``. Labels are
integers; an irregular output is passed as a value no reference has (ftexp uses -1),
so it counts as wrong.
"""

import datasets
import evaluate

_KWARGS = """
Args:
    predictions: list of predicted label ids.
    references: list of true label ids.
    normalize: share (True, default) or count (False) of correct predictions.
    sample_weight: optional weight per example.
Returns:
    {"accuracy": float}
"""


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of predictions equal to the reference label.",
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({
                "predictions": datasets.Value("int64"),
                "references": datasets.Value("int64"),
            }),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        if len(predictions) != len(references):
            raise ValueError("accuracy: predictions and references differ in length.")
        weights = [1.0] * len(references) if sample_weight is None else [float(w) for w in sample_weight]
        correct = sum(w for p, r, w in zip(predictions, references, weights) if p == r)
        if not normalize:
            return {"accuracy": float(correct)}
        total = sum(weights)
        return {"accuracy": correct / total if total else 0.0}
