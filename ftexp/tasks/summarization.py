"""Summarization: the answer is a summary; the metric is ROUGE-1/2/L/Lsum with the
Porter stemmer (``eval/rouge1``, ``eval/rouge2``, ``eval/rougeL``, ``eval/rougeLsum``).

References. ``task.target`` names the field trained on; ``task.references`` names
further fields that may hold reference summaries (DialogSum's test split has
``summary1``..``summary3`` and no ``summary``). Each example is scored against every
non-empty one of those fields it has, duplicates dropped.

Multi-reference convention: per example and per ROUGE type, the reference with the
highest F-measure counts (rouge_score's ``score_multi``); the corpus score is the
mean F-measure over examples. Texts are scored exactly as written to
``predictions.jsonl`` (``prediction`` and ``references``), so
``RougeScorer(types, use_stemmer=True).score_multi(references, prediction)``
averaged over the rows gives back the reported numbers.
"""

from __future__ import annotations

from typing import Sequence

from ftexp.errors import ConfigError
from ftexp.metrics import load_metric
from ftexp.tasks.base import Metric, Task

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def reference_texts(record: dict, fields: Sequence[str]) -> list[str]:
    """The non-empty values of ``fields`` the record has, in order, duplicates dropped."""
    fields = list(dict.fromkeys(str(f) for f in fields))
    refs = []
    for name in fields:
        value = record.get(name)
        if value is None:
            continue
        text = str(value).strip()
        if text and text not in refs:
            refs.append(text)
    if not refs:
        found = sorted(k for k in record if not k.startswith("_"))
        raise ConfigError(
            f"no reference text in fields {fields} (task.target, task.references). Fields found: {found}. "
            f"Map one with data.columns.{fields[0]}=<column> or list the columns in task.references."
        )
    return refs


class SummarizationTask(Task):
    kind = "summarization"
    metrics = (Metric("eval/rougeL", "maximize", ".4f"), Metric("eval/rouge1", "maximize", ".4f"),
               Metric("eval/rouge2", "maximize", ".4f"), Metric("eval/rougeLsum", "maximize", ".4f"),
               Metric("eval/empty", "minimize", "d"), Metric("eval/pred_words_mean", "maximize", ".1f"))

    def references(self, record: dict) -> list[str]:
        return reference_texts(record, [self.cfg.target, *(self.cfg.references or ())])

    def target_text(self, record: dict) -> str:
        """The trained summary: ``task.target``, else the first reference field present."""
        value = record.get(self.cfg.target)
        if value is not None and str(value).strip():
            return str(value).strip()
        return self.references(record)[0]

    def reference(self, record: dict) -> str:
        return self.references(record)[0]

    def score(self, predictions: Sequence[str], records: Sequence[dict]) -> tuple[dict, list[dict]]:
        refs = [self.references(r) for r in records]
        result = load_metric("rouge").compute(predictions=list(predictions), references=refs,
                                              rouge_types=list(ROUGE_TYPES), use_stemmer=True, per_example=True)
        metrics = {f"eval/{t}": float(result[t]) for t in ROUGE_TYPES}
        lengths = [len(p.split()) for p in predictions]
        metrics["eval/pred_words_mean"] = sum(lengths) / max(len(lengths), 1)
        metrics["eval/empty"] = sum(1 for p in predictions if not p.strip())
        rows = []
        for i, (pred, ref_list) in enumerate(zip(predictions, refs)):
            row = {"references": ref_list}
            row.update({t: result[f"{t}_per_example"][i] for t in ROUGE_TYPES})
            rows.append(row)
        return metrics, rows
