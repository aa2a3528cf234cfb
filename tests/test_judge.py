"""LLM-as-judge: ratings 1-5 read from the judge's next-token distribution, per criterion,
for predictions, references and mismatched control pairs; cached so a rerun makes no calls;
a trained run's saved predictions judged without generating them again."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from ftexp import judge, recipes
from ftexp.config import validate
from ftexp.errors import ConfigError

DIALOGSUM = ["data=dialogsum", "task=summarization", "eval.n=4", "train.max_steps=2",
             "task.generation.max_new_tokens=8"]


def test_a_derangement_moves_every_index_and_is_seeded():
    for n in (2, 3, 10, 50):
        perm = judge.derangement(n, seed=1)
        assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))
    assert judge.derangement(20, 3) == judge.derangement(20, 3) != judge.derangement(20, 4)


def test_the_bootstrap_interval_holds_the_mean_and_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 20), rng.normal(1.0, 1.0, 2000)
    lo, hi = judge.bootstrap_interval(small, 0)
    assert lo < small.mean() < hi
    lo2, hi2 = judge.bootstrap_interval(large, 0)
    assert hi2 - lo2 < (hi - lo) / 4 and lo2 < 1.0 < hi2


def test_judge_settings_are_checked_before_anything_loads():
    with pytest.raises(ConfigError, match="rates summaries"):
        validate(compose_cfg(["judge=hf"]))
    with pytest.raises(ConfigError, match=r"needs both \{source\} and \{summary\}"):
        validate(compose_cfg([*DIALOGSUM, "judge=hf", "judge.criteria.relevance=rate it"]))
    with pytest.raises(ConfigError, match="random-weight model"):
        judge.judge_model_config("tiny")
    with pytest.raises(ConfigError, match="Presets:"):
        judge.judge_model_config("no_such_judge")


@pytest.fixture(scope="module")
def dialogsum_run(tmp_path_factory, shared_data_module):
    out = tmp_path_factory.mktemp("dialogsum_run")
    recipes.finetune(compose_cfg([*DIALOGSUM, f"data.path={shared_data_module / 'dialogsum'}"], out))
    return out


@pytest.fixture(scope="module")
def shared_data_module():
    from conftest import SHARED_DATA

    if not SHARED_DATA.exists():
        pytest.skip("real datasets (shared/data beside the repository) are not present")
    return SHARED_DATA


def test_a_runs_predictions_are_judged_without_generating_again_and_a_rerun_makes_no_calls(dialogsum_run, tmp_path):
    # the tiny run's own random-weight base stands in for a judge model: the mechanics, not the verdicts
    over = ["judge=hf", f"judge.model={dialogsum_run / 'base_model'}", "judge.references=true", "judge.control=true",
            f"cache_dir={tmp_path / 'cache'}"]
    saved = [json.loads(line) for line in (dialogsum_run / "predictions.jsonl").read_text().splitlines()]
    first = recipes.evaluate_only(compose_cfg([f"run={dialogsum_run}", *over], tmp_path / "first"),
                                  overrides=["run", "judge", "judge.model", "judge.references", "judge.control", "cache_dir"])
    criteria = ["relevance", "coherence", "consistency", "fluency"]
    for c in criteria:
        for key in (f"judge/{c}", f"judge/reference_{c}"):
            assert 1.0 <= first[key] <= 5.0, key
        assert first[f"judge/control_gap_{c}_lo"] <= first[f"judge/control_gap_{c}"] <= first[f"judge/control_gap_{c}_hi"]
    assert first["judge/n"] == 4 and first["judge/unparsed"] == 0
    assert first["judge/requests"] == 4 * 4 * 3 and first["judge/cache_hits"] == 0  # predictions, references, controls
    assert first["eval/rougeL"] == json.loads((dialogsum_run / "metrics.json").read_text())["eval/rougeL"]
    rows = [json.loads(line) for line in (tmp_path / "first" / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in saved]  # not generated again
    assert set(rows[0]["judge"]) == set(criteria) and set(rows[0]["judge_reference"]) == set(criteria)
    assert all(1 <= v <= 5 for v in rows[0]["judge_argmax"].values())

    again = recipes.evaluate_only(compose_cfg([f"run={dialogsum_run}", *over], tmp_path / "again"),
                                  overrides=["run", "judge", "judge.model", "judge.references", "judge.control", "cache_dir"])
    assert again["judge/requests"] == 0 and again["judge/cache_hits"] == 48
    assert all(again[k] == pytest.approx(v) for k, v in first.items() if k.startswith("judge/") and "requests" not in k
               and "cache_hits" not in k)


def test_the_score_is_the_expectation_of_the_five_ratings(dialogsum_run):
    """Σ p(s)·s over the ratings 1..5, renormalised over those five, and the argmax beside it."""
    cfg = compose_cfg([*DIALOGSUM, "judge=hf", f"judge.model={dialogsum_run / 'base_model'}", "cache_dir=null"])
    j = judge.LocalJudge(cfg.judge, None, "cpu")
    prompt = str(cfg.judge.criteria.fluency)
    got = j.rate(prompt, [("#Person1#: Hi.\n#Person2#: Hello.", "Two people greet.")])[0]
    text = j.prompt(prompt, "#Person1#: Hi.\n#Person2#: Hello.", "Two people greet.")
    ids = j.tokenizer(text)["input_ids"]
    with torch.no_grad():
        logp = []
        for r in judge.RATINGS:
            whole = j.tokenizer(text + r)["input_ids"]
            k = next((n for n, (a, b) in enumerate(zip(ids, whole)) if a != b), len(ids))
            out = torch.log_softmax(j.model(torch.tensor([whole])).logits[0].float(), -1)
            logp.append(sum(out[t - 1, whole[t]].item() for t in range(k, len(whole))))
    p = torch.softmax(torch.tensor(logp), 0)
    assert got["score"] == pytest.approx(float((p * torch.arange(1, 6)).sum()), abs=1e-4)
    assert got["argmax"] == int(p.argmax()) + 1 and sum(got["probs"]) == pytest.approx(1.0, abs=1e-3)


def test_the_sweep_table_shows_judge_columns_when_runs_have_them():
    from pathlib import Path

    from ftexp.report import Cell, RunFolder, metric_columns

    run = RunFolder(path=Path("."), config={"task.kind": "summarization"}, failure=None,
              metrics={"eval/rougeL": 0.1, "judge/fluency": 3.2, "judge/reference_fluency": 4.0,
                       "judge/fluency_argmax": 3.0, "judge/requests": 5, "judge/control_gap_fluency": 0.3})
    cols = metric_columns([Cell(values={}, runs=[run])], "eval/rougeL")
    assert ("Judge fluency", "judge/fluency") in cols and ("Judge reference fluency", "judge/reference_fluency") in cols
    assert not any(key in ("judge/requests", "judge/fluency_argmax", "judge/control_gap_fluency") for _, key in cols)
    plain = RunFolder(path=Path("."), config={"task.kind": "summarization"}, failure=None, metrics={"eval/rougeL": 0.1})
    assert not any(key.startswith("judge/") for _, key in metric_columns([Cell(values={}, runs=[plain])], None))
