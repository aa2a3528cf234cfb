"""F1 as an ``evaluate`` metric, shipped with ftexp and loaded by path.

Matches ``sklearn.metrics.f1_score`` for single-label classification:

* per label: F1 = 2 TP / (2 TP + FP + FN); a label with no true and no predicted
  example gets ``zero_division``;
* ``average="binary"``: F1 of ``pos_label`` (the data must hold at most two labels);
* ``average="macro"``: unweighted mean over ``labels``; ``"weighted"``: mean weighted
  by each label's true count; ``"micro"``: TP/FP/FN summed over ``labels`` first;
  ``None``: the per-label list.

``labels`` restricts the labels scored. A prediction outside ``labels`` (ftexp
passes -1 for an irregular output) is then a false negative of the true label and a
false positive of nothing, which is how ftexp counts irregular outputs as wrong.
"""

import datasets
import evaluate

_KWARGS = """
Args:
    predictions: list of predicted label ids.
    references: list of true label ids.
    labels: labels to score (default: every label seen in either list, sorted).
    pos_label: the label scored by average="binary" (default 1).
    average: "binary" (default) | "macro" | "micro" | "weighted" | None.
    zero_division: value for a ratio with a zero denominator (default 0).
Returns:
    {"f1": float} (or a list of floats when average is None).
"""

AVERAGES = ("binary", "macro", "micro", "weighted", None)


def _ratio(num, den, zero_division):
    return num / den if den else float(zero_division)


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="F1 score (harmonic mean of precision and recall), as scikit-learn computes it.",
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({
                "predictions": datasets.Value("int64"),
                "references": datasets.Value("int64"),
            }),
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", zero_division=0):
        if average not in AVERAGES:
            raise ValueError(f"f1: average={average!r}; valid: {AVERAGES}")
        if len(predictions) != len(references):
            raise ValueError("f1: predictions and references differ in length.")
        seen = sorted(set(predictions) | set(references))
        if average == "binary":
            if len(seen) > 2:
                raise ValueError(f"f1: average='binary' needs at most two labels, found {seen}; pass "
                                 "labels=[...] with average='macro' instead.")
            labels = [pos_label]
        elif labels is None:
            labels = seen
        labels = list(labels)
        tp = {lab: 0 for lab in labels}
        fp = dict(tp)
        fn = dict(tp)
        for p, r in zip(predictions, references):
            if p == r:
                if p in tp:
                    tp[p] += 1
                continue
            if p in fp:
                fp[p] += 1
            if r in fn:
                fn[r] += 1
        if average == "micro":
            return {"f1": _ratio(2 * sum(tp.values()), 2 * sum(tp.values()) + sum(fp.values()) + sum(fn.values()),
                                 zero_division)}
        per_label = [_ratio(2 * tp[lab], 2 * tp[lab] + fp[lab] + fn[lab], zero_division) for lab in labels]
        if average is None:
            return {"f1": per_label}
        if average == "weighted":
            support = [tp[lab] + fn[lab] for lab in labels]
            total = sum(support)
            if not total:
                return {"f1": float(zero_division)}
            return {"f1": sum(f * s for f, s in zip(per_label, support)) / total}
        return {"f1": sum(per_label) / len(per_label) if per_label else float(zero_division)}
