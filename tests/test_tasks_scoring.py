"""Scoring: named numbers parsed from messy generated text (first occurrence
decides), RMSE / MCRMSE / parse-failure rate, and the CommonLit two-file loader."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from conftest import compose_cfg
from ftexp import data as data_mod
from ftexp.errors import ConfigError
from ftexp.tasks import build_task
from ftexp.tasks.scoring import parse_fields

FIELDS = ["wording", "content"]


@pytest.mark.parametrize("text, expected", [
    ("Wording: 0.5\nContent: -1.25", {"wording": 0.5, "content": -1.25}),
    # extra text after the numbers
    ("Wording: 0.5 because the phrasing is fine.\nContent: 2. Overall good!", {"wording": 0.5, "content": 2.0}),
    # a missing field
    ("Wording: 1.0\nThat is all.", {"wording": 1.0, "content": None}),
    # a non-number
    ("Wording: high\nContent: 3", {"wording": None, "content": 3.0}),
    # a second "Wording:" line never overrides the first ...
    ("Wording: 1\nContent: 2\nWording: 3", {"wording": 1.0, "content": 2.0}),
    # ... nor rescues a first one that is not a number
    ("Wording: n/a\nWording: 2\nContent: 0", {"wording": None, "content": 0.0}),
    # case, markdown emphasis, "=", exponent, typographic minus
    ("**wording:** 1.5 / CONTENT = \u22125e-1", {"wording": 1.5, "content": -0.5}),
    # a longer word containing the name is not the name
    ("Rewording: 4 content: 7", {"wording": None, "content": 7.0}),
    ("Wording: 1.2.3\nContent: .5", {"wording": None, "content": 0.5}),
    ("", {"wording": None, "content": None}),
])
def test_parser_on_messy_outputs(text, expected):
    assert parse_fields(text, FIELDS) == expected


def _task():
    cfg = compose_cfg(["task=scoring"], fast=False)
    return build_task(cfg.task), cfg


def test_target_text_round_trips_through_the_parser():
    task, cfg = _task()
    rec = {"prompt_title": "T", "prompt_question": "Q", "text": "S", "wording": -0.3812, "content": 1.2}
    assert task.completion(rec) == " Wording: -0.38\nContent: 1.20"
    assert task.parse(task.completion(rec)) == {"wording": -0.38, "content": 1.2}
    assert cfg.objective == "eval/mcrmse"


def test_rmse_mcrmse_and_parse_failures_never_crash():
    task, _ = _task()
    records = [{"wording": 0.0, "content": 1.0}, {"wording": 1.0, "content": 0.0},
               {"wording": 2.0, "content": 2.0}, {"wording": 0.0, "content": 0.0}]
    preds = ["Wording: 1\nContent: 1",      # errors 1, 0
             "Wording: 1 Content: 2",       # errors 0, 2
             "I cannot score this.",        # both fields fail
             "Content: -1\nWording: zero"]  # wording fails; content error 1
    metrics, rows = task.score(preds, records)
    assert metrics["eval/rmse_wording"] == pytest.approx(math.sqrt((1 + 0) / 2))
    assert metrics["eval/rmse_content"] == pytest.approx(math.sqrt((0 + 4 + 1) / 3))
    assert metrics["eval/mcrmse"] == pytest.approx((math.sqrt(0.5) + math.sqrt(5 / 3)) / 2)
    assert metrics["eval/parse_failure_rate"] == pytest.approx(2 / 4)
    assert metrics["eval/parse_failure_rate_wording"] == pytest.approx(2 / 4)
    assert metrics["eval/parse_failure_rate_content"] == pytest.approx(1 / 4)
    assert [r["parse_failure"] for r in rows] == [False, False, True, True]
    assert rows[3]["pred_content"] == -1.0 and rows[3]["pred_wording"] is None
    # nothing parses: metrics are null, still no exception
    metrics, _ = task.score(["??"] * 4, records)
    assert metrics["eval/mcrmse"] is None and metrics["eval/parse_failure_rate"] == 1.0


def test_scoring_needs_fields_and_numeric_references():
    cfg = compose_cfg(["task=scoring", "task.fields=[]"], fast=False)
    with pytest.raises(ConfigError, match="task.fields"):
        build_task(cfg.task)
    task, _ = _task()
    with pytest.raises(ConfigError, match="content"):
        task.score(["Wording: 1"], [{"wording": 1.0}])


def test_commonlit_loader_merges_prompts_and_summaries_and_splits_nine_to_one(tmp_path):
    pd.DataFrame({"prompt_id": ["p1", "p2"], "prompt_question": ["Q1", "Q2"], "prompt_title": ["T1", "T2"],
                  "prompt_text": ["X1", "X2"]}).to_csv(tmp_path / "prompts_train.csv", index=False)
    pd.DataFrame({"student_id": [f"s{i}" for i in range(40)], "prompt_id": ["p1", "p2"] * 20,
                  "text": [f"summary {i}" for i in range(40)], "content": [i / 10 for i in range(40)],
                  "wording": [-i / 10 for i in range(40)]}).to_csv(tmp_path / "summaries_train.csv", index=False)
    cfg = compose_cfg(["data=commonlit", f"data.path={tmp_path}", "task=scoring"], fast=False)
    splits = data_mod.load_splits(cfg.data)
    assert (len(splits["train"]), len(splits["eval"])) == (36, 4)
    rows = [dict(r) for r in splits["train"]] + [dict(r) for r in splits["eval"]]
    assert all(r["prompt_title"] == {"p1": "T1", "p2": "T2"}[r["prompt_id"]] for r in rows)
    assert sorted(r["student_id"] for r in rows) == sorted(f"s{i}" for i in range(40))
    assert data_mod.load_splits(cfg.data)["eval"]["student_id"] == splits["eval"]["student_id"]  # fixed seed
    task = build_task(cfg.task)
    assert "Title: T" in task.prompt(rows[0]) and task.completion(rows[0]).startswith(" Wording: ")
    (tmp_path / "prompts_train.csv").unlink()
    with pytest.raises(ConfigError, match="prompts_train.csv"):
        data_mod.load_splits(cfg.data)
