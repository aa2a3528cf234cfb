"""Sweeps run for real: `python train.py -m` as a subprocess on the tiny model, a few seconds
per trial. Each test has its own sweep dir (hydra.sweep.dir) and therefore its own study."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.storages import RetryFailedTrialCallback
from optuna.trial import TrialState

from conftest import ROOT

pytestmark = pytest.mark.slow

# A trial in a few seconds: the smallest tiny model, one optimizer step, a handful of rows.
FAST = [
    "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.num_layers=1",
    "model.tiny.vocab_size=300", "model.tiny.tokenizer_max_texts=200", "data.generator.train_size=64",
    "data.generator.eval_size=16", "eval.n=8", "eval.batch_size=8", "train.max_steps=1", "train.save_model=false",
    "cache_dir=null", "hydra/job_logging=disabled",
]


def sweep_cmd(sweep_dir, *args, sampler="grid"):
    return [sys.executable, str(ROOT / "train.py"), "-m", "hydra/sweeper=ftexp", f"hydra/sweeper/sampler={sampler}",
            f"hydra.sweep.dir={sweep_dir}", *FAST, *args]


def env():
    return {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
            "TOKENIZERS_PARALLELISM": "false"}


def run_sweep(sweep_dir, *args, sampler="grid", timeout=300, rc=0):
    done = subprocess.run(sweep_cmd(sweep_dir, *args, sampler=sampler), cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == rc, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def trials(sweep_dir):
    study = optuna.load_study(study_name=sweep_dir.name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    return study.get_trials(deepcopy=False)


def cells_of(ts, state=TrialState.COMPLETE):
    return sorted((t.user_attrs["train.n"], t.user_attrs["train.seed"]) for t in ts if t.state == state)


def metrics_mtimes(sweep_dir):
    return {p.parent.name: p.stat().st_mtime_ns for p in sweep_dir.glob("*/metrics.json")}


def test_a_2x2_grid_writes_the_table_and_a_rerun_runs_nothing(tmp_path):
    sweep = tmp_path / "grid"
    axes = ["train.n=16,32", "train.epochs=1,2", "train.max_steps=null", "train.batch_size=16"]
    run_sweep(sweep, *axes)
    ts = trials(sweep)
    assert len(ts) == 4 and all(t.state == TrialState.COMPLETE for t in ts)
    folders = sorted(p.name for p in sweep.iterdir() if (p / "metrics.json").exists())
    assert folders == ["0_n=16_epochs=1", "1_n=16_epochs=2", "2_n=32_epochs=1", "3_n=32_epochs=2"]
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert [(r["# training data"], r["epochs"], r["Status"]) for r in rows] == [
        ("16", "1.0", "ok"), ("16", "2.0", "ok"), ("32", "1.0", "ok"), ("32", "2.0", "ok")]
    md = (sweep / "results.md").read_text()
    assert "| tiny · full fine-tune | 32 (2) |" in md and (sweep / "results.png").exists()

    before = metrics_mtimes(sweep)
    again = run_sweep(sweep, *axes)
    assert len(trials(sweep)) == 4  # exhausted grid: no cell runs again
    assert metrics_mtimes(sweep) == before
    assert "this invocation ran 0" in again.stdout + again.stderr


def test_a_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    sweep = tmp_path / "killed"
    # three cells; n=0 is refused by the config checks, so it is also the sweep's failed trial
    axes = ["train.n=16,32,0", "hydra.sweeper.heartbeat_s=1", "hydra.sweeper.stale_after_s=3"]
    proc = subprocess.Popen(sweep_cmd(sweep, *axes), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not list(sweep.glob("*/metrics.json")) and time.time() < deadline:
            time.sleep(0.2)
        assert list(sweep.glob("*/metrics.json")), "the first trial never finished"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: a crash, not a Ctrl-C
        proc.wait()
    first = metrics_mtimes(sweep)
    assert list(first) == ["0_n=16"]
    time.sleep(4)  # the dead sweeper's heartbeat goes stale

    done = run_sweep(sweep, *axes, rc=1)  # a failed trial: recorded, reported, and a non-zero exit
    assert "ftexp: error: 1 of" in done.stderr and "Traceback" not in done.stderr
    ts = trials(sweep)
    # an interrupted trial failed and ran again as a new trial in its folder; released ones never ran
    retried = {RetryFailedTrialCallback.retried_trial_number(t) for t in ts} - {None}
    ts = [t for t in ts if "ftexp:released" not in t.user_attrs and t.number not in retried]
    complete = sorted(t.user_attrs["train.n"] for t in ts if t.state == TrialState.COMPLETE)
    assert complete == [16, 32]  # each finished cell once; n=16 was not trained again
    assert metrics_mtimes(sweep)["0_n=16"] == first["0_n=16"]
    failed = {t.user_attrs["train.n"]: t.user_attrs["ftexp:error"] for t in ts if t.state == TrialState.FAIL}
    assert list(failed) == [0] and "ConfigError" in failed[0] and "train.n=0" in failed[0]
    assert len(ts) == 3 and len([p for p in sweep.iterdir() if p.is_dir()]) == 3  # one folder per cell
    folder = next(p for p in sweep.iterdir() if p.name.endswith("_n=0"))
    assert "train.n=0" in (folder / "failed.json").read_text()
    md = (sweep / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| tiny") and "| 0 (1 step) |" in line)
    assert "failed: ConfigError: train.n=0" in row


def test_a_trial_left_running_before_its_first_heartbeat_is_released_and_its_cell_runs(tmp_path):
    from hydra_plugins.ftexp_sweeper.ftexp_sweeper import CELL, RELEASED

    sweep = tmp_path / "orphan"
    sweep.mkdir()
    # what a sweeper killed between ask() and its first heartbeat leaves: a RUNNING trial no heartbeat check sees
    study = optuna.create_study(study_name=sweep.name, storage=f"sqlite:///{sweep / 'optuna.db'}", direction="maximize")
    study.enqueue_trial({}, user_attrs={CELL: json.dumps({"train.n": 16}), "train.n": 16})
    orphan = study.ask()
    assert orphan.user_attrs[CELL] and study.trials[0].state == TrialState.RUNNING
    time.sleep(1.5)

    run_sweep(sweep, "train.n=16,32", "hydra.sweeper.stale_after_s=1")
    ts = trials(sweep)
    assert ts[0].state == TrialState.PRUNED and "stopped before it started" in ts[0].user_attrs[RELEASED]
    assert sorted(t.user_attrs["train.n"] for t in ts if t.state == TrialState.COMPLETE) == [16, 32]  # n=16 too
    assert sorted(metrics_mtimes(sweep)) == ["1_n=16", "2_n=32"]


def test_two_workers_on_one_storage_run_each_cell_once(tmp_path):
    sweep = tmp_path / "shared"
    axes = ["train.n=16,32", "train.seed=1,2"]
    procs = [subprocess.Popen(sweep_cmd(sweep, *axes), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    ts = trials(sweep)
    assert cells_of(ts) == [(16, 1), (16, 2), (32, 1), (32, 2)]  # every cell finished exactly once
    assert len([t for t in ts if t.state == TrialState.COMPLETE]) == 4
    # no cell was trained twice: one run folder (one train_log.jsonl) per cell
    assert len(list(sweep.glob("*/train_log.jsonl"))) == 4
    workers = {t.user_attrs["ftexp:worker"] for t in ts if t.state == TrialState.COMPLETE}
    assert len(workers) == 2  # both did a share


def test_a_search_budget_counts_trials_already_in_the_study(tmp_path):
    sweep = tmp_path / "search"
    search = ["+sweep=rank_search", "train.n=16"]  # TPE over lora.r, learning rate, epochs
    run_sweep(sweep, *search, "hydra.sweeper.n_trials=1", sampler="tpe")
    run_sweep(sweep, *search, "hydra.sweeper.n_trials=2", sampler="tpe")
    ts = trials(sweep)
    complete = [t for t in ts if t.state == TrialState.COMPLETE]
    assert len(ts) == len(complete) == 2  # 1 + 1 more, not 1 + 2
    assert complete[0].params != complete[1].params  # the resumed seeded sampler did not replay trial 0
    assert sorted(p.parent.name.split("_")[0] for p in sweep.glob("*/metrics.json")) == ["0", "1"]


def wandb_records(path):
    """The records of an offline W&B run file (a LevelDB-style log of protobuf records)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk  # full/first start a record, middle/last extend it
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def key_of(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_logs_each_trial_grouped_by_sweep_and_named_by_its_values(tmp_path):
    """A sweep read back from its offline W&B files: each trial a run in the sweep's group, named by
    its swept values, which are also top-level config keys; the final metrics in the summary; the
    loss per step; the model as an artifact (logger.log_model); and one report run with the table."""
    sweep = tmp_path / "tracked"
    fake_token = "hf_" + "Q" * 34
    environ = {**env(), "HF_TOKEN": fake_token}
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        environ.pop(key, None)
    done = subprocess.run(sweep_cmd(sweep, "train.n=16,32", "logger=wandb", "logger.log_model=true",
                                    "train.save_model=true", "train.logging_steps=1"),
                          cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "wandb sync" in done.stdout + done.stderr  # the user is told how to upload the offline runs
    names, swept = set(), set()
    for run_file in sorted(sweep.glob("*_n=*/wandb/offline-run-*/run-*.wandb")):
        recs = list(wandb_records(run_file))
        run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
        names.add(run.display_name)
        assert run.run_group == "tracked"
        config = {i.key: json.loads(i.value_json) for i in run.config.update}
        assert config["train"]["n"] == config["n"] and config["objective"] == "eval/accuracy"
        swept.add(config["n"])
        history = {key_of(i) for r in recs if r.WhichOneof("record_type") == "history" for i in r.history.item}
        assert "train/loss" in history and "predictions" in {k.split("/")[0] for k in history}
        summary = {key_of(i) for r in recs if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
        assert {"eval/accuracy", "eval/f1", "eval/irregular", "train/loss_last"} <= summary
        artifacts = [r.artifact for r in recs if r.WhichOneof("record_type") == "artifact"]
        assert [a.name for a in artifacts if a.type == "model"] == [f"{run.display_name.replace('=', '-')}-model"]
    assert names == {"n=16", "n=32"} and swept == {16, 32}
    report_files = list(sweep.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(report_files) == 1  # the results, logged at the end as a run of their own
    recs = list(wandb_records(report_files[0]))
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    assert run.job_type == "report" and run.run_group == "tracked"
    logged = {key_of(i): i.value_json for r in recs if r.WhichOneof("record_type") == "history" for i in r.history.item}
    assert logged["results/_type"] == '"table-file"' and logged["results/nrows"] == "2"  # one row per cell
    assert logged["results_plot/_type"] == '"image-file"'
    table = json.loads(next(report_files[0].parent.glob("files/" + json.loads(logged["results/path"]))).read_text())
    column = table["columns"].index("# training data (epochs)")
    assert sorted(row[column] for row in table["data"]) == ["16 (1 step)", "32 (1 step)"]
    for path in sweep.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert fake_token.encode() not in path.read_bytes(), path


def test_a_trial_whose_overrides_do_not_compose_is_a_failed_trial_with_its_own_record(tmp_path):
    sweep = tmp_path / "bad_value"
    done = run_sweep(sweep, "train.n=abc,16", rc=1)
    assert "ftexp: error: 1 of 2 trials failed" in done.stderr and "Traceback" not in done.stderr
    failure = json.loads((sweep / "0_n=abc" / "failed.json").read_text())
    assert "train.n=abc" in failure["error"] and failure["values"] == {"train.n": "abc"}
    md = (sweep / "results.md").read_text()
    assert "1 finished, 1 failed" in md
    row = next(line for line in md.splitlines() if "| abc (1 step) |" in line)
    assert row.startswith("| tiny · full fine-tune") and "failed: " in row


# A trial that learns to answer with a label word by its first evaluation (3e-3), and one that never
# answers at all (1e-8): accuracy on the held-out rows 0.56 against 0.
LEARNS_OR_NOT = ["train.learning_rate=3e-3,1e-8", "train.warmup_steps=0", "train.n=48", "train.batch_size=8",
                 "train.max_steps=12", "train.eval_every=4", "train.eval_n=16", "data.generator.train_size=96"]


def test_a_pruner_stops_a_clearly_worse_trial_and_the_report_lists_it_as_pruned(tmp_path):
    sweep = tmp_path / "pruned"
    pruner = ["hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=1"]
    done = run_sweep(sweep, *pruner, *LEARNS_OR_NOT)
    ts = {t.user_attrs["train.learning_rate"]: t for t in trials(sweep)}
    assert ts[3e-3].state == TrialState.COMPLETE and ts[3e-3].intermediate_values
    worse = ts[1e-8]
    assert worse.state == TrialState.PRUNED and worse.intermediate_values == {4: 0.0}
    record = json.loads((sweep / "1_learning_rate=1e-08" / "pruned.json").read_text())
    assert record["step"] == 4 and record["value"] == 0.0 and "MedianPruner" in record["reason"]
    assert not (sweep / "1_learning_rate=1e-08" / "failed.json").exists()
    assert "1 pruned" in done.stdout + done.stderr and "Error executing job" not in done.stdout + done.stderr
    md = (sweep / "results.md").read_text()
    assert "pruned at step 4 (epoch" in md and "0.000 (intermediate)" in md

    again = run_sweep(sweep, *pruner, *LEARNS_OR_NOT)  # a pruned cell is finished: not run again
    assert len(trials(sweep)) == 2 and "this invocation ran 0" in again.stdout + again.stderr


def test_a_pruner_without_evaluations_during_training_is_refused(tmp_path):
    done = run_sweep(tmp_path / "s", "hydra/sweeper/pruner=hyperband", "train.learning_rate=1e-3,1e-4", rc=2)
    assert "train.eval_every=null makes none" in done.stderr
    assert not (tmp_path / "s" / "optuna.db").exists()


EPOCH_AXIS = ["train.epochs=1,2,3", "train.n=16,32", "train.max_steps=null", "train.batch_size=8",
              "train.scheduler=constant", "hydra.sweeper.epochs_from_one_run=true"]


def test_the_epoch_axis_runs_once_per_training_size_and_a_rerun_runs_nothing(tmp_path):
    sweep = tmp_path / "epochs"
    done = run_sweep(sweep, *EPOCH_AXIS)
    out = done.stdout + done.stderr
    assert "this invocation ran 2," in out  # two runs (n=16, n=32) of 3 epochs for six cells
    ts = trials(sweep)
    assert sorted((t.user_attrs["train.n"], t.user_attrs["train.epochs"]) for t in ts
                  if t.state == TrialState.COMPLETE) == [(n, e) for n in (16, 32) for e in (1, 2, 3)]
    written = [t for t in ts if "ftexp:from_trial" in t.user_attrs]
    assert len(written) == 4 and all(t.value == json.loads(
        (sweep / t.user_attrs["ftexp:run_dir"] / "metrics.json").read_text())["eval/accuracy"] for t in written)
    runs = sorted(p.parent.name for p in sweep.glob("*/metrics.json"))
    assert len(runs) == 6, runs
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert sorted((r["# training data"], r["epochs"]) for r in rows) == [
        (n, e) for n in ("16", "32") for e in ("1.0", "2.0", "3.0")]

    before = metrics_mtimes(sweep)
    again = run_sweep(sweep, *EPOCH_AXIS)
    assert "this invocation ran 0" in again.stdout + again.stderr and metrics_mtimes(sweep) == before


def test_the_epoch_axis_under_a_decaying_schedule_is_refused_with_the_reason(tmp_path):
    axes = [a for a in EPOCH_AXIS if a != "train.scheduler=constant"]
    done = run_sweep(tmp_path / "s", *axes, rc=2)
    assert "train.scheduler=linear" in done.stderr and "depends on its total number of epochs" in done.stderr


def test_a_longer_run_that_fails_keeps_what_it_wrote_and_frees_its_other_cells(tmp_path):
    # one step an epoch at a rate that diverges at step 2: the 3-epoch run writes epoch 1's results, then
    # fails before epoch 2's; the 2-epoch cell then runs on its own (and diverges too) instead of waiting
    sweep = tmp_path / "fails"
    axes = ["train.epochs=1,2,3", "train.n=8", "train.max_steps=null", "train.batch_size=8", "train.logging_steps=1",
            "train.scheduler=constant", "train.learning_rate=1e6", "hydra.sweeper.epochs_from_one_run=true"]
    run_sweep(sweep, *axes, rc=1)
    by_epochs = {}
    for t in trials(sweep):
        by_epochs.setdefault(t.user_attrs["train.epochs"], []).append(t.state)
    assert by_epochs[1] == [TrialState.COMPLETE]  # written before the longer run diverged
    assert by_epochs[3] == [TrialState.FAIL] and by_epochs[2] == [TrialState.FAIL]
    assert len(list(sweep.glob("*epochs=2*/failed.json"))) == 1


def test_a_grid_runs_through_submitit_local_jobs_and_a_rerun_continues_it(tmp_path):
    """+launcher=local: each trial is a submitit job (its own process, its own log under .submitit/),
    the code path of the SLURM preset with another executor. A rerun runs no finished cell again."""
    sweep = tmp_path / "submitit"
    axes = ["train.n=16,32", "+launcher=local", "hydra.sweeper.n_jobs=2"]
    done = run_sweep(sweep, *axes)
    ts = trials(sweep)
    assert sorted(t.user_attrs["train.n"] for t in ts if t.state == TrialState.COMPLETE) == [16, 32]
    assert "Submitit 'local' sweep output dir" in done.stdout + done.stderr
    job_logs = sorted(sweep.glob(".submitit/*/*_log.out"))
    assert len(job_logs) == 2, job_logs  # one submitit job per trial
    pickled = sorted(sweep.glob(".submitit/*/*_result.pkl"))
    assert len(pickled) == 2  # each job handed its return value back through submitit
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert [(r["# training data"], r["Status"]) for r in rows] == [("16", "ok"), ("32", "ok")]
    assert (sweep / "results.md").exists()

    before = metrics_mtimes(sweep)
    again = run_sweep(sweep, *axes)
    assert len(trials(sweep)) == 2 and metrics_mtimes(sweep) == before
    assert "this invocation ran 0" in again.stdout + again.stderr
    assert len(list(sweep.glob(".submitit/*/*_log.out"))) == 2  # nothing submitted the second time
