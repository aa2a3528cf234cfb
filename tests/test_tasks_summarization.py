"""Summarization: prompts, references from several fields, ROUGE that rouge_score
reproduces from the prediction rows, and the DialogSum preset on the real files."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from conftest import compose_cfg
from ftexp import data as data_mod
from ftexp.errors import ConfigError
from ftexp.tasks import build_task
from ftexp.tasks.summarization import ROUGE_TYPES


def _task(overrides=()):
    cfg = compose_cfg(["task=summarization", *overrides], fast=False)
    return build_task(cfg.task), cfg


def test_prompt_and_completion_follow_the_dialogue_summary_template():
    task, cfg = _task()
    rec = {"dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "Two people greet."}
    assert task.prompt(rec) == "Summarize the following conversation.\n\n#Person1#: Hi.\n#Person2#: Hello.\n\nSummary:"
    assert task.completion(rec) == " Two people greet."
    assert cfg.objective == "eval/rougeL"


def test_references_are_every_reference_field_the_record_has():
    task, _ = _task()
    assert task.references({"summary": "a"}) == ["a"]
    test_row = {"summary1": "one", "summary2": "two", "summary3": "one"}  # duplicates dropped
    assert task.references(test_row) == ["one", "two"]
    assert task.target_text(test_row) == "one"  # no `summary`: the first reference stands in
    with pytest.raises(ConfigError, match="summary1"):
        task.references({"dialogue": "x"})


def test_scores_take_the_best_reference_and_rouge_score_recomputes_them_from_the_rows():
    task, _ = _task()
    records = [
        {"summary1": "the weather is cold", "summary2": "bob will call alice tomorrow"},
        {"summary": "they plan a trip to the sea"},
        {"summary": "nothing happened"},
    ]
    preds = ["bob calls alice tomorrow", "a trip to the sea is planned", ""]
    metrics, rows = task.score(preds, records)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    for t in ROUGE_TYPES:
        recomputed = [scorer.score_multi(row["references"], p)[t].fmeasure for row, p in zip(rows, preds)]
        assert [row[t] for row in rows] == pytest.approx(recomputed)
        assert metrics[f"eval/{t}"] == pytest.approx(sum(recomputed) / 3)
    # the first example is scored against its second reference, the one it paraphrases
    best = scorer.score("bob will call alice tomorrow", preds[0])["rouge1"].fmeasure
    assert rows[0]["rouge1"] == pytest.approx(best)
    assert metrics["eval/empty"] == 1


def test_dialogsum_preset_trains_on_dev_and_evaluates_on_test_with_three_references(shared_data):
    cfg = compose_cfg(["data=dialogsum", f"data.path={shared_data / 'dialogsum'}", "task=summarization"], fast=False)
    splits = data_mod.load_splits(cfg.data)
    assert len(splits["train"]) == 500 and len(splits["eval"]) == 500
    task = build_task(cfg.task)
    assert all(len(task.references(dict(r))) >= 2 for r in splits["eval"].select(range(50)))
    assert task.completion(dict(splits["train"][0])).strip() == splits["train"][0]["summary"].strip()
    assert cfg.train.max_length >= 768  # long dialogues keep their summary in the training window
