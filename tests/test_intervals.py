"""ftexp.intervals: bootstrap intervals of each task's metrics from predictions.jsonl rows, and paired tests.

The rows come from the task kinds' own scorers, so each statistic on all examples is checked against the
number that run would write to metrics.json."""

from __future__ import annotations

import math

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats
from sklearn.metrics import f1_score

from ftexp import intervals
from ftexp.tasks.classification import ClassificationTask
from ftexp.tasks.scoring import ScoringTask

SST2_DEV = 872


def classification_rows(labels: list[str], gold: list[int], parsed: list[int | None]) -> tuple[dict, list[dict]]:
    """(metrics, predictions.jsonl rows) as a classification run writes them."""
    task = ClassificationTask(OmegaConf.create({"labels": dict(enumerate(labels)), "target": "label"}))
    metrics, rows = task.score_indices(parsed, gold, [labels[p] if p is not None else "hmm" for p in parsed])
    return metrics, [{"reference": labels[g], **row} for g, row in zip(gold, rows)]


def flat_labels(labels: list[str]) -> dict:
    return {f"task.labels.{i}": word for i, word in enumerate(labels)}


def hits(correct: int, n: int = SST2_DEV, seed: int = 0) -> list[bool]:
    """``n`` outcomes, ``correct`` of them hits, in a seeded order."""
    outcomes = np.arange(n) < correct
    return list(np.random.default_rng(seed).permutation(outcomes))


def test_an_accuracy_interval_holds_the_estimate_and_is_as_wide_as_a_binomial_proportion():
    accuracy = intervals.interval(intervals.mean(hits(733)))  # 0.841 on SST-2's 872 dev sentences
    p = 733 / SST2_DEV
    assert accuracy.value == pytest.approx(p) and accuracy.low < p < accuracy.high
    assert accuracy.half_width == pytest.approx(1.96 * math.sqrt(p * (1 - p) / SST2_DEV), abs=0.002)  # 0.024


def test_the_interval_agrees_with_scipys_percentile_bootstrap():
    scores = np.random.default_rng(3).beta(2, 5, size=200)  # ROUGE-like per-example scores
    ours = intervals.interval(intervals.mean(list(scores)))
    theirs = stats.bootstrap((scores,), np.mean, n_resamples=10_000, method="percentile", random_state=0)
    assert ours.low == pytest.approx(theirs.confidence_interval.low, abs=0.003)
    assert ours.high == pytest.approx(theirs.confidence_interval.high, abs=0.003)


def test_the_same_seed_gives_the_same_interval_and_another_seed_a_close_one():
    statistic = intervals.mean(hits(600))
    assert intervals.interval(statistic) == intervals.interval(statistic)
    other = intervals.interval(statistic, seed=1)
    assert other != intervals.interval(statistic) and other.low == pytest.approx(intervals.interval(statistic).low,
                                                                                abs=0.005)


@pytest.mark.parametrize("labels", [["negative", "positive"], ["negative", "neutral", "positive"]])
def test_f1_on_all_examples_is_the_tasks_f1_and_scikit_learns(labels):
    rng = np.random.default_rng(7)
    gold = list(rng.integers(0, len(labels), size=300))
    parsed = [g if rng.random() < 0.7 else None if rng.random() < 0.3 else int(rng.integers(0, len(labels)))
              for g in gold]  # right, irregular (None) or a random label
    metrics, rows = classification_rows(labels, gold, parsed)
    statistic = intervals.metric_statistic("eval/f1", rows, flat_labels(labels))
    scored = [1] if len(labels) == 2 else list(range(len(labels)))
    sklearn = f1_score(gold, [-1 if p is None else p for p in parsed], labels=scored, average="macro",
                       zero_division=0)
    assert statistic.value() == pytest.approx(metrics["eval/f1"], abs=1e-12) == pytest.approx(sklearn, abs=1e-12)
    accuracy = intervals.metric_statistic("eval/accuracy", rows, flat_labels(labels))
    assert accuracy.value() == pytest.approx(metrics["eval/accuracy"], abs=1e-12)


def test_f1_of_a_resample_is_scikit_learns_f1_weighted_by_the_draw_counts():
    labels, rng = ["negative", "neutral", "positive"], np.random.default_rng(11)
    gold = list(rng.integers(0, 3, size=150))
    parsed = [g if rng.random() < 0.6 else None if rng.random() < 0.3 else int(rng.integers(0, 3)) for g in gold]
    statistic = intervals.metric_statistic("eval/f1", classification_rows(labels, gold, parsed)[1],
                                           flat_labels(labels))
    counts = rng.multinomial(150, np.full(150, 1 / 150), size=5)
    resampled = statistic.combine(counts @ statistic.columns)
    expected = [f1_score(gold, [-1 if p is None else p for p in parsed], labels=[0, 1, 2], average="macro",
                         zero_division=0, sample_weight=w) for w in counts]
    assert resampled == pytest.approx(expected, abs=1e-12)


def test_with_both_eval_methods_each_accuracy_reads_its_own_prediction():
    """eval.method=both: eval/accuracy and eval/f1 are the generated answers' (predicted_label),
    eval/likelihood_accuracy and eval/likelihood_f1 the label likelihood's (likelihood_prediction)."""
    labels = ["negative", "positive"]
    rows = [{"reference": ref, "predicted_label": gen, "likelihood_prediction": lik}
            for ref, gen, lik in [("positive", "positive", "positive"), ("negative", None, "negative"),
                                  ("positive", "negative", "positive"), ("negative", "negative", "positive")]]
    config = flat_labels(labels)
    assert intervals.metric_statistic("eval/accuracy", rows, config).value() == 0.5
    assert intervals.metric_statistic("eval/likelihood_accuracy", rows, config).value() == 0.75
    assert intervals.metric_statistic("eval/f1", rows, config).value() == pytest.approx(2 / 3)  # tp 1, fn 1
    assert intervals.metric_statistic("eval/likelihood_f1", rows, config).value() == pytest.approx(0.8)


