"""A run survives what real runs meet: killed mid-training it resumes from its newest
checkpoint and ends as an uninterrupted run would; its folder is owned (another config
or a second live run is refused, the files left byte-identical); half-written derived
files are never picked up."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, compose_cfg
from ftexp import recipes, records, training
from ftexp.errors import ConfigError

RESUMABLE = ["train.max_steps=12", "train.save_steps=4", "train.logging_steps=1"]


class Killed(RuntimeError):
    pass


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_a_run_killed_after_a_checkpoint_resumes_there_and_ends_like_an_uninterrupted_one(tmp_path, monkeypatch):
    whole = recipes.finetune(compose_cfg(RESUMABLE, tmp_path / "whole"))
    assert not (tmp_path / "whole" / "checkpoints").exists(), "checkpoints are removed once the run finishes"

    run = tmp_path / "killed"
    log_step = training.LossLog.on_log

    def die_at_step_6(self, args, state, control, logs=None, **kw):
        if state.global_step == 6:
            raise Killed("killed at step 6")
        return log_step(self, args, state, control, logs=logs, **kw)

    monkeypatch.setattr(training.LossLog, "on_log", die_at_step_6)
    with pytest.raises(Killed):
        recipes.finetune(compose_cfg(RESUMABLE, run))
    assert (run / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists()
    assert not (run / "metrics.json").exists()
    monkeypatch.setattr(training.LossLog, "on_log", log_step)

    resumed = recipes.finetune(compose_cfg(RESUMABLE, run))
    assert resumed["train/resumed_from_step"] == 4 and whole["train/resumed_from_step"] == 0
    assert resumed["train/steps"] == whole["train/steps"] == 12
    assert resumed["train/loss_first"] == pytest.approx(whole["train/loss_first"], rel=1e-6)
    assert resumed["train/loss_last"] == pytest.approx(whole["train/loss_last"], rel=1e-3)
    # the token count goes on from the checkpoint's: steps 1-4 there, 5-12 in this session
    assert resumed["train/tokens"] == whole["train/tokens"]
    assert _steps(run) == _steps(tmp_path / "whole") == list(range(1, 13))  # each step logged once
    assert not (run / "checkpoints").exists()


def test_keep_checkpoints_leaves_the_newest_ones(tmp_path):
    recipes.finetune(compose_cfg([*RESUMABLE, "train.keep_checkpoints=true", "train.save_total_limit=2"], tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-8"]


def test_a_checkpoint_cut_short_is_passed_over(tmp_path):
    good, cut = tmp_path / "checkpoint-4", tmp_path / "checkpoint-8"
    good.mkdir()
    (good / "trainer_state.json").write_text("{}")
    cut.mkdir()
    (cut / "adapter_model.safetensors").write_text("")
    assert training.last_checkpoint(tmp_path) == (good, 4)
    assert training.last_checkpoint(tmp_path / "none") == (None, 0)


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != records.LOCK}


def test_a_different_config_into_a_finished_run_is_refused_and_its_files_kept(tmp_path):
    recipes.finetune(compose_cfg([], tmp_path))
    before = _digest(tmp_path)
    with pytest.raises(ConfigError, match=r"another config: train\.seed \(42 there, 7 now\)"):
        recipes.finetune(compose_cfg(["train.seed=7"], tmp_path))
    assert _digest(tmp_path) == before
    again = recipes.finetune(compose_cfg([], tmp_path))  # the same config reuses the finished run
    assert again == json.loads((tmp_path / "metrics.json").read_text())


def test_a_finished_run_is_reused_whatever_the_evaluation_batches(tmp_path):
    """eval.batch_size and eval.batch_tokens shape batches, not results: a finished run is reused when
    they change, and when its config.yaml predates eval.batch_tokens."""
    first = recipes.finetune(compose_cfg([], tmp_path))
    before = _digest(tmp_path)
    assert recipes.finetune(compose_cfg(["eval.batch_size=4", "eval.batch_tokens=null"], tmp_path)) == first
    saved = tmp_path / "config.yaml"
    saved.write_text("\n".join(line for line in saved.read_text().splitlines() if "batch_tokens" not in line) + "\n")
    assert recipes.finetune(compose_cfg([], tmp_path)) == first
    assert {k: v for k, v in _digest(tmp_path).items() if k != "config.yaml"} == \
        {k: v for k, v in before.items() if k != "config.yaml"}  # nothing trained or written again


def test_a_second_live_run_in_the_folder_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path):
    with records.owned(tmp_path):
        with pytest.raises(ConfigError, match=r"in use by a live run \(pid %d" % os.getpid()):
            recipes.finetune(compose_cfg([], tmp_path))
    (tmp_path / records.LOCK).write_text("pid 999999 on a machine that died\n")  # nobody holds it
    assert "eval/accuracy" in recipes.finetune(compose_cfg([], tmp_path))


def test_a_half_written_base_model_is_rebuilt(tmp_path):
    (tmp_path / "base_model").mkdir()
    (tmp_path / "base_model" / "config.json").write_text("{}")  # as after a full disk
    metrics = recipes.finetune(compose_cfg([], tmp_path))
    assert "eval/accuracy" in metrics and (tmp_path / "base_model" / "ftexp_made_by.json").exists()


@pytest.mark.slow
def test_sigkill_then_the_same_command_finishes_the_run(tmp_path):
    """The real entry point, killed by SIGKILL once its step-4 checkpoint is on disk."""
    args = [sys.executable, str(ROOT / "train.py"), "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64",
            "model.tiny.vocab_size=400", "cache_dir=null", "train.max_steps=40", "train.save_steps=4",
            "train.logging_steps=1", "eval.n=8", f"output_dir={tmp_path}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "metrics.json").exists()
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout + done.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["train/steps"] == 40 and metrics["train/resumed_from_step"] >= 4
    assert _steps(tmp_path) == list(range(1, 41))


def _killed_at(run: Path, step: int, monkeypatch) -> None:
    log_step = training.LossLog.on_log

    def die(self, args, state, control, logs=None, **kw):
        if state.global_step == step:
            raise Killed(f"killed at step {step}")
        return log_step(self, args, state, control, logs=logs, **kw)

    monkeypatch.setattr(training.LossLog, "on_log", die)
    with pytest.raises(Killed):
        recipes.finetune(compose_cfg(RESUMABLE, run))
    monkeypatch.setattr(training.LossLog, "on_log", log_step)


def test_a_checkpoint_whose_weights_do_not_load_is_passed_over_for_the_one_before(tmp_path, monkeypatch, caplog):
    whole = recipes.finetune(compose_cfg(RESUMABLE, tmp_path / "whole"))
    run = tmp_path / "killed"
    _killed_at(run, 10, monkeypatch)  # after checkpoints 4 and 8
    (run / "checkpoints" / "checkpoint-8" / "model.safetensors").write_bytes(b"")  # a full disk, a lost write
    resumed = recipes.finetune(compose_cfg(RESUMABLE, run))
    assert "checkpoint-8 does not load (model.safetensors" in caplog.text
    assert resumed["train/resumed_from_step"] == 4 and resumed["train/steps"] == 12
    assert resumed["train/loss_last"] == pytest.approx(whole["train/loss_last"], rel=1e-3)
    assert _steps(run) == list(range(1, 13))


def test_when_no_checkpoint_loads_the_run_is_refused_and_every_file_kept(tmp_path, monkeypatch):
    run = tmp_path / "killed"
    _killed_at(run, 10, monkeypatch)
    for step in (4, 8):
        (run / "checkpoints" / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"\0" * 10)
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    with pytest.raises(ConfigError, match=r"No checkpoint in .* loads \(checkpoint-8: optimizer.pt .*Every file is kept"):
        recipes.finetune(compose_cfg(RESUMABLE, run))
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


def test_a_misspelt_objective_writes_nothing_and_the_corrected_run_takes_the_folder(tmp_path):
    with pytest.raises(ConfigError, match="objective=eval/acuracy is not a metric"):
        recipes.finetune(compose_cfg(["objective=eval/acuracy"], tmp_path))
    assert not (tmp_path / "config.yaml").exists()  # nothing there to refuse the corrected run
    assert "eval/accuracy" in recipes.finetune(compose_cfg([], tmp_path))
