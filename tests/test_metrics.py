"""The metric modules shipped with ftexp: loaded through the evaluate library by
path (never the Hub), equal to rouge_score / scikit-learn on the same inputs, and
right on hand-computed cases."""

from __future__ import annotations

import random

import pytest
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, f1_score

from ftexp.metrics import SHIPPED_METRICS, classification_scores, core, evaluate_library, load_metric


def test_every_shipped_metric_loads_through_the_evaluate_api_offline():
    lib = evaluate_library()
    for name in SHIPPED_METRICS:
        metric = load_metric(name)
        assert isinstance(metric, lib.Metric), name
    with pytest.raises(ValueError, match="ftexp ships"):
        load_metric("bleu")


def test_each_metric_script_serves_the_shared_class():
    for name, cls in [("rouge", core.Rouge), ("accuracy", core.Accuracy), ("f1", core.F1),
                      ("exact_match", core.ExactMatch), ("token_f1", core.TokenF1)]:
        metric = load_metric(name)
        assert type(metric) is cls and metric.name == name


# ----------------------------------------------------------------------------- ROUGE


def test_rouge_hand_computed_case():
    # prediction "the cat sat" vs reference "the cat ran": 2 of 3 unigrams, 1 of 2 bigrams
    out = load_metric("rouge").compute(predictions=["the cat sat"], references=["the cat ran"], use_stemmer=False)
    assert out["rouge1"] == pytest.approx(2 / 3)
    assert out["rouge2"] == pytest.approx(0.5)
    assert out["rougeL"] == pytest.approx(2 / 3)
    # the stemmer makes "running" and "runs" one word
    assert load_metric("rouge").compute(predictions=["runs"], references=["running"])["rouge1"] == 1.0
    assert load_metric("rouge").compute(predictions=["runs"], references=["running"],
                                        use_stemmer=False)["rouge1"] == 0.0