def test_per_example_means_give_back_rouge_exact_match_and_token_f1():
    rows = [{"reference": f"r{i}", "rouge1": 0.1 * i, "rouge2": 0.0, "rougeL": 0.05 * i, "exact_match": i % 2 == 0,
             "token_f1": 0.2 * i} for i in range(5)]
    for metric, value in [("eval/rouge1", 0.2), ("eval/rougeL", 0.1), ("eval/exact_match", 0.6),
                          ("eval/token_f1", 0.4)]:
        statistic = intervals.metric_statistic(metric, rows, {})
        assert statistic.value() == pytest.approx(value) and intervals.reproduces(statistic, metric, value)


def test_mcrmse_on_all_examples_is_the_scoring_tasks():
    task = ScoringTask(OmegaConf.create({"fields": ["wording", "content"], "target": "label"}))
    rng = np.random.default_rng(5)
    records = [{"wording": float(w), "content": float(c)} for w, c in rng.normal(size=(40, 2))]
    predictions = [f"Wording: {r['wording'] + e:.2f}\nContent: {r['content'] - e:.2f}" if i % 7 else "no idea"
                   for i, (r, e) in enumerate(zip(records, rng.normal(scale=0.5, size=40)))]
    metrics, rows = task.score(predictions, records)
    fields = {"task.fields.0": "wording", "task.fields.1": "content"}
    statistic = intervals.metric_statistic("eval/mcrmse", rows, fields)
    assert statistic.value() == pytest.approx(metrics["eval/mcrmse"], abs=1e-12)
    assert intervals.interval(statistic).low < metrics["eval/mcrmse"] < intervals.interval(statistic).high


def test_judge_ratings_are_averaged_over_the_rated_examples_only():
    rows = [{"reference": "a", "judge": {"fluency": 4.0}}, {"reference": "b", "judge": {"fluency": None}},
            {"reference": "c", "judge": {"fluency": 2.0}}, {"reference": "d"}]  # unrated, not judged
    statistic = intervals.metric_statistic("judge/fluency", rows, {})
    assert statistic.value() == 3.0 and intervals.reproduces(statistic, "judge/fluency", 3.00004)


def test_rows_without_the_fields_a_metric_needs_give_no_statistic():
    rows = [{"reference": "positive", "prediction": "positive"}]
    assert intervals.metric_statistic("eval/accuracy", [{"prediction": "positive"}], {}) is None
    assert intervals.metric_statistic("eval/f1", [{**rows[0], "predicted_label": "positive"}], {}) is None  # no labels
    assert intervals.metric_statistic("eval/rouge1", rows, {}) is None
    assert intervals.metric_statistic("eval/empty", [{"reference": "x", "empty": True}], {}) is None  # a count
    assert intervals.metric_statistic("eval/accuracy", [], {}) is None


def test_the_paired_test_flags_a_clearly_better_run():
    base = hits(600)  # 0.688
    better = [h or i % 3 == 0 for i, h in enumerate(base)]  # about 90 more right: 0.79
    diff = intervals.interval(intervals.difference(intervals.mean(better), intervals.mean(base)))
    assert diff.value == pytest.approx((sum(better) - sum(base)) / SST2_DEV) and diff.excludes(0) and diff.low > 0


def test_the_paired_test_does_not_flag_runs_two_examples_apart():
    base = hits(733)
    near = list(base)
    near[base.index(False)], near[base.index(True)] = True, False  # one more right here, one fewer there
    near[near.index(False)] = True  # and one more: 0.8417 against 0.8406
    diff = intervals.interval(intervals.difference(intervals.mean(near), intervals.mean(base)))
    assert diff.value == pytest.approx(1 / SST2_DEV) and not diff.excludes(0)


def test_an_unpaired_look_at_the_same_two_runs_is_wider_than_the_paired_one():
    base = hits(733)
    near = [h or i % 40 == 0 for i, h in enumerate(base)]  # a few more right, the rest the same answers
    paired = intervals.interval(intervals.difference(intervals.mean(near), intervals.mean(base)))
    separate = [intervals.interval(intervals.mean(x)) for x in (near, base)]
    assert paired.half_width < sum(s.half_width for s in separate) / 2


def test_statistics_on_other_examples_are_not_comparable_and_never_paired():
    a = intervals.mean([1, 0, 1], examples=("x", "y", "z"))
    b = intervals.mean([1, 1, 1], examples=("x", "z", "y"))
    assert not intervals.comparable([a, b])
    assert not intervals.comparable([a, intervals.mean([1, 0], examples=("x", "y"))])
    with pytest.raises(ValueError, match="same examples"):
        intervals.difference(a, b)


def test_the_mean_over_seeds_is_the_mean_of_their_values_with_a_narrower_interval():
    seeds = [intervals.mean(hits(700, seed=s)) for s in range(3)]
    cell = intervals.mean_of(seeds)
    assert cell.value() == pytest.approx(np.mean([s.value() for s in seeds]))
    assert intervals.interval(cell).half_width < intervals.interval(seeds[0]).half_width


def test_statistics_on_as_many_examples_share_their_resamples():
    a, b = intervals.mean(hits(700)), intervals.mean(hits(500, seed=4))
    together = intervals.bootstrap([a, b, intervals.mean(hits(30, n=50))])
    assert together[:2] == [intervals.interval(a), intervals.interval(b)]
    assert math.isnan(intervals.bootstrap([intervals.mean([])])[0].low)
