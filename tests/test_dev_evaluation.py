"""Evaluation during training (train.eval_every) on rows held out of the training split, and early
stopping on it: what is scored, where it is written, and that it leaves the training untouched."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from conftest import compose_cfg
from ftexp import data, recipes
from ftexp.errors import ConfigError

TIMINGS = ("runtime", "per_s", "per_second", "mfu", "peak_flops", "prep_s", "peak_memory")


def _log(folder, kind):
    rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMINGS)} for r in rows
            if (kind == "eval") == any(k.startswith("eval_") for k in r)]


def test_held_out_rows_are_never_among_any_nested_training_subset():
    split = Dataset.from_dict({"i": list(range(100))})
    dev = set(data.held_out(split, 20, seed=3, train_n=80, key="train.eval_n")["i"])
    assert len(dev) == 20
    for n in (10, 50, 80):
        assert not dev & set(data.subset(split, n, seed=3, key="train.n")["i"])
    with pytest.raises(ConfigError, match=r"train.eval_n=20 rows are held out .*at most 80"):
        data.held_out(split, 20, seed=3, train_n=81, key="train.eval_n")
    with pytest.raises(ConfigError, match="train.n=null takes 100"):
        data.held_out(split, 20, seed=3, train_n=None, key="train.eval_n")


def test_the_objective_is_scored_on_held_out_rows_at_every_kth_step_and_summarised(tmp_path):
    metrics = recipes.finetune(compose_cfg(["train.n=32", "train.eval_every=2", "train.eval_n=12"], tmp_path))
    evals = _log(tmp_path, "eval")
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval_dev_n"] == 12 and 0 <= r["eval_dev_accuracy"] <= 1 and "eval_dev_f1" in r for r in evals)
    best = max(evals, key=lambda r: r["eval_dev_accuracy"])
    assert metrics["train/dev_evaluations"] == 2 and metrics["train/dev_n"] == 12
    assert metrics["train/dev_best_accuracy"] == best["eval_dev_accuracy"]
    assert metrics["train/dev_last_accuracy"] == evals[-1]["eval_dev_accuracy"]
    assert metrics["eval/n"] == 16  # the final evaluation is on the eval split, as before


def test_evaluating_during_training_leaves_the_training_as_it_was(tmp_path):
    # LoRA dropout reads the RNG at every step, and generation reseeds it: evaluation must not move it
    base = ["lora=default", "train.n=32", "train.max_steps=6"]
    plain = recipes.finetune(compose_cfg(base, tmp_path / "plain"))
    watched = recipes.finetune(compose_cfg([*base, "train.eval_every=2", "train.eval_n=8"], tmp_path / "watched"))
    assert _log(tmp_path / "watched", "train") == _log(tmp_path / "plain", "train")
    assert watched["eval/accuracy"] == plain["eval/accuracy"] and watched["train/loss_mean"] == plain[
        "train/loss_mean"]


def test_early_stopping_stops_when_the_objective_no_longer_improves(tmp_path):
    # at this learning rate nothing is learned: every evaluation equals the first, so patience 1 ends
    # the run at the second evaluation
    metrics = recipes.finetune(compose_cfg(["train.n=32", "train.max_steps=12", "train.learning_rate=1e-9",
                                            "train.eval_every=2", "train.eval_n=8",
                                            "train.early_stopping.patience=1"], tmp_path))
    assert metrics["train/early_stopped"] == 1
    assert metrics["train/stopped_at_step"] == 4 == metrics["train/steps"]
    assert metrics["train/dev_best_step"] == 2 and metrics["train/dev_evaluations"] == 2
    assert [r["step"] for r in _log(tmp_path, "eval")] == [2, 4]
    assert json.loads((tmp_path / "metrics.json").read_text())["train/early_stopped"] == 1
