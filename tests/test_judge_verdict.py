"""The judge's validity verdict: per criterion, the control gap's 95% interval must lie above
0 (a reference rated higher with its own conversation than with another one) and the
references must rate at least as high as the zero-shot summaries. Judges with known
behaviour stand in for a model, so each verdict is known in advance."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import compose_cfg
from ftexp import judge, records
from ftexp.config import validate
from ftexp.errors import ConfigError
from ftexp.report import Cell, RunFolder, Table, metric_columns
from ftexp.tasks import build_task

CRITERIA = ("relevance", "coherence", "consistency", "fluency")
NAMES = ["Amy", "Bob", "Carl", "Dora", "Ed", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu"]


class ScriptedJudge:
    """Rates a (source, summary) pair by a rule instead of a model; counts like a real judge."""

    def __init__(self, rule):
        self.rule, self.failed, self.requests, self.cache_hits = rule, 0, 0, 0

    def rate(self, criterion_prompt, pairs, label=""):
        self.requests += len(pairs)
        return [{"score": float(s), "argmax": round(s)} for s in (self.rule(src, summ) for src, summ in pairs)]


def reads_the_conversation(source: str, summary: str) -> float:
    """5 when the summary's person is in the conversation, 1 when not: a judge that can tell."""
    return 5.0 if summary.split()[0] in source else 1.0


def examples(n: int = 12) -> tuple[list[dict], list[dict]]:
    recs = [{"dialogue": f"#Person1#: I am {name}. #Person2#: Hi {name}, lunch at {i}?",
             "summary1": f"{name} is asked to lunch at {i}."} for i, name in enumerate(NAMES[:n])]
    rows = [{"prediction": f"{name} talks.", "references": [r["summary1"]]} for name, r in zip(NAMES, recs)]
    return recs, rows


def judged(monkeypatch, rule, *extra: str, rows=None) -> dict:
    cfg = compose_cfg(["data=dialogsum", "task=summarization", "judge=hf", "judge.model=smollm2_135m_gguf",
                       "judge.references=true", "judge.control=true", *extra])
    monkeypatch.setattr(judge, "make_judge", lambda *a, **k: ScriptedJudge(rule))
    recs, own = examples()
    return judge.judge_predictions(cfg, build_task(cfg.task), recs, rows or own, "cpu")


def test_the_rule_needs_both_a_gap_above_zero_and_references_not_below_zero_shot():
    assert judge.judge_is_valid(0.2, 4.0, 3.0)
    assert judge.judge_is_valid(0.2, 3.0, 3.0)  # "at least as high"
    assert not judge.judge_is_valid(0.0, 4.0, 3.0)  # the interval touches 0
    assert not judge.judge_is_valid(-0.1, 4.0, 3.0)
    assert not judge.judge_is_valid(0.5, 2.9, 3.0)  # references below the zero-shot summaries
    assert not judge.judge_is_valid(math.nan, 4.0, 3.0) and not judge.judge_is_valid(0.5, math.nan, 3.0)


def test_a_judge_that_reads_the_conversation_is_valid_for_every_criterion(monkeypatch):
    got = judged(monkeypatch, reads_the_conversation)
    for c in CRITERIA:
        assert got[f"judge/control_gap_{c}"] == 4.0 and got[f"judge/control_gap_{c}_lo"] > 0
        assert got[f"judge/valid_{c}"] == 1
    assert got["judge/valid_against"] == "predictions"
    line = records.result_row(got, "eval/rougeL", CRITERIA)
    assert "judge valid for relevance, coherence, consistency, fluency" in line and "INVALID" not in line


def test_a_judge_forced_to_rate_constantly_is_invalid_for_every_criterion(monkeypatch):
    got = judged(monkeypatch, lambda source, summary: 3.0)
    for c in CRITERIA:
        assert got[f"judge/control_gap_{c}"] == 0 and got[f"judge/control_gap_{c}_lo"] == 0
        assert got[f"judge/valid_{c}"] == 0
    assert "judge valid for no criterion, INVALID for relevance, coherence, consistency, fluency" in \
        records.result_row(got, "eval/rougeL", CRITERIA)


def test_a_gap_is_not_enough_when_the_judge_rates_the_references_below_the_zero_shot_summaries(monkeypatch, tmp_path):
    # it tells true pairs from mismatched ones, but prefers anything that says "talks" to the human references
    def likes_talk(source: str, summary: str) -> float:
        return 5.0 if "talks" in summary else reads_the_conversation(source, summary) - 1.0
    recs, rows = examples()
    baseline = tmp_path / "zero_shot"
    baseline.mkdir()
    records.write_predictions(rows, baseline)
    trained = [{**r, "prediction": recs[i]["summary1"]} for i, r in enumerate(rows)]  # as good as the references
    got = judged(monkeypatch, likes_talk, f"judge.baseline={baseline}", rows=trained)
    assert got["judge/baseline_fluency"] == 5.0 and got["judge/fluency"] == 4.0 and got["judge/control_gap_fluency_lo"] > 0
    assert all(got[f"judge/valid_{c}"] == 0 for c in CRITERIA) and got["judge/valid_against"] == str(baseline)
    # without the baseline the same judge holds the references against this run's own summaries and passes
    assert all(judged(monkeypatch, likes_talk, rows=trained)[f"judge/valid_{c}"] == 1 for c in CRITERIA)


def test_a_baseline_of_other_examples_or_without_predictions_is_refused(monkeypatch, tmp_path):
    recs, rows = examples()
    other = tmp_path / "other"
    other.mkdir()
    records.write_predictions([{**r, "references": ["something else"]} for r in rows], other)
    with pytest.raises(ConfigError, match="another example than this run's"):
        judged(monkeypatch, reads_the_conversation, f"judge.baseline={other}")
    records.write_predictions(rows[:3], other)
    with pytest.raises(ConfigError, match="holds 3 predictions, and 12 are judged"):
        judged(monkeypatch, reads_the_conversation, f"judge.baseline={other}")
    with pytest.raises(ConfigError, match="judge.baseline=.*no predictions.jsonl there"):
        validate(compose_cfg(["data=dialogsum", "task=summarization", "judge=hf", "judge.model=smollm2_135m_gguf",
                              f"judge.baseline={tmp_path / 'missing'}"]))


def test_the_report_shows_the_verdict_and_keeps_it_out_of_the_rating_columns(tmp_path):
    metrics = {"eval/rougeL": 0.2, "judge/n": 12, "judge/fluency": 3.1, "judge/coherence": 3.0,
               "judge/valid_fluency": 1, "judge/valid_coherence": 0, "judge/valid_against": "predictions"}
    run = RunFolder(path=Path("."), config={"task.kind": "summarization"}, failure=None, metrics=metrics)
    assert not any("valid" in key for _, key in metric_columns([Cell(values={}, runs=[run])], "eval/rougeL"))
    folder = tmp_path / "sweep" / "0"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("task:\n  kind: summarization\nobjective: eval/rougeL\n")
    (folder / "metrics.json").write_text(json.dumps(metrics))
    shown = Table(tmp_path / "sweep").shown()
    assert list(shown["Judge verdict"]) == ["INVALID for coherence"]
    (folder / "metrics.json").write_text(json.dumps({**metrics, "judge/valid_coherence": 1}))
    assert list(Table(tmp_path / "sweep").shown()["Judge verdict"]) == ["valid"]
