"""evaluate.py / evaluate_only: a base model zero- or k-shot, and a trained run
(full fine-tune or adapter) re-evaluated with eval overrides, writing its own
metrics.json and predictions.jsonl and never touching the run's files."""

from __future__ import annotations

import json
import shutil

import pytest
from omegaconf import open_dict

from conftest import compose_cfg, run_script
from ftexp import evaluation, recipes
from ftexp.cli import quote_paths
from ftexp.errors import ConfigError


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory):
    """Two finished tiny runs: a full fine-tune (model/) and a LoRA run (adapter/)."""
    runs = {}
    for kind, extra in (("full", []), ("lora", ["lora=default"])):
        out = tmp_path_factory.mktemp(f"run_{kind}")
        cfg = compose_cfg([*extra, "train.max_steps=3", "eval.n=8"], out)
        recipes.finetune(cfg)
        runs[kind] = out
    return runs


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_base_model_k_shot_baseline_writes_its_own_records(tmp_path):
    cfg = compose_cfg(["eval.n=6", "eval.shots=2"], tmp_path)
    metrics = recipes.evaluate_only(cfg)
    assert metrics["eval/shots"] == 2 and metrics["eval/n"] == 6
    for key in ("eval/accuracy", "eval/f1", "eval/irregular", "eval/runtime_s"):
        assert key in metrics
    assert json.loads((tmp_path / "metrics.json").read_text())["eval/n"] == 6
    rows = _lines(tmp_path / "predictions.jsonl")
    assert len(rows) == 6 and {"input", "reference", "prediction", "correct", "irregular"} <= set(rows[0])
    assert rows[0]["input"].count("Review: ") == 3  # two solved examples + the question
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "base_model" / "config.json").exists()


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_trained_run_is_re_evaluated_with_eval_overrides_only(trained_runs, tmp_path, kind):
    run = trained_runs[kind]
    before = (run / "metrics.json").read_text()
    cfg = compose_cfg(["eval.n=4", "eval.method=both", f"+run={run}"], tmp_path / "eval")
    with open_dict(cfg):
        cfg.run = str(run)
    metrics = recipes.evaluate_only(cfg, overrides=["eval.n", "eval.method", "run"])
    assert metrics["eval/n"] == 4 and "eval/method_agreement" in metrics
    assert (tmp_path / "eval" / "metrics.json").exists()
    assert len(_lines(tmp_path / "eval" / "predictions.jsonl")) == 4
    assert (run / "metrics.json").read_text() == before  # the run's own records are untouched
    # the evaluation used the run's model: same predictions as the run's own evaluation for those rows
    own = {r["input"]: r["prediction"] for r in _lines(run / "predictions.jsonl")}
    again = _lines(tmp_path / "eval" / "predictions.jsonl")
    assert any(r["input"] in own for r in again)
    assert all(own[r["input"]] == r["prediction"] for r in again if r["input"] in own)


def test_run_overrides_that_change_the_trained_setup_are_refused(trained_runs, tmp_path):
    cfg = compose_cfg([f"+run={trained_runs['full']}"], tmp_path)
    with pytest.raises(ConfigError, match="model"):
        evaluation.eval_config(cfg, overrides=["model", "eval.n"])
    with pytest.raises(ConfigError, match="train.learning_rate"):
        evaluation.eval_config(cfg, overrides=["train.learning_rate"])
    with open_dict(cfg):
        cfg.output_dir = str(trained_runs["full"])
    with pytest.raises(ConfigError, match="overwritten"):
        recipes.evaluate_only(cfg, overrides=[])
    with open_dict(cfg):
        cfg.run = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="config.yaml"):
        evaluation.eval_config(cfg, overrides=[])


def test_evaluate_script_re_evaluates_a_run_and_returns_cleanly(trained_runs, tmp_path):
    run = tmp_path / "sweep" / "0_learning_rate=0.001"  # a sweep trial's folder, named by Hydra, given as typed
    shutil.copytree(trained_runs["lora"], run)
    out = tmp_path / "eval"
    proc = run_script("evaluate.py", f"run={run}", "eval.n=3", "eval.method=likelihood",
                      f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval/n"] == 3 and metrics["eval/irregular"] == 0
    saved = (out / "config.yaml").read_text()
    assert "method: likelihood" in saved and "name: default" in saved  # the run's LoRA, this call's eval


def test_evaluate_script_bad_input_exits_2_with_a_message_and_keeps_results(trained_runs, tmp_path):
    proc = run_script("evaluate.py", f"run={tmp_path / 'no_such_run'}", f"hydra.run.dir={tmp_path / 'h1'}")
    assert proc.returncode == 2
    assert "ftexp: error:" in proc.stderr and "no_such_run" in proc.stderr
    assert "Traceback" not in proc.stderr
    # an objective the run will not write is named, with the valid ones, before anything is evaluated
    out = tmp_path / "eval"
    proc = run_script("evaluate.py", f"run={trained_runs['full']}", "eval.n=2", "objective=eval/nonsense",
                      f"output_dir={out}", f"hydra.run.dir={tmp_path / 'h2'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "objective=eval/nonsense is not a metric a classification run writes" in proc.stderr and "eval/accuracy" in proc.stderr
    assert not (out / "metrics.json").exists()


def test_hydra_run_dir_pointed_at_the_evaluated_run_is_refused_before_hydra_writes(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("the run's own record\n")
    proc = run_script("evaluate.py", f"run={run}", f"hydra.run.dir={run}")
    assert proc.returncode == 2 and "is the run being evaluated" in proc.stderr
    assert (run / ".hydra" / "config.yaml").read_text() == "the run's own record\n"
    assert sorted(p.name for p in run.iterdir()) == [".hydra"]


def test_path_overrides_holding_an_equals_sign_are_quoted_for_hydra():
    assert quote_paths(["run=out/s/0_lr=0.001", "output_dir=a=b", "judge.baseline='x=y'", "train.n=8",
                        "+data.path=d/n=1", "eval.n=2"]) == [
        "run='out/s/0_lr=0.001'", "output_dir='a=b'", "judge.baseline='x=y'", "train.n=8", "+data.path='d/n=1'",
        "eval.n=2"]
    assert quote_paths(["run=it's/n=1"]) == ["run=\"it's/n=1\""]


def test_a_finished_lora_run_is_evaluated_with_its_adapter_merged_unless_turned_off(trained_runs, tmp_path, caplog):
    caplog.set_level("INFO", logger="ftexp.modeling")
    recipes.finetune(compose_cfg(["lora=default", "train.max_steps=2", "eval.n=4"], tmp_path / "train"))
    assert "LoRA adapter merged into the float32 base weights" in caplog.text  # train.py's evaluation
    run, found = trained_runs["lora"], {}
    for flag, said in (("true", "LoRA adapter merged"), ("false", "unmerged: eval.merge_adapter=false")):
        cfg = compose_cfg(["eval.n=8", f"eval.merge_adapter={flag}", f"+run={run}"], tmp_path / flag)
        with open_dict(cfg):
            cfg.run = str(run)
        caplog.clear()
        recipes.evaluate_only(cfg, overrides=["eval.n", "eval.merge_adapter", "run"])
        assert said in caplog.text
        found[flag] = [r["prediction"] for r in _lines(tmp_path / flag / "predictions.jsonl")]
    assert found["true"] == found["false"]
