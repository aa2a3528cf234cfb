"""The task and data presets for the studies compose with the typed schema, say what
they are for and how to run them, and give each task its own objective."""

from __future__ import annotations

import pytest

from conftest import compose_cfg

PAIRS = [
    ("dialogsum", "summarization", "eval/rougeL"),
    ("samsum", "summarization", "eval/rougeL"),
    ("lamini_docs", "qa", "eval/token_f1"),
    ("lamini_docs", "qa_instruct", "eval/token_f1"),
    ("alpaca", "alpaca", "eval/token_f1"),
    ("commonlit", "scoring", "eval/mcrmse"),
    ("sst2", "sentiment", "eval/accuracy"),
]


@pytest.mark.parametrize("data, task, objective", PAIRS)
def test_presets_compose_and_pick_the_task_objective(data, task, objective):
    cfg = compose_cfg([f"data={data}", f"task={task}", "eval.shots=2", "eval.method=generate"], fast=False)
    assert cfg.data.name == data and cfg.task.name == task
    assert cfg.objective == objective
    # an explicit objective still wins
    cfg = compose_cfg([f"data={data}", f"task={task}", "objective=eval/n"], fast=False)
    assert cfg.objective == "eval/n"
