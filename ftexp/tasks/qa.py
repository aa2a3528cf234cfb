"""Question answering / instruction following: the answer is free text.

Metrics (``evaluate`` modules shipped with ftexp):

* ``eval/exact_match``: the answer equals a reference after SQuAD normalisation
  (lower-case, no punctuation, no a/an/the, single spaces);
* ``eval/token_f1``: SQuAD token-overlap F1, best reference per example;
* an error breakdown, as in the instruction-tuning study's error analysis, each a
  count (``eval/empty``, ``eval/too_long``, ``eval/repetitive``, ``eval/wrong``), a rate
  (``eval/<name>_rate``) and a per-row flag in ``predictions.jsonl``:

  - empty: nothing but whitespace was generated;
  - too long: more words than ``task.too_long_factor`` x the longest reference's;
  - repetitive: some word n-gram (n = ``REPEAT_N``) occurs ``REPEAT_MIN`` or more
    times; this catches the loops small models fall into ("the the the the the",
    a sentence said three times) and leaves ordinary answers alone;
  - wrong: none of the above and not an exact match: a well-formed answer that
    misses (its token F1 says by how much).

References are ``task.target`` plus any ``task.references`` field the record has.

Alpaca-style data needs two prompts: ``task.template_when_empty`` maps a field to the
template used when that field is empty (Alpaca's no-input prompt).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from ftexp.metrics import load_metric
from ftexp.tasks.base import Metric, Task, fill
from ftexp.tasks.summarization import reference_texts

REPEAT_N = 3  # word n-gram length for the repetition check
REPEAT_MIN = 3  # occurrences of one n-gram that make an answer repetitive
FLAGS = ("empty", "too_long", "repetitive", "wrong")  # the error breakdown, one count each


def is_repetitive(text: str, n: int = REPEAT_N, min_count: int = REPEAT_MIN) -> bool:
    words = text.lower().split()
    if len(words) < n + min_count - 1:
        return False
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return max(grams.values()) >= min_count


def is_too_long(prediction: str, references: Sequence[str], factor: float) -> bool:
    longest = max((len(r.split()) for r in references), default=0)
    return len(prediction.split()) > factor * max(longest, 1)


class TemplateChoice:
    """Pick ``task.template_when_empty[field]`` instead of ``task.template`` when the
    record's ``field`` is empty or missing (first matching field wins)."""

    def template_for(self, record: dict) -> str:
        for name, template in (getattr(self.cfg, "template_when_empty", None) or {}).items():
            value = record.get(name)
            if value is None or not str(value).strip():
                return template
        return self.cfg.template

    def user_text(self, record: dict, shots: Sequence[dict] = ()) -> str:
        question = fill(self.template_for(record), record, "task.template")
        if not shots:
            return question
        return "\n\n".join([*(self.shot_text(s) for s in shots), question])

    def shot_text(self, record: dict) -> str:
        if self.cfg.shot_template:
            return super().shot_text(record)
        question = fill(self.template_for(record), record, "task.template")
        return question + self.completion(record, after=question)


class QATask(TemplateChoice, Task):
    kind = "qa"
    metrics = (Metric("eval/token_f1"), Metric("eval/exact_match"),
               *(Metric(f"eval/{flag}{rate}", "minimize", ".3f" if rate else "d")
                 for flag in FLAGS for rate in ("", "_rate")),
               Metric("eval/pred_words_mean", "maximize", ".1f"), Metric("eval/ref_words_mean", "maximize", ".1f"))

    def references(self, record: dict) -> list[str]:
        return reference_texts(record, [self.cfg.target, *(self.cfg.references or ())])

    def reference(self, record: dict) -> str:
        return self.references(record)[0]

    def score(self, predictions: Sequence[str], records: Sequence[dict]) -> tuple[dict, list[dict]]:
        refs = [self.references(r) for r in records]
        preds = list(predictions)
        em = load_metric("exact_match").compute(predictions=preds, references=refs, per_example=True)
        f1 = load_metric("token_f1").compute(predictions=preds, references=refs, per_example=True)
        factor = float(self.cfg.too_long_factor)
        rows = []
        for i, (pred, ref_list) in enumerate(zip(preds, refs)):
            empty = not pred.strip()
            row = {
                "exact_match": bool(em["exact_match_per_example"][i]),
                "token_f1": f1["token_f1_per_example"][i],
                "empty": empty,
                "too_long": (not empty) and is_too_long(pred, ref_list, factor),
                "repetitive": (not empty) and is_repetitive(pred),
            }
            row["wrong"] = not (row["exact_match"] or row["empty"] or row["too_long"] or row["repetitive"])
            if len(ref_list) > 1:
                row["references"] = ref_list
            rows.append(row)
        n = max(len(rows), 1)
        metrics = {"eval/exact_match": float(em["exact_match"]), "eval/token_f1": float(f1["token_f1"])}
        for flag in FLAGS:
            count = sum(1 for r in rows if r[flag])
            metrics[f"eval/{flag}"] = count
            metrics[f"eval/{flag}_rate"] = count / n
        metrics["eval/pred_words_mean"] = sum(len(p.split()) for p in preds) / n
        metrics["eval/ref_words_mean"] = sum(len(r[0].split()) for r in refs) / n
        return metrics, rows
