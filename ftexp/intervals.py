"""Confidence intervals for a run's metrics, from its own predictions: a bootstrap over eval examples.

Every metric the report shows is a function of sums over examples: accuracy of the hits and the
examples, F1 of each label's true positives, false positives and false negatives, ROUGE or token F1
of the per-example scores, MCRMSE of each field's squared errors and parsed answers. A `Statistic`
holds those per-example columns and the function of their sums. A bootstrap resample weights each
example by how often it was drawn (multinomial counts from a seeded numpy Generator), so the
statistic of every resample at once is one matrix product and one call of that function.

The resamples depend on the seed and the number of examples only: a report is the same each time it
is built, and statistics on the same examples see the same resamples. That makes a paired
comparison (`difference`) a resampling of example indices for both runs jointly. Intervals are
percentile intervals: the 2.5th and 97.5th percentiles of the resampled statistic for 95%.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
SEED = 0
CHUNK = 1 << 22  # resampled counts held at once (float64): 32 MB
MEAN_FIELDS = {  # metrics.json key -> the per-example field of predictions.jsonl it is the mean of
    "eval/rouge1": "rouge1", "eval/rouge2": "rouge2", "eval/rougeL": "rougeL", "eval/rougeLsum": "rougeLsum",
    "eval/exact_match": "exact_match", "eval/token_f1": "token_f1"}
PREDICTED_LABEL = {"eval/": "predicted_label", "eval/likelihood_": "likelihood_prediction"}  # by metric prefix


@dataclass(frozen=True, eq=False)
class Statistic:
    """A metric as a function of column sums over examples.

    ``columns`` holds one row per example; ``combine`` maps column sums (shape ``(..., k)``) to the
    metric (shape ``(...)``). ``examples`` names each example (its reference), so that only
    statistics on the same examples are paired."""

    columns: np.ndarray
    combine: Callable[[np.ndarray], np.ndarray]
    examples: tuple = ()

    @property
    def n(self) -> int:
        """The number of examples."""
        return self.columns.shape[0]

    def value(self) -> float:
        """The statistic on all examples: what metrics.json reports."""
        return float(self.combine(self.columns.sum(axis=0)))


@dataclass(frozen=True)
class Interval:
    """A statistic's value on all examples and the bounds of its confidence interval."""

    value: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        """Half the interval's width: the ``h`` of ``value ± h``."""
        return (self.high - self.low) / 2

    def excludes(self, x: float = 0.0) -> bool:
        """Whether ``x`` lies outside the interval (a difference beyond noise, for ``x=0``)."""
        return bool(x < self.low or x > self.high)


def ratio(numerator: np.ndarray, denominator: np.ndarray, empty: float = np.nan) -> np.ndarray:
    """``numerator / denominator``, and ``empty`` where the denominator is 0."""
    denominator = np.asarray(denominator, dtype=float)
    out = np.full(np.broadcast(numerator, denominator).shape, empty, dtype=float)
    return np.divide(numerator, denominator, out=out, where=denominator != 0)


def mean(values: Sequence[float | bool | None], examples: tuple = ()) -> Statistic:
    """The mean of per-example values over the examples that have one (None: not scored)."""
    x = np.array([np.nan if v is None else float(v) for v in values], dtype=float).reshape(-1)
    scored = ~np.isnan(x)
    return Statistic(np.column_stack([np.where(scored, x, 0.0), scored]), lambda s: ratio(s[..., 0], s[..., 1]),
                     examples)


