"""Scoring: the model writes named numbers (``Wording: 0.42`` / ``Content: -1.3``) and
the metric compares them with the record's values.

``task.fields`` lists the record fields that hold the numbers (e.g. ``[wording,
content]``). The trained answer writes one line per field, ``<Name>: <value>`` with
the name's first letter upper-cased and the value to two decimals.

Parsing, for each field, case-insensitively:

* the **first** occurrence of ``<name>:`` (or ``<name>=``) decides. A number right
  after it (optionally signed, decimal or exponent; markdown ``**`` around it is
  allowed) is the value; text after the number is ignored.
* if the first occurrence is not followed by a number, the field is a parse
  failure; a later ``<name>:`` line does not rescue it (a model that contradicts or
  repeats itself is not given a second guess, and a second line never overrides
  the first);
* a field that never appears is a parse failure.

Nothing here raises on model output: unparseable text is counted.

Metrics: ``eval/rmse_<field>`` over the rows where that field parsed,
``eval/mcrmse`` (mean column-wise RMSE, the CommonLit competition's metric: the mean
of the per-field RMSEs; null when a field never parsed), ``eval/parse_failure_rate``
(rows where any field failed) and ``eval/parse_failure_rate_<field>``.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from ftexp.errors import ConfigError
from ftexp.tasks.base import Metric, Task

_NUMBER = re.compile(r"[ \t]*(?:\*\*|\*|__)?[ \t]*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)(?![\d.])")


def field_label(name: str) -> str:
    return name[:1].upper() + name[1:]


def _key_pattern(name: str) -> re.Pattern:
    # the name as a whole word, optional markdown emphasis, then ":" or "="
    return re.compile(rf"(?<![\w]){re.escape(name)}(?:\*\*|\*|__)?[ \t]*[:=]", re.IGNORECASE)


def parse_fields(text: str, fields: Sequence[str]) -> dict[str, float | None]:
    """``{field: value or None}`` by first-occurrence semantics (see the module doc)."""
    text = (text or "").replace("\u2212", "-")  # a typographic minus is a minus
    values: dict[str, float | None] = {}
    for name in fields:
        key = _key_pattern(str(name)).search(text)
        value = None
        if key is not None:
            number = _NUMBER.match(text, key.end())
            if number is not None:
                parsed = float(number.group(1))
                value = parsed if math.isfinite(parsed) else None
        values[str(name)] = value
    return values


def rmse(pairs: Sequence[tuple[float, float]]) -> float | None:
    if not pairs:
        return None
    return math.sqrt(sum((p - r) ** 2 for p, r in pairs) / len(pairs))


class ScoringTask(Task):
    kind = "scoring"
    metrics = (Metric("eval/mcrmse", "minimize", ".4f"), Metric("eval/rmse_*", "minimize", ".4f"),
               Metric("eval/parse_failures", "minimize", "d"), Metric("eval/parse_failure_rate*", "minimize"))

    def __init__(self, tcfg, **kwargs):
        super().__init__(tcfg, **kwargs)
        self.fields = [str(f) for f in tcfg.fields or ()]
        if not self.fields:
            raise ConfigError("task.fields is empty: a scoring task needs the fields it parses, "
                              "e.g. task.fields='[wording, content]'.")

    def values(self, record: dict) -> dict[str, float]:
        out = {}
        for name in self.fields:
            if name not in record or record[name] is None:
                found = sorted(k for k in record if not k.startswith("_"))
                raise ConfigError(f"task.fields names {name!r}, which the data does not have. Fields found: "
                                  f"{found}. Map it with data.columns.{name}=<column>.")
            try:
                out[name] = float(record[name])
            except (TypeError, ValueError):
                raise ConfigError(f"field {name!r} holds {record[name]!r}, not a number; task.fields must name "
                                  "numeric columns.") from None
        return out

    def target_text(self, record: dict) -> str:
        return "\n".join(f"{field_label(n)}: {v:.2f}" for n, v in self.values(record).items())

    def reference(self, record: dict) -> str:
        return self.target_text(record)

    def parse(self, prediction: str) -> dict[str, float | None]:
        return parse_fields(prediction, self.fields)

    def score(self, predictions: Sequence[str], records: Sequence[dict]) -> tuple[dict, list[dict]]:
        gold = [self.values(r) for r in records]
        parsed = [self.parse(p) for p in predictions]
        n = max(len(parsed), 1)
        metrics: dict = {}
        rmses = []
        for name in self.fields:
            pairs = [(p[name], g[name]) for p, g in zip(parsed, gold) if p[name] is not None]
            value = rmse(pairs)
            rmses.append(value)
            metrics[f"eval/rmse_{name}"] = value
            metrics[f"eval/parse_failure_rate_{name}"] = (len(parsed) - len(pairs)) / n
        metrics["eval/mcrmse"] = None if any(v is None for v in rmses) else sum(rmses) / len(rmses)
        failures = sum(1 for p in parsed if any(v is None for v in p.values()))
        metrics["eval/parse_failures"] = failures
        metrics["eval/parse_failure_rate"] = failures / n
        rows = []
        for p, g in zip(parsed, gold):
            row = {"parse_failure": any(v is None for v in p.values())}
            for name in self.fields:
                row[f"pred_{name}"] = p[name]
                row[f"ref_{name}"] = g[name]
            rows.append(row)
        return metrics, rows
