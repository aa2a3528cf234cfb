"""Classification: the answer is a label word; the prediction is the first word
generated. A first word that is no label word is an *irregular output*: counted,
listed, and scored as wrong (as the SST-2 study's "Irregular output" column).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

from ftexp.errors import ConfigError
from ftexp.metrics import classification_scores
from ftexp.tasks.base import Metric, Task

_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*", re.UNICODE)


def first_word(text: str) -> str:
    match = _WORD.search(text)
    return match.group(0).lower() if match else ""


def check_label_word(tokenizer, word: str, ids: list[int]) -> list[int]:
    """``ids``, the tokens of label word ``word``; refused when there are none or only the
    unknown token, since such a word can be neither trained nor predicted."""
    unk = tokenizer.unk_token_id
    if not ids or (unk is not None and all(i == unk for i in ids)):
        raise ConfigError(f"task.labels: the word {word!r} tokenizes to nothing with this tokenizer, so it can be "
                          "neither trained nor predicted. Pick a word made of ordinary characters.")
    return ids


class ClassificationTask(Task):
    kind = "classification"
    metrics = (Metric("eval/accuracy"), Metric("eval/f1"), Metric("eval/irregular", "minimize", "d"),
               Metric("eval/irregular_rate", "minimize"), Metric("eval/method_agreement"))

    def __init__(self, tcfg, **kwargs):
        super().__init__(tcfg, **kwargs)
        # raw label (as a string key) -> word, and word -> label index
        self.labels = {str(k): str(v).strip() for k, v in tcfg.labels.items()}
        self.label_keys = list(self.labels)
        self.words = [self.labels[k] for k in self.label_keys]
        self.word_to_index = {w.lower(): i for i, w in enumerate(self.words)}

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a label word ``tokenizer`` encodes to nothing (see ``check_label_word``)."""
        for key, word in self.labels.items():
            answer = self.completion({self.cfg.target: key})
            check_label_word(tokenizer, word, tokenizer(answer, add_special_tokens=False)["input_ids"])

    def label_index(self, record: dict) -> int:
        raw = record[self.cfg.target]
        key = str(int(raw)) if isinstance(raw, float) and raw.is_integer() else str(raw)
        if key not in self.labels:
            raise ConfigError(
                f"label {raw!r} (field '{self.cfg.target}') has no word in task.labels {self.labels}. "
                "Add it, e.g. task.labels='{0: negative, 1: positive}', or map another column with "
                "data.columns.label=<column>."
            )
        return self.label_keys.index(key)

    def target_text(self, record: dict) -> str:
        return self.words[self.label_index(record)]

    def reference(self, record: dict) -> str:
        return self.target_text(record)

    def parse(self, prediction: str) -> int | None:
        """Label index of the prediction's first word, or None for an irregular output."""
        return self.word_to_index.get(first_word(prediction))

    def score(self, predictions: Sequence[str], records: Sequence[dict]) -> tuple[dict, list[dict]]:
        gold = [self.label_index(r) for r in records]
        parsed = [self.parse(p) for p in predictions]
        return self.score_indices(parsed, gold, predictions)

    def score_indices(self, parsed, gold, predictions=None, prefix="eval/") -> tuple[dict, list[dict]]:
        metrics = classification_scores(parsed, gold, num_labels=len(self.words), prefix=prefix)
        irregular = [p for p, idx in zip(predictions or [""] * len(parsed), parsed) if idx is None]
        metrics[f"{prefix}irregular"] = len(irregular)
        metrics[f"{prefix}irregular_rate"] = len(irregular) / max(len(parsed), 1)
        common = Counter(first_word(p) or "<empty>" for p in irregular).most_common(5)
        metrics[f"{prefix}irregular_top"] = ", ".join(f"{w} ({c})" for w, c in common)
        rows = []
        for i, (idx, g) in enumerate(zip(parsed, gold)):
            rows.append({
                "reference": self.words[g],
                "predicted_label": None if idx is None else self.words[idx],
                "correct": idx == g,
                "irregular": idx is None,
            })
        return metrics, rows