def f1(references: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str],
       examples: tuple = ()) -> Statistic:
    """F1 as ``ftexp.metrics.classification_scores`` computes it: of ``labels[1]`` with two labels (SST-2's
    "positive"), macro over all ``labels`` with more. A prediction that is no label (None: an irregular
    output) is wrong: a false negative of its reference's label, a false positive of none. A label never
    referenced nor predicted scores 0 (scikit-learn's ``zero_division=0``)."""
    scored = [labels[1]] if len(labels) == 2 else list(labels)
    columns = []
    for label in scored:
        is_reference = np.array([r == label for r in references], dtype=bool)
        is_predicted = np.array([p == label for p in predicted], dtype=bool)
        columns += [is_reference & is_predicted, ~is_reference & is_predicted, is_reference & ~is_predicted]

    def combine(sums: np.ndarray) -> np.ndarray:
        tp, fp, fn = sums[..., 0::3], sums[..., 1::3], sums[..., 2::3]
        return ratio(2 * tp, 2 * tp + fp + fn, empty=0.0).mean(axis=-1)
    return Statistic(np.column_stack(columns).astype(float).reshape(len(references), -1), combine, examples)


def mcrmse(predicted: dict[str, Sequence[float | None]], reference: dict[str, Sequence[float]],
           examples: tuple = ()) -> Statistic:
    """The mean over fields of each field's RMSE over the answers that parsed (None: a parse failure)."""
    columns = []
    for name, values in predicted.items():
        p = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
        parsed = ~np.isnan(p)
        columns += [np.where(parsed, (p - np.asarray(reference[name], dtype=float)) ** 2, 0.0), parsed]

    def combine(sums: np.ndarray) -> np.ndarray:
        return np.sqrt(ratio(sums[..., 0::2], sums[..., 1::2])).mean(axis=-1)
    return Statistic(np.column_stack(columns).astype(float), combine, examples)


def comparable(statistics: Sequence[Statistic]) -> bool:
    """Whether the statistics are on the same examples: as many, with the same references in order."""
    return all(s.n == statistics[0].n and s.examples == statistics[0].examples for s in statistics)


def joined(statistics: Sequence[Statistic], reduce: Callable[[list[np.ndarray]], np.ndarray]) -> Statistic:
    """One statistic of several on the same examples: their columns side by side, ``reduce`` of their values."""
    if not comparable(statistics):
        raise ValueError("statistics on different examples cannot be resampled jointly: pair runs only when their "
                         "predictions cover the same examples in the same order.")
    widths = np.cumsum([0] + [s.columns.shape[1] for s in statistics])
    combines = [s.combine for s in statistics]

    def combine(sums: np.ndarray) -> np.ndarray:
        return reduce([c(sums[..., a:b]) for c, a, b in zip(combines, widths[:-1], widths[1:])])
    return Statistic(np.hstack([s.columns for s in statistics]), combine, statistics[0].examples)


def mean_of(statistics: Sequence[Statistic]) -> Statistic:
    """The mean of statistics on the same examples (a cell's seeds), resampled jointly."""
    return joined(statistics, lambda values: np.mean(values, axis=0))


def difference(a: Statistic, b: Statistic) -> Statistic:
    """``a - b`` on the same examples: resampling it is the paired bootstrap of the two."""
    return joined([a, b], lambda values: values[0] - values[1])


