"""Task kinds: prompt formatting, output parsing and metrics, one module each.

``build_task(cfg.task, tokenizer=...)`` returns the Task for ``task.kind``.
"""

from __future__ import annotations

import re

from ftexp.config import TASK_KINDS
from ftexp.errors import ConfigError
from ftexp.tasks.base import JUDGE_METRICS, RUN_METRICS, Metric
from ftexp.tasks.classification import ClassificationTask
from ftexp.tasks.qa import QATask
from ftexp.tasks.scoring import ScoringTask
from ftexp.tasks.summarization import SummarizationTask

KINDS = {cls.kind: cls for cls in (ClassificationTask, SummarizationTask, QATask, ScoringTask)}


def build_task(tcfg, *, tokenizer=None, use_chat_template=None):
    if tcfg.kind not in KINDS:
        raise ConfigError(f"task.kind={tcfg.kind!r}; valid: {', '.join(TASK_KINDS)}")
    return KINDS[tcfg.kind](tcfg, tokenizer=tokenizer, use_chat_template=use_chat_template)


def corpus(cfg, pool) -> list[str]:
    """Texts a tiny model's tokenizer is trained on: the formatted train split ``pool`` (labels
    included), up to model.tiny.tokenizer_max_texts rows, and the system prompt."""
    task = build_task(cfg.task)
    rows = pool.select(range(min(len(pool), cfg.model.tiny.tokenizer_max_texts)))
    texts = [pair["prompt"] + pair["completion"] for pair in map(task.to_prompt_completion, rows)]
    if cfg.task.system_prompt:
        texts.append(cfg.task.system_prompt)
    return texts


def declared_metrics(kind: str | None = None) -> tuple[Metric, ...]:
    """The metrics a run of task ``kind`` may write (every kind's when None)."""
    kinds = [KINDS[kind]] if kind in KINDS else list(KINDS.values())
    return tuple(m for cls in kinds for m in cls.metrics) + RUN_METRICS + JUDGE_METRICS


def metric(name: str, kind: str | None = None) -> Metric:
    """The declared metric ``name`` (eval/likelihood_accuracy is eval/accuracy scored by
    likelihood); a ConfigError that lists the valid names when there is none."""
    base = re.sub(r"^eval/(likelihood|generate)_", "eval/", name)
    found = next((m for m in declared_metrics(kind) if m.matches(base)), None)
    if found is None:
        names = ", ".join(m.name for m in declared_metrics(kind) if not m.name.startswith("judge/"))
        raise ConfigError(f"objective={name} is not a metric {'a ' + kind + ' run' if kind else 'ftexp'} writes. "
                          f"Valid: {names}, judge/<criterion> (with a judge).")
    return found


def metric_direction(name: str, kind: str | None = None) -> str:
    return metric(name, kind).direction
