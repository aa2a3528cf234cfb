"""The epoch axis from one run: under a constant learning rate, epoch k of a longer run is the
training a k-epoch run does, so its results (written at that epoch) equal the k-epoch run's."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from omegaconf import open_dict
from transformers import TrainerControl, TrainerState

from conftest import compose_cfg
from ftexp import recipes
from ftexp.errors import ConfigError
from ftexp.training import EpochResults

# 24 rows in batches of 8: three steps an epoch, logged every 5 steps and evaluated on held-out rows
# every 4, so epoch ends, log steps and evaluations fall apart - the cases where a longer run could
# log or evaluate differently from a shorter one. LoRA (dropout 0.05) makes the run read the RNG.
CONSTANT = ["train.max_steps=null", "train.scheduler=constant", "train.n=24", "train.batch_size=8",
            "train.logging_steps=5", "train.eval_every=4", "train.eval_n=16", "eval.n=16", "lora=default"]
TIMINGS = ("runtime", "per_s", "mfu", "peak_flops", "prep_s", "peak_memory", "tokens_per_second", "epoch_results_of")


def _run(overrides, folder):
    cfg = compose_cfg([*CONSTANT, *overrides], folder)
    return recipes.finetune(cfg)


def _same(metrics: dict) -> dict:
    """What two runs of the same training must agree on: everything but timings and provenance."""
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMINGS)}


def _log(folder):
    rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not any(t in k for t in TIMINGS)} for row in rows]


@pytest.mark.parametrize("variant", [
    ["train.group_by_length=true"], ["train.group_by_length=false"], ["train.eval_every=epoch"],
    ["train.grad_accum=2", "train.batch_size=4"]], ids=["length-grouped sampler", "random sampler",
                                                         "evaluated at each epoch's end", "accumulated gradients"])
def test_epoch_k_of_a_longer_constant_run_equals_a_k_epoch_run(tmp_path, variant):
    long_metrics = _run([*variant, "train.epochs=5", "epoch_results.epochs=[2,3]"], tmp_path / "long")
    short = _run([*variant, "train.epochs=3"], tmp_path / "short")

    at3 = tmp_path / "long" / "epochs=3"
    written = json.loads((at3 / "metrics.json").read_text())
    assert _same(written) == _same(short)
    assert written["train/steps"] == 9 and written["train/epoch_results_of"] == "long"
    assert (at3 / "predictions.jsonl").read_text() == (tmp_path / "short" / "predictions.jsonl").read_text()
    assert _log(at3) == _log(tmp_path / "short")  # losses, grad norms, held-out evaluations, step by step
    assert (at3 / "adapter" / "adapter_config.json").exists()
    saved = (at3 / "config.yaml").read_text()
    assert "epochs: 3.0" in saved and f"output_dir: {at3}" in saved
    # the longer run itself goes on to its own end
    assert long_metrics["train/steps"] == 15 and (tmp_path / "long" / "epochs=2" / "metrics.json").exists()


def test_the_longer_run_records_what_a_run_without_epoch_results_records(tmp_path):
    # the evaluations it adds at the earlier epochs' ends belong to those results, not to its own
    with_results = _run(["train.epochs=3", "epoch_results.epochs=[1,2]"], tmp_path / "with")
    alone = _run(["train.epochs=3"], tmp_path / "alone")
    assert _same(with_results) == _same(alone)
    assert _log(tmp_path / "with") == _log(tmp_path / "alone")


def test_a_rerun_keeps_the_epoch_results_already_written(tmp_path):
    _run(["train.epochs=3", "epoch_results.epochs=[1]", "train.eval_every=null"], tmp_path / "run")
    at1 = tmp_path / "run" / "epochs=1" / "metrics.json"
    before = at1.stat().st_mtime_ns
    (tmp_path / "run" / "metrics.json").unlink()  # the longer run did not finish: it runs again
    _run(["train.epochs=3", "epoch_results.epochs=[1]", "train.eval_every=null"], tmp_path / "run")
    assert at1.stat().st_mtime_ns == before
    assert (tmp_path / "run" / "metrics.json").exists()


def test_a_folder_holding_another_experiment_is_refused_before_training(tmp_path):
    _run(["train.epochs=1", "train.eval_every=null", "train.learning_rate=1e-3"], tmp_path / "other")
    cfg = compose_cfg([*CONSTANT, "train.epochs=3", "train.eval_every=null", "epoch_results.epochs=[1]"],
                      tmp_path / "run")
    with open_dict(cfg):
        cfg.epoch_results.dirs = [str(tmp_path / "other")]
    with pytest.raises(ConfigError, match="learning_rate"):
        recipes.finetune(cfg)
    assert not (tmp_path / "run" / "train_log.jsonl").exists()


def test_a_checkpoint_at_an_epoch_end_waits_for_its_results():
    """With evaluation at each epoch's end, that evaluation comes after the step's checkpoint: saved first,
    a kill during the results would resume past the epoch without them."""
    written = []
    callback = EpochResults([2], lambda epoch, state: written.append(epoch))
    args, state, control = SimpleNamespace(eval_strategy="epoch"), TrainerState(), TrainerControl()
    state.epoch, control.should_save = 2.0, True
    callback.on_step_end(args, state, control)
    assert not control.should_save and not written
    callback.on_log(args, state, control, logs={"loss": 1.0})  # evaluated results: not written at the log
    assert not written
    callback.on_evaluate(args, state, control)
    assert written == [2] and control.should_save


def test_epochs_a_resumed_run_is_already_past_are_given_up_with_a_warning(caplog):
    callback = EpochResults([1, 3], lambda epoch, state: None)
    state = TrainerState()
    state.epoch = 1.5
    callback.on_step_end(SimpleNamespace(eval_strategy="no"), state, TrainerControl())
    assert callback.pending == [3] and "epoch(s) [1] cannot be written" in caplog.text
