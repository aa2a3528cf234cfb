"""Token-level F1 between answer and reference, as an ``evaluate`` metric shipped
with ftexp (SQuAD's per-answer F1).

Both texts are normalised (lower-case, no punctuation, no a/an/the, single spaces)
and split on whitespace; the overlap is the multiset intersection of the tokens.
F1 = 2 P R / (P + R). When either side has no tokens, F1 is 1 if both are empty and
0 otherwise. With several references an example takes its best F1. The corpus value
is the mean over examples.
"""

import re
import string
from collections import Counter

import datasets
import evaluate

_KWARGS = """
Args:
    predictions: list of generated answers.
    references: list of reference answers, or list of lists of references.
    per_example: also return each example's F1 under "token_f1_per_example".
Returns:
    {"token_f1": mean F1}
"""

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class TokenF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Mean token-overlap F1 between answers and references (SQuAD).",
            citation="Rajpurkar et al. (2016). SQuAD: 100,000+ Questions for Machine Comprehension of Text.",
            inputs_description=_KWARGS,
            features=[
                datasets.Features({
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }),
                datasets.Features({
                    "predictions": datasets.Value("string"),
                    "references": datasets.Value("string"),
                }),
            ],
        )

    def _compute(self, predictions, references, per_example=False):
        scores = []
        for pred, refs in zip(predictions, references):
            refs = [refs] if isinstance(refs, str) else list(refs)
            scores.append(max(token_f1(pred, r) for r in refs) if refs else 0.0)
        out = {"token_f1": sum(scores) / len(scores) if scores else 0.0}
        if per_example:
            out["token_f1_per_example"] = scores
        return out
