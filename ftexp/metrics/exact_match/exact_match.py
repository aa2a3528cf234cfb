"""Exact match after normalisation, as an ``evaluate`` metric shipped with ftexp.

Normalisation (SQuAD's): lower-case, drop punctuation, drop the articles a/an/the,
collapse whitespace. With several references an example counts as a match when it
matches any of them. ``normalize=False`` compares the raw strings.
"""

import re
import string

import datasets
import evaluate

_KWARGS = """
Args:
    predictions: list of generated answers.
    references: list of reference answers, or list of lists of references.
    normalize: apply SQuAD normalisation first (default True).
    per_example: also return the per-example 0/1 list under "exact_match_per_example".
Returns:
    {"exact_match": share of matches}
"""

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of predictions equal to a reference after normalisation.",
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

    def _compute(self, predictions, references, normalize=True, per_example=False):
        norm = normalize_answer if normalize else (lambda s: s)
        hits = []
        for pred, refs in zip(predictions, references):
            refs = [refs] if isinstance(refs, str) else list(refs)
            p = norm(pred)
            hits.append(int(any(p == norm(r) for r in refs)))
        out = {"exact_match": sum(hits) / len(hits) if hits else 0.0}
        if per_example:
            out["exact_match_per_example"] = hits
        return out
