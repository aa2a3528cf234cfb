"""QA: exact match / token F1 on hand-computed cases, the error breakdown, the
Alpaca with/without-input prompts, and the Lamini docs preset on the real file."""

from __future__ import annotations

import pytest

from conftest import compose_cfg
from ftexp import data as data_mod
from ftexp.tasks import build_task
from ftexp.tasks.qa import is_repetitive, is_too_long


def _task(overrides=()):
    cfg = compose_cfg(["task=qa", *overrides], fast=False)
    return build_task(cfg.task)


def test_exact_match_token_f1_and_error_breakdown():
    task = _task()
    records = [{"question": "q", "answer": "Lamini is a library."},
               {"question": "q", "answer": "cat sat"},
               {"question": "q", "answer": "yes"},
               {"question": "q", "answer": "use the api"},
               {"question": "q", "answer": "short answer"}]
    preds = ["lamini is a library",            # exact after normalisation
             "the cat sat down",              # F1: P 2/3, R 1 -> 0.8
             "   ",                           # empty
             "use it use it use it use it",   # repetitive ("use it use" x3)
             "one two three four five six seven"]  # 7 words > 3 x 2: too long
    metrics, rows = task.score(preds, records)
    assert [r["exact_match"] for r in rows] == [True, False, False, False, False]
    assert rows[1]["token_f1"] == pytest.approx(0.8)
    assert metrics["eval/exact_match"] == pytest.approx(1 / 5)
    assert metrics["eval/token_f1"] == pytest.approx((1 + 0.8 + 0 + rows[3]["token_f1"] + 0) / 5)
    assert [r["empty"] for r in rows] == [False, False, True, False, False]
    assert [r["repetitive"] for r in rows] == [False, False, False, True, False]
    assert [r["too_long"] for r in rows] == [False, False, False, False, True]  # 8 words <= 3 x 3
    assert metrics["eval/empty"] == 1 and metrics["eval/repetitive"] == 1 and metrics["eval/too_long"] == 1
    assert metrics["eval/too_long_rate"] == pytest.approx(1 / 5)
    assert [r["wrong"] for r in rows] == [False, True, False, False, False]  # well-formed, not exact
    assert metrics["eval/wrong"] == 1


def test_error_rules():
    assert is_repetitive("the the the the the")
    assert not is_repetitive("lamini can be used to train a model and lamini can be used to run it")
    assert is_too_long("a b c d e f g", ["a b"], 3.0) and not is_too_long("a b c d e f", ["a b"], 3.0)
    assert is_too_long("a b", [""], 1.0)  # an empty reference counts as one word


def test_alpaca_picks_the_no_input_prompt_when_input_is_empty():
    task = _task(["task=alpaca"])
    with_input = task.prompt({"instruction": "Translate.", "input": "Hallo", "output": "Hello"})
    without = task.prompt({"instruction": "Name a colour.", "input": "", "output": "Blue"})
    assert "### Input:\nHallo" in with_input and "paired with an input" in with_input
    assert "### Input" not in without and without.endswith("### Instruction:\nName a colour.\n\n### Response:")
    assert task.completion({"instruction": "x", "input": "", "output": "Blue"}) == "\nBlue"
    shots = [{"instruction": "Name a colour.", "input": "", "output": "Blue"}]
    prompt = task.prompt({"instruction": "Translate.", "input": "Hallo", "output": "Hello"}, shots)
    assert "### Instruction:\nName a colour.\n\n### Response:\nBlue\n\n" in prompt


def test_lamini_docs_preset_carves_a_seeded_tenth_for_evaluation(shared_data):
    path = shared_data / "lamini_docs" / "lamini_docs.jsonl"
    cfg = compose_cfg(["data=lamini_docs", f"data.path={path}", "task=qa"], fast=False)
    splits = data_mod.load_splits(cfg.data)
    assert (len(splits["train"]), len(splits["eval"])) == (1260, 140)
    again = data_mod.load_splits(cfg.data)
    assert again["eval"]["question"] == splits["eval"]["question"]
    task = build_task(cfg.task)
    rec = dict(splits["eval"][0])
    assert task.prompt(rec) == rec["question"] and rec["question"].startswith("### Question:")
