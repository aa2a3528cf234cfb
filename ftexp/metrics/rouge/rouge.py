"""ROUGE-1/2/L/Lsum as an ``evaluate`` metric, shipped with ftexp and loaded by path.

Scores come from Google's ``rouge_score`` package, so the numbers equal
``rouge_scorer.RougeScorer(types, use_stemmer=...)`` on the same strings.

Conventions (stated here because ROUGE numbers are only comparable when they match):

* The reported value of each ROUGE type is the F-measure.
* Several references per example: each ROUGE type takes the reference with the
  highest F-measure for that example, as ``RougeScorer.score_multi`` does.
* The corpus score is the plain mean of the per-example F-measures. (The Hub's
  ``rouge`` metric reports a bootstrap estimate of that mean, which moves with the
  resampling; the plain mean is exact and can be recomputed from the predictions.)
* Texts are scored as given: ``rougeLsum`` treats newlines as sentence boundaries,
  and no sentence splitting is added.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "ROUGE F-measures (rouge_score), best reference per example, mean over examples."

_KWARGS = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, or list of lists of references (one list per example).
    rouge_types: ROUGE types to compute (default rouge1, rouge2, rougeL, rougeLsum).
    use_stemmer: Porter-stem words before matching (default True).
    per_example: also return each example's F-measures under "<type>_per_example".
Returns:
    {"rouge1": mean F, ...} and, with per_example=True, {"rouge1_per_example": [F, ...], ...}.
"""

DEFAULT_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
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
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, rouge_types=None, use_stemmer=True, per_example=False):
        types = list(rouge_types or DEFAULT_TYPES)
        scorer = rouge_scorer.RougeScorer(types, use_stemmer=use_stemmer)
        per = {t: [] for t in types}
        for pred, refs in zip(predictions, references):
            if isinstance(refs, str):
                refs = [refs]
            if not refs:
                raise ValueError("rouge: an example has no reference text.")
            scores = scorer.score_multi(list(refs), pred)
            for t in types:
                per[t].append(scores[t].fmeasure)
        n = len(predictions)
        out = {t: (sum(per[t]) / n if n else 0.0) for t in types}
        if per_example:
            out.update({f"{t}_per_example": per[t] for t in types})
        return out
