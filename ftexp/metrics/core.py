"""ftexp's metrics: thin wrappers over scikit-learn and rouge_score, as ``evaluate`` metric classes."""

import re
import string
from collections import Counter

import datasets
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, f1_score

from ftexp.metrics import evaluate_library

_LABELS = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})
_TEXTS = [datasets.Features({"predictions": datasets.Value("string"), "references": refs})  # a list or one text
          for refs in (datasets.Sequence(datasets.Value("string")), datasets.Value("string"))]


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no a/an/the, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def answer_f1(prediction: str, reference: str) -> float:
    """SQuAD's token-overlap F1 of two answers after normalisation; 1 when both are empty, 0 when one is."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall) if common else 0.0


def _as_list(refs) -> list:
    return [refs] if isinstance(refs, str) else list(refs)


def _mean(name: str, scores: list, per_example: bool) -> dict:
    """The mean score under ``name``, plus the scores under ``<name>_per_example`` if asked."""
    out = {name: sum(scores) / len(scores) if scores else 0.0}
    return {**out, f"{name}_per_example": scores} if per_example else out


def accuracy(predictions, references, normalize=True, sample_weight=None) -> dict:
    """scikit-learn's accuracy_score of label ids: the (weighted) share of hits, or their count."""
    score = accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight)
    return {"accuracy": float(score)}


def f1(predictions, references, labels=None, pos_label=1, average="binary", zero_division=0) -> dict:
    """scikit-learn's f1_score of label ids; average=None gives a list, one score per label."""
    score = f1_score(references, predictions, labels=labels, pos_label=pos_label, average=average,
                     zero_division=zero_division)
    return {"f1": score.tolist() if average is None else float(score)}


def rouge(predictions, references, rouge_types=None, use_stemmer=True, per_example=False) -> dict:
    """Mean over examples of rouge_score's F-measures, each example against its best reference."""
    types = list(rouge_types or ("rouge1", "rouge2", "rougeL", "rougeLsum"))
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=use_stemmer)
    scores = [scorer.score_multi(_as_list(refs), pred) for pred, refs in zip(predictions, references)]
    return {k: v for t in types for k, v in _mean(t, [s[t].fmeasure for s in scores], per_example).items()}


def exact_match(predictions, references, normalize=True, per_example=False) -> dict:
    """Share of predictions equal to one of their references, after SQuAD's normalisation if asked."""
    norm = normalize_answer if normalize else str
    hits = [int(any(norm(p) == norm(r) for r in _as_list(refs))) for p, refs in zip(predictions, references)]
    return _mean("exact_match", hits, per_example)


def token_f1(predictions, references, per_example=False) -> dict:
    """Mean over examples of SQuAD's token-overlap F1 with each example's best reference."""
    return _mean("token_f1", [max((answer_f1(p, r) for r in _as_list(refs)), default=0.0)
                              for p, refs in zip(predictions, references)], per_example)


def _metric_class(name: str, compute, features=_TEXTS) -> type:
    """An ``evaluate.Metric`` class named ``name`` that runs ``compute`` and shows its docstring."""
    evaluate = evaluate_library()
    return type(name, (evaluate.Metric,), {
        "__doc__": compute.__doc__, "_compute": staticmethod(compute),
        "_info": lambda self: evaluate.MetricInfo(description=compute.__doc__, citation="", features=features)})


Accuracy = _metric_class("Accuracy", accuracy, _LABELS)
F1 = _metric_class("F1", f1, _LABELS)
Rouge = _metric_class("Rouge", rouge)
ExactMatch = _metric_class("ExactMatch", exact_match)
TokenF1 = _metric_class("TokenF1", token_f1)