def test_rouge_equals_rouge_score_single_and_multi_reference():
    rng = random.Random(0)
    words = "the a cat dog sat ran quickly home person1 person2 meeting tomorrow office call".split()
    preds = [" ".join(rng.choices(words, k=rng.randint(0, 12))) for _ in range(40)]
    refs = [[" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(rng.randint(1, 3))] for _ in range(40)]
    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=True)
    out = load_metric("rouge").compute(predictions=preds, references=refs, per_example=True)
    for t in types:
        expected = [scorer.score_multi(r, p)[t].fmeasure for p, r in zip(preds, refs)]
        assert out[f"{t}_per_example"] == pytest.approx(expected, abs=1e-12)
        assert out[t] == pytest.approx(sum(expected) / len(expected), abs=1e-12)


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_rouge_equals_rouge_score_with_one_text_per_reference_and_chosen_types(use_stemmer):
    rng = random.Random(1)
    words = "running runs ran the cats cat sat sitting home homes\nquickly".split(" ")
    preds = [" ".join(rng.choices(words, k=rng.randint(1, 10))) for _ in range(30)]
    refs = [" ".join(rng.choices(words, k=rng.randint(1, 10))) for _ in range(30)]
    scorer = rouge_scorer.RougeScorer(["rouge2", "rougeLsum"], use_stemmer=use_stemmer)
    out = load_metric("rouge").compute(predictions=preds, references=refs, rouge_types=["rouge2", "rougeLsum"],
                                       use_stemmer=use_stemmer, per_example=True)
    assert set(out) == {"rouge2", "rougeLsum", "rouge2_per_example", "rougeLsum_per_example"}
    for t in ("rouge2", "rougeLsum"):
        assert out[f"{t}_per_example"] == [scorer.score(r, p)[t].fmeasure for p, r in zip(preds, refs)]


def test_multi_reference_rouge_takes_the_best_reference_per_example():
    pred = "bob will call alice tomorrow"
    far, near = "the weather was cold", "bob calls alice tomorrow"
    rouge = load_metric("rouge")
    best = rouge.compute(predictions=[pred], references=[[far, near]])
    only_near = rouge.compute(predictions=[pred], references=[near])
    for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert best[t] == pytest.approx(only_near[t])
        assert best[t] > rouge.compute(predictions=[pred], references=[far])[t]


# ----------------------------------------------------------------------------- accuracy / F1


def _random_labels(seed, n, labels):
    rng = random.Random(seed)
    return [rng.choice(labels) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_accuracy_and_f1_equal_scikit_learn(seed):
    gold = _random_labels(seed, 60, [0, 1, 2])
    pred = _random_labels(seed + 100, 60, [-1, 0, 1, 2])  # -1: an irregular output
    acc = load_metric("accuracy").compute(predictions=pred, references=gold)["accuracy"]
    assert acc == pytest.approx(accuracy_score(gold, pred))
    f1 = load_metric("f1")
    for average in ("macro", "micro", "weighted"):
        for labels in ([0, 1, 2], [1], None):
            ours = f1.compute(predictions=pred, references=gold, labels=labels, average=average)["f1"]
            theirs = f1_score(gold, pred, labels=labels, average=average, zero_division=0)
            assert ours == pytest.approx(theirs), (average, labels)
    per = f1.compute(predictions=pred, references=gold, labels=[0, 1, 2], average=None)["f1"]
    assert per == pytest.approx(list(f1_score(gold, pred, labels=[0, 1, 2], average=None, zero_division=0)))
    binary_gold, binary_pred = [g % 2 for g in gold], [abs(p) % 2 for p in pred]
    assert f1.compute(predictions=binary_pred, references=binary_gold)["f1"] == pytest.approx(
        f1_score(binary_gold, binary_pred))


@pytest.mark.parametrize("seed", range(3))
def test_weighted_accuracy_binary_f1_and_per_label_f1_equal_scikit_learn(seed):
    rng = random.Random(seed)
    gold = _random_labels(seed, 40, [0, 1])
    pred = _random_labels(seed + 50, 40, [0, 1])
    weights = [rng.random() for _ in gold]
    acc = load_metric("accuracy")
    for normalize in (True, False):
        ours = acc.compute(predictions=pred, references=gold, normalize=normalize, sample_weight=weights)["accuracy"]
        assert ours == pytest.approx(accuracy_score(gold, pred, normalize=normalize, sample_weight=weights))
    assert acc.compute(predictions=pred, references=gold, normalize=False)["accuracy"] == accuracy_score(
        gold, pred, normalize=False)
    f1 = load_metric("f1")
    for pos_label in (0, 1):
        ours = f1.compute(predictions=pred, references=gold, pos_label=pos_label)["f1"]
        assert ours == pytest.approx(f1_score(gold, pred, pos_label=pos_label))
    per_label = f1.compute(predictions=pred, references=gold, average=None)["f1"]
    assert isinstance(per_label, list) and per_label == pytest.approx(list(f1_score(gold, pred, average=None)))


def test_f1_hand_computed_and_zero_division():
    # label 1: TP 1, FP 1, FN 1 -> F1 0.5; label 0: TP 1, FP 1, FN 1 -> 0.5
    f1 = load_metric("f1")
    assert f1.compute(predictions=[1, 0, 1, 0], references=[1, 1, 0, 0])["f1"] == pytest.approx(0.5)
    # a label absent from both sides scores zero_division
    assert f1.compute(predictions=[0], references=[0], labels=[1], average="macro")["f1"] == 0.0
    assert f1.compute(predictions=[0], references=[0], labels=[1], average="macro", zero_division=1)["f1"] == 1.0
    with pytest.raises(ValueError, match="binary"):
        f1.compute(predictions=[0, 1, 2], references=[0, 1, 2])


def test_classification_scores_counts_irregular_outputs_as_wrong():
    # gold 1,1,0,0 / parsed 1,None,0,1: accuracy 2/4; F1(positive): TP1 FP1 FN1 -> 0.5
    out = classification_scores([1, None, 0, 1], [1, 1, 0, 0], num_labels=2)
    assert out == {"eval/accuracy": 0.5, "eval/f1": pytest.approx(0.5), "eval/n": 4}
    # three labels: macro F1 over the real labels, irregular never a label of its own
    parsed, gold = [0, 1, 2, None, 2], [0, 1, 1, 2, 2]
    out = classification_scores(parsed, gold, num_labels=3, prefix="eval/likelihood_")
    assert out["eval/likelihood_accuracy"] == pytest.approx(3 / 5)
    assert out["eval/likelihood_f1"] == pytest.approx(
        f1_score(gold, [-1 if p is None else p for p in parsed], labels=[0, 1, 2], average="macro"))


# ----------------------------------------------------------------------------- exact match / token F1


def test_exact_match_and_token_f1_hand_computed():
    em = load_metric("exact_match")
    assert em.compute(predictions=["The Cat!"], references=["cat"])["exact_match"] == 1.0  # case, article, punctuation
    assert em.compute(predictions=["The Cat!"], references=["cat"], normalize=False)["exact_match"] == 0.0
    assert em.compute(predictions=["dog", "a cat"], references=[["cat", "dog"], ["dog"]],
                      per_example=True)["exact_match_per_example"] == [1, 0]
    f1 = load_metric("token_f1")
    # "cat sat down" vs "the cat sat": overlap 2 (cat, sat); P 2/3, R 2/2 -> 0.8
    assert f1.compute(predictions=["cat sat down"], references=["the cat sat"])["token_f1"] == pytest.approx(0.8)
    # best reference per example; empty vs empty is 1, empty vs text is 0
    out = f1.compute(predictions=["cat sat down", "", ""], references=[["dog", "the cat sat"], [""], ["x"]],
                     per_example=True)
    assert out["token_f1_per_example"] == pytest.approx([0.8, 1.0, 0.0])


def test_exact_match_and_token_f1_share_one_normalisation():
    assert core.normalize_answer("  The CAT's, an apple... A  day! ") == "cats apple day"
    assert core.normalize_answer("theatre anthem") == "theatre anthem"  # articles only as whole words
    pairs = [("The Cat's hat!", "cats hat"), ("an apple", "Apple."), ("red cat", "cat red")]
    em = load_metric("exact_match").compute(predictions=[p for p, _ in pairs], references=[r for _, r in pairs],
                                            per_example=True)["exact_match_per_example"]
    tf1 = load_metric("token_f1").compute(predictions=[p for p, _ in pairs], references=[r for _, r in pairs],
                                          per_example=True)["token_f1_per_example"]
    assert em == [int(core.normalize_answer(p) == core.normalize_answer(r)) for p, r in pairs] == [1, 1, 0]
    assert tf1 == [1.0, 1.0, 1.0]  # the same tokens, in another order for the last pair