def resampled_sums(columns: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """The column sums of ``resamples`` bootstrap resamples of the rows of ``columns`` (examples), as an array
    of shape ``(resamples, k)``. Row ``i`` of the result depends on ``seed``, the number of examples and ``i``
    only, so statistics on the same examples see the same resamples."""
    n = columns.shape[0]
    rng, chunk = np.random.default_rng([seed, n]), max(1, CHUNK // max(n, 1))
    sums = np.empty((resamples, columns.shape[1]))
    for start in range(0, resamples, chunk):
        counts = rng.multinomial(n, np.full(n, 1 / n), size=min(chunk, resamples - start))
        sums[start:start + len(counts)] = counts.astype(float) @ columns
    return sums


def bootstrap(statistics: Sequence[Statistic], resamples: int = RESAMPLES, level: float = LEVEL,
              seed: int = SEED) -> list[Interval]:
    """The percentile interval at ``level`` of each statistic from ``resamples`` bootstrap resamples of its
    examples. Statistics on equally many examples share one set of resamples, drawn once for all of them.
    An interval a statistic has no resamples for (no examples, or a resample where it is undefined) is NaN."""
    groups = defaultdict(list)  # number of examples -> indices of the statistics on that many
    for i, s in enumerate(statistics):
        groups[s.n].append(i)
    quantiles, out = [(1 - level) / 2, (1 + level) / 2], [None] * len(statistics)
    for n, members in groups.items():
        widths = np.cumsum([0] + [statistics[i].columns.shape[1] for i in members])
        sums = resampled_sums(np.hstack([statistics[i].columns for i in members]), resamples, seed) if n else None
        for i, a, b in zip(members, widths[:-1], widths[1:]):
            low, high = np.quantile(statistics[i].combine(sums[:, a:b]), quantiles) if n else (np.nan, np.nan)
            out[i] = Interval(statistics[i].value() if n else np.nan, float(low), float(high))
    return out


def interval(statistic: Statistic, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> Interval:
    """The percentile interval of one statistic (see `bootstrap`)."""
    return bootstrap([statistic], resamples, level, seed)[0]


def examples_of(rows: Sequence[dict]) -> tuple:
    """What identifies each example of a predictions.jsonl: its reference (or references), in order."""
    return tuple(json.dumps([r.get("reference"), r.get("references")], sort_keys=True, default=str) for r in rows)


def class_labels(config: dict) -> list[str]:
    """A classification run's label words in task.labels order (flat config: "task.labels.0" -> "negative")."""
    return [str(v).strip() for k, v in config.items() if k.startswith("task.labels.")]


def score_fields(config: dict, rows: Sequence[dict]) -> list[str]:
    """A scoring run's fields: task.fields, else the ``pred_<field>`` keys of its rows."""
    fields = [str(v) for k, v in config.items() if k.startswith("task.fields.")]
    return fields or [k[5:] for k in rows[0] if k.startswith("pred_")]


def metric_statistic(metric: str, rows: Sequence[dict], config: dict) -> Statistic | None:
    """The statistic behind metrics.json's ``metric`` from a run's predictions.jsonl ``rows`` and flat
    ``config``, or None where the rows lack what it needs (or the metric is not a per-example one)."""
    if not rows:
        return None
    examples, has = examples_of(rows), lambda *keys: all(k in r for r in rows for k in keys)
    prefix, name = metric.rsplit("/", 1)[0] + "/", metric.rsplit("/", 1)[-1]
    for start, predicted in PREDICTED_LABEL.items():
        if metric in (f"{start}accuracy", f"{start}f1") and has("reference", predicted):
            references, predictions = [r["reference"] for r in rows], [r[predicted] for r in rows]
            if metric.endswith("accuracy"):
                return mean([p == ref for p, ref in zip(predictions, references)], examples)
            labels = class_labels(config)
            return f1(references, predictions, labels, examples) if len(labels) >= 2 else None
    if metric in MEAN_FIELDS and has(MEAN_FIELDS[metric]):
        return mean([r[MEAN_FIELDS[metric]] for r in rows], examples)
    if metric == "eval/mcrmse":
        fields = score_fields(config, rows)
        if fields and has(*(f"{side}_{f}" for f in fields for side in ("pred", "ref"))):
            return mcrmse({f: [r[f"pred_{f}"] for r in rows] for f in fields},
                          {f: [r[f"ref_{f}"] for r in rows] for f in fields}, examples)
    if prefix == "judge/":  # a rating per example, kept for the judged rows (judge.max_examples) only
        key, criterion = ("judge_reference", name[10:]) if name.startswith("reference_") else ("judge", name)
        ratings = [(r.get(key) or {}).get(criterion) for r in rows]
        return mean(ratings, examples) if any(v is not None for v in ratings) else None
    return None


def reproduces(statistic: Statistic, metric: str, value: float) -> bool:
    """Whether ``statistic`` on all its examples gives back metrics.json's ``value``: the rows are the ones the
    metric was computed from. Judge ratings are kept to 4 decimals in predictions.jsonl, hence their tolerance."""
    tolerance = 1e-4 if metric.startswith("judge/") else 1e-9
    return bool(np.isclose(statistic.value(), value, rtol=tolerance, atol=tolerance))
