"""Task kinds: prompt formatting, output parsing and metrics, one module each.

``build_task(cfg.task, tokenizer=...)`` returns the Task for ``task.kind``.
"""

from __future__ import annotations

from ftexp.config import ConfigError, TASK_KINDS


def build_task(tcfg, *, tokenizer=None, use_chat_template=None):
    kind = tcfg.kind
    if kind == "classification":
        from ftexp.tasks.classification import ClassificationTask as cls
    elif kind == "summarization":
        from ftexp.tasks.summarization import SummarizationTask as cls
    elif kind == "qa":
        from ftexp.tasks.qa import QATask as cls
    elif kind == "scoring":
        from ftexp.tasks.scoring import ScoringTask as cls
    else:
        raise ConfigError(f"task.kind={kind!r}; valid: {', '.join(TASK_KINDS)}")
    return cls(tcfg, tokenizer=tokenizer, use_chat_template=use_chat_template)
