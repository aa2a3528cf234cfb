"""python -m ftexp.report: a sweep dir of run folders -> results.md / results.csv / results.png.

The sweeps here are written by hand (config.yaml + metrics.json, failed.json or pruned.json per run
folder, and predictions.jsonl where a case needs intervals), so every case runs in about a second."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from sklearn.metrics import f1_score

from conftest import ROOT
from ftexp import records, report


LABELS = ("negative", "positive")
SST2_DEV = 872


def make_run(root, name, *, n=100, epochs=1, seed=42, r=8, lora=True, quant="nf4", kind="classification",
             metrics=None, error=None, shots=None, objective="eval/accuracy", predictions=None, pruned=None, **extra):
    run = root / name
    run.mkdir(parents=True)
    labels = {"labels": dict(enumerate(LABELS))} if kind == "classification" else {}
    cfg = {"model": {"name": "llama2_13b"}, "quant": {"name": quant}, "lora": {"enabled": lora, "r": r},
           "train": {"n": n, "epochs": epochs, "max_steps": None, "seed": seed, **extra},
           "task": {"kind": kind, **labels}, "eval": {"shots": shots or 0}, "objective": objective,
           "logger": {"name": "none"}, "output_dir": None, "run_name": name}
    OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
    if metrics is not None:
        base = {"train/loss_first": 2.5, "train/loss_last": 0.5, "train/runtime_s": 60.0, "eval/runtime_s": 12.0,
                "train/peak_memory_mb": 9000.0, "train/trainable_params": 62_586_880, "eval/irregular": 3,
                "train/samples": n if n is not None else 67349}
        records.write_metrics({**base, **metrics}, run)
    if error is not None:
        try:
            raise RuntimeError(error)
        except RuntimeError as err:
            records.write_failure(run, err)
    if predictions is not None:
        records.write_predictions(predictions, run)
    if pruned is not None:
        (run / "pruned.json").write_text(json.dumps({"status": "pruned", **pruned}))
    return run


def references(n: int = SST2_DEV, seed: int = 0) -> list[str]:
    """The gold labels of ``n`` seeded sentences, as predictions.jsonl names them."""
    return [LABELS[i] for i in np.random.default_rng(seed).integers(0, 2, size=n)]


def answers(gold: list[str], right: np.ndarray) -> tuple[dict, list[dict]]:
    """(metrics, predictions.jsonl rows) of a classifier that is right where ``right`` says, as a run writes them."""
    predicted = [g if ok else LABELS[1 - LABELS.index(g)] for g, ok in zip(gold, right)]
    rows = [{"input": f"sentence {i}", "reference": g, "prediction": p, "predicted_label": p, "correct": g == p,
             "irregular": False} for i, (g, p) in enumerate(zip(gold, predicted))]
    f1 = f1_score(gold, predicted, pos_label="positive")
    return {"eval/accuracy": float(np.mean(right)), "eval/f1": float(f1), "eval/n": len(gold)}, rows


def classifier_run(root, name, right: np.ndarray, gold: list[str] | None = None, **kwargs):
    """A classification run folder whose metrics.json and predictions.jsonl agree."""
    metrics, rows = answers(references(len(right)) if gold is None else gold, right)
    return make_run(root, name, metrics=metrics, predictions=rows, **kwargs)


def right_answers(correct: int, n: int = SST2_DEV) -> np.ndarray:
    """Which of ``n`` sentences a run gets right: the first ``correct`` of one seeded order, so that a better
    run gets right what a worse one did, and more."""
    return np.isin(np.arange(n), np.random.default_rng(1).permutation(n)[:correct])


def table_row(text: str, needle: str) -> list[str]:
    """The cells of the results.md row that holds ``needle``."""
    line = next(line for line in text.splitlines() if line.startswith("| ") and needle in line)
    return [cell.strip() for cell in line.strip("|").split("|")]


def column(text: str, name: str) -> int:
    """The index of column ``name`` in results.md's table."""
    return table_row(text, "| Method |").index(name)


@pytest.fixture
def study(tmp_path):
    """The SST-2 study's shape with one failed cell (CUDA out of memory at the full set)."""
    sweep = tmp_path / "sst2_study-llama2_13b"
    make_run(sweep, "0_n=100_epochs=1", n=100, epochs=1, metrics={"eval/accuracy": 0.80, "eval/f1": 0.79})
    make_run(sweep, "1_n=100_epochs=10", n=100, epochs=10, metrics={"eval/accuracy": 0.88, "eval/f1": 0.87})
    make_run(sweep, "2_n=1000_epochs=1", n=1000, epochs=1, metrics={"eval/accuracy": 0.93, "eval/f1": 0.93})
    make_run(sweep, "3_n=null_epochs=1", n=None, epochs=1, error="CUDA out of memory. Tried to allocate 20.00 MiB")
    return sweep


def test_report_renders_a_sweep_with_one_failed_trial(study):
    md, csv_path, png = report.write_report(study)
    text = md.read_text()
    assert "| Method | # training data (epochs) | Accuracy | F1 | training loss first→last | Irregular output |" in text
    assert "| llama2_13b · QLoRA (r=8) | 100 (10) | 0.880 | 0.870 | 2.500 → 0.500 | 3 | 72.0 s | 9,000 MB | 62.59M |" \
        in text
    failed_row = next(line for line in text.splitlines() if line.startswith("| llama2_13b") and "full" in line)
    assert "failed" in failed_row and "CUDA out of memory" in failed_row
    assert "3 finished, 1 failed" in text
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 4
    assert [r["# training data"] for r in rows] == ["100", "100", "1000", ""]
    assert rows[3]["Status"].startswith("failed: RuntimeError: CUDA out of memory")
    assert png.stat().st_size > 1000


def test_rows_follow_the_study_order_and_accuracy_column_reads_back(study):
    report.write_report(study)
    rows = list(csv.DictReader((study / "results.csv").open()))
    assert [(r["# training data"], r["epochs"]) for r in rows[:3]] == [("100", "1"), ("100", "10"), ("1000", "1")]
    assert [float(r["Accuracy"]) for r in rows[:3]] == [0.80, 0.88, 0.93]


def test_seeds_give_mean_std_and_the_number_of_seeds(tmp_path):
    sweep = tmp_path / "seeds"
    for seed, acc in ((1, 0.80), (2, 0.90), (3, 0.85)):
        make_run(sweep, f"{seed}_n=100_seed={seed}", n=100, seed=seed, metrics={"eval/accuracy": acc, "eval/f1": acc})
    make_run(sweep, "4_n=1000_seed=1", n=1000, seed=1, metrics={"eval/accuracy": 0.9, "eval/f1": 0.9})
    make_run(sweep, "5_n=1000_seed=2", n=1000, seed=2, error="boom")
    text = report.write_report(sweep)[0].read_text()
    assert "| Seeds | Status |" in text
    row = next(line for line in text.splitlines() if "| 100 (1) |" in line)
    assert "| 0.850 (sd 0.050) |" in row and "| 3 | ok |" in row  # no predictions: the spread over seeds only
    row = next(line for line in text.splitlines() if "| 1,000 (1) |" in line)
    assert "| 1/2 | 1 ok, 1 failed: RuntimeError: boom |" in row


def test_a_retried_cell_shows_its_success_once(tmp_path):
    sweep = tmp_path / "retried"
    make_run(sweep, "0_n=100", n=100, error="interrupted")
    make_run(sweep, "1_n=100", n=100, metrics={"eval/accuracy": 0.9, "eval/f1": 0.9})
    make_run(sweep, "2_n=500", n=500, metrics={"eval/accuracy": 0.95, "eval/f1": 0.95})
    rows = list(csv.DictReader(report.write_report(sweep)[1].open()))
    assert [(r["# training data"], r["Status"]) for r in rows] == [("100", "ok"), ("500", "ok")]


def test_metric_columns_follow_the_task(tmp_path):
    summ = tmp_path / "summ"
    for n in (10, 20):
        make_run(summ, f"n{n}", n=n, kind="summarization", objective="eval/rougeL",
                 metrics={"eval/rouge1": 0.4, "eval/rouge2": 0.2, "eval/rougeL": 0.3})
    assert "| ROUGE-1 | ROUGE-2 | ROUGE-L |" in report.write_report(summ)[0].read_text()
    score = tmp_path / "score"
    for n in (10, 20):
        make_run(score, f"n{n}", n=n, kind="scoring", objective="eval/mcrmse", metrics={"eval/mcrmse": 0.6})
    text = report.write_report(score)[0].read_text()
    assert "| MCRMSE |" in text and "(minimize)" in text
    qa = tmp_path / "qa"
    for n in (10, 20):
        make_run(qa, f"n{n}", n=n, kind="qa", objective="eval/token_f1",
                 metrics={"eval/exact_match": 0.1, "eval/token_f1": 0.3, "eval/empty": 0, "eval/too_long": 4,
                          "eval/repetitive": 7 if n == 10 else 2, "eval/wrong": 5})
    text = report.write_report(qa)[0].read_text()
    assert "| Exact match | Token F1 | Empty | Too long | Repetitive | Wrong |" in text  # the breakdown, as counts
    assert "| 0.100 | 0.300 | 0 | 4 | 7 | 5 |" in text and "| 0.100 | 0.300 | 0 | 4 | 2 | 5 |" in text


def test_swept_values_outside_method_and_size_get_their_own_column(tmp_path):
    sweep = tmp_path / "lr"
    for lr in (1e-4, 3e-4):
        make_run(sweep, f"lr{lr}", n=100, learning_rate=lr, metrics={"eval/accuracy": 0.9, "eval/f1": 0.9})
    text = report.write_report(sweep)[0].read_text()
    assert "| train.learning_rate |" in text and "| 0.0003 |" in text


def test_baseline_rows_come_from_evaluate_run_dirs(study, tmp_path):
    zero = make_run(tmp_path / "baselines", "zero", n=None, lora=False, quant="none", shots=0,
                    metrics={"eval/accuracy": 0.62, "eval/f1": 0.55, "eval/shots": 0})
    five = make_run(tmp_path / "baselines", "five", n=None, lora=False, quant="none", shots=5,
                    metrics={"eval/accuracy": 0.71, "eval/f1": 0.70, "eval/shots": 5})
    text = report.write_report(study, baselines=[zero, five])[0].read_text()
    lines = [line for line in text.splitlines() if line.startswith("| llama2_13b")]
    assert lines[0].startswith("| llama2_13b · zero-shot prompt | 0 | 0.620")
    assert lines[1].startswith("| llama2_13b · 5-shot prompt | 0 | 0.710")
    assert len(lines) == 6


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ftexp.report", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_prints_the_table_and_writes_the_files(study):
    done = run_cli(study)
    assert done.returncode == 0, done.stderr
    assert "| Method |" in done.stdout and "results.png" in done.stdout
    assert (study / "results.md").exists() and (study / "results.csv").exists() and (study / "results.png").exists()


@pytest.mark.parametrize("make,needle", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "No runs under"),
])
def test_bad_input_is_a_clear_message_and_a_nonzero_exit(tmp_path, make, needle):
    done = run_cli(make(tmp_path))
    assert done.returncode == 2
    assert needle in done.stderr and "Traceback" not in done.stderr


def test_a_baseline_without_results_is_refused(study, tmp_path):
    (tmp_path / "nothing").mkdir()
    done = run_cli(study, "--baseline", tmp_path / "nothing")
    assert done.returncode == 2 and "holds no finished run" in done.stderr


def test_the_report_reads_a_run_that_failed_before_writing_its_config(tmp_path):
    sweep = tmp_path / "early"
    make_run(sweep, "0_ok", n=100, metrics={"eval/accuracy": 0.9, "eval/f1": 0.9})
    early = sweep / "1_bad" / ".hydra"
    early.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"train": {"n": 0}, "objective": "eval/accuracy"}), early / "config.yaml")
    (sweep / "1_bad" / "failed.json").write_text(json.dumps({"status": "failed", "error": "ConfigError: train.n=0"}))
    text = report.write_report(sweep)[0].read_text()
    assert "failed: ConfigError: train.n=0" in text


def test_a_trial_that_never_composed_takes_the_sweeps_shared_settings_but_not_its_swept_group():
    from ftexp.report import RunFolder, fill_partial_configs

    full = RunFolder(path=Path("a"), config={"model.name": "tiny", "train.n": 16, "quant.name": "none"}, metrics={},
               failure=None)
    swept_value = RunFolder(path=Path("b"), config={"train.n": "abc"}, metrics=None, failure={"error": "x"}, partial=True)
    swept_group = RunFolder(path=Path("c"), config={"model": "tiny_falcon"}, metrics=None, failure={"error": "x"}, partial=True)
    fill_partial_configs([full, swept_value, swept_group])
    assert swept_value.config == {"model.name": "tiny", "train.n": "abc", "quant.name": "none"}
    assert swept_group.config == {"train.n": 16, "quant.name": "none", "model": "tiny_falcon"}


def test_a_loss_that_rose_is_flagged_in_the_table_and_the_result_row(tmp_path):
    sweep = tmp_path / "lr"
    make_run(sweep, "calm", n=100, learning_rate=1e-4, metrics={"eval/accuracy": 0.9, "eval/f1": 0.9})
    rose = {"eval/accuracy": 0.5, "eval/f1": 0.3, "train/loss_first": 8.36, "train/loss_last": 409.0}
    make_run(sweep, "wild", n=100, learning_rate=50.0, metrics=rose)
    text = report.write_report(sweep)[0].read_text()
    assert "| 2.500 → 0.500 |" in text and "| 8.360 → 409.000 (rose) |" in text
    line = records.result_row({**rose, "eval/irregular": 0, "eval/n": 4}, "eval/accuracy")
    assert "loss 8.360->409.000 (ROSE: last above first)" in line
    assert "ROSE" not in records.result_row({**rose, "train/loss_last": 0.5, "eval/n": 4}, "eval/accuracy")


@pytest.fixture
def scored(tmp_path):
    """A sweep whose runs kept their predictions on SST-2's 872 dev sentences, and a zero-shot baseline."""
    sweep = tmp_path / "sst2_scored"
    classifier_run(sweep, "0_n=100", right_answers(700), n=100)  # 0.803
    classifier_run(sweep, "1_n=1000", right_answers(750), n=1000)  # 0.860: the best
    classifier_run(sweep, "2_n=5000", right_answers(748), n=5000)  # two sentences fewer: within noise
    zero = classifier_run(tmp_path / "baselines", "zero", right_answers(550), n=None, lora=False, quant="none",
                          shots=0)  # 0.631
    return sweep, zero


def test_every_metric_shows_its_interval_and_the_paired_tests_mark_each_cell(scored):
    sweep, zero = scored
    md, csv_path, png = report.write_report(sweep, baselines=[zero])
    text = md.read_text()
    assert "| Accuracy | F1 | vs best | vs baseline |" in text
    best = table_row(text, "| 1,000 (1) |")
    assert best[column(text, "Accuracy")].startswith("0.860 ± 0.02") and " ± " in best[column(text, "F1")]
    assert best[column(text, "vs best")] == "best" and best[column(text, "vs baseline")] == "+0.229 †"
    assert table_row(text, "| 100 (1) |")[column(text, "vs best"):column(text, "vs best") + 2] == ["-0.057 *",
                                                                                                   "+0.172 †"]
    assert table_row(text, "| 5,000 (1) |")[column(text, "vs best")] == "-0.002"  # two sentences: noise
    baseline = table_row(text, "zero-shot prompt")
    assert baseline[column(text, "vs best")] == "-0.229 *" and baseline[column(text, "vs baseline")] == "baseline"
    assert ("Paired bootstrap over the 872 eval examples, 10,000 resamples, 95% percentile interval of the "
            "difference; * beyond noise vs the best cell, † beyond noise vs the baseline") in text
    assert "value ± h: h is half the width of the 95% bootstrap interval" in text
    rows = {r["# training data"]: r for r in csv.DictReader(csv_path.open())}
    low, value, high = (float(rows["1000"][f"Accuracy{b}"]) for b in (" lo", "", " hi"))
    assert low < value < high and (high - low) / 2 == pytest.approx(0.023, abs=0.003)  # a binomial 0.86 on 872
    assert rows["100"]["vs best test"] == "beyond noise" and rows["5000"]["vs best test"] == "within noise"
    assert float(rows["100"]["vs best hi"]) < 0 and float(rows["5000"]["vs best lo"]) < 0 <= float(
        rows["5000"]["vs best hi"])
    assert png.stat().st_size > 1000


def test_seeds_with_predictions_show_their_interval_and_their_spread(tmp_path):
    sweep = tmp_path / "seeds"
    for seed, correct in ((1, 700), (2, 740), (3, 720)):
        classifier_run(sweep, f"{seed}_seed={seed}", right_answers(correct), n=100, seed=seed)
    text = report.write_report(sweep)[0].read_text()
    accuracy = table_row(text, "| 100 (1) |")[column(text, "Accuracy")]
    assert accuracy.startswith("0.826 ± 0.0") and accuracy.endswith("(sd 0.023)")
    assert "sd: the spread across seeds" in text and "resamples the examples of all its seeds jointly" in text


def test_a_run_without_predictions_renders_without_an_interval_and_is_not_tested(tmp_path):
    sweep = tmp_path / "mixed"
    classifier_run(sweep, "0_n=100", right_answers(800), n=100)  # the best cell
    make_run(sweep, "1_n=1000", n=1000, metrics={"eval/accuracy": 0.86, "eval/f1": 0.85})  # no predictions.jsonl
    unreadable = make_run(sweep, "2_n=5000", n=5000, metrics={"eval/accuracy": 0.87, "eval/f1": 0.86})
    (unreadable / "predictions.jsonl").write_text("{not json\n")  # the same as none
    text = report.write_report(sweep)[0].read_text()
    for needle, shown in (("| 1,000 (1) |", "0.860"), ("| 5,000 (1) |", "0.870")):
        assert table_row(text, needle)[column(text, "Accuracy")] == shown
    assert " ± " in table_row(text, "| 100 (1) |")[column(text, "Accuracy")]
    assert "vs best" not in text  # nothing could be paired with the best cell
    assert "A value without ± has no per-example predictions" in text


def test_only_runs_on_the_same_examples_are_paired(tmp_path):
    sweep = tmp_path / "other_examples"
    classifier_run(sweep, "0_n=100", right_answers(700), n=100)
    classifier_run(sweep, "1_n=1000", right_answers(750), n=1000)
    classifier_run(sweep, "2_n=5000", right_answers(400, n=500), n=5000)  # 500 sentences only
    shuffled = references()[::-1]
    classifier_run(sweep, "3_n=20000", right_answers(740), gold=shuffled, n=20000)  # the 872, in another order
    text = report.write_report(sweep)[0].read_text()
    for needle in ("| 5,000 (1) |", "| 20,000 (1) |"):
        row = table_row(text, needle)
        assert row[column(text, "vs best")] == "not comparable" and " ± " in row[column(text, "Accuracy")]
    assert table_row(text, "| 100 (1) |")[column(text, "vs best")] == "-0.057 *"


def test_predictions_that_do_not_give_back_the_metrics_show_no_interval(tmp_path, caplog):
    sweep = tmp_path / "stale"
    classifier_run(sweep, "0_n=100", right_answers(700), n=100)
    stale = classifier_run(sweep, "1_n=1000", right_answers(750), n=1000)
    records.write_metrics({**json.loads((stale / "metrics.json").read_text()), "eval/accuracy": 0.9}, stale)
    text = report.write_report(sweep)[0].read_text()
    row = table_row(text, "| 1,000 (1) |")
    assert row[column(text, "Accuracy")] == "0.900" and " ± " in row[column(text, "F1")]
    assert "predictions.jsonl gives eval/accuracy 0.860092 and metrics.json 0.9" in caplog.text


def test_a_pruned_trial_is_listed_with_its_step_and_intermediate_objective(tmp_path):
    sweep = tmp_path / "pruned"
    classifier_run(sweep, "0_n=100", right_answers(700), n=100)
    make_run(sweep, "1_n=1000", n=1000, pruned={"step": 40, "epoch": 0.4878, "objective": "eval/accuracy",
                                                "value": 0.712, "reason": "below the median of earlier trials"})
    md, csv_path, _ = report.write_report(sweep)
    text = md.read_text()
    row = table_row(text, "| 1,000 (1) |")
    assert row[-1] == "pruned at step 40 (epoch 0.488)" and row[column(text, "Accuracy")] == "0.712 (intermediate)"
    assert row[column(text, "F1")] == "" and "vs best" not in text  # nothing to pair with the one finished run
    assert "1 finished, 0 failed, 1 pruned." in text and "(intermediate): the last Accuracy a pruned trial" in text
    rows = list(csv.DictReader(csv_path.open()))
    assert (rows[1]["Accuracy"], rows[1]["Intermediate objective"]) == ("", "0.712")
    assert rows[1]["Status"] == "pruned at step 40 (epoch 0.488)"
    runs = report.find_runs(sweep)
    assert [r.status for r in runs] == ["ok", "pruned"]


def test_a_retried_pruned_cell_shows_its_finished_run(tmp_path):
    sweep = tmp_path / "retried"
    make_run(sweep, "0_n=100", n=100, pruned={"step": 5, "epoch": 0.1, "objective": "eval/accuracy", "value": 0.5})
    make_run(sweep, "1_n=100", n=100, metrics={"eval/accuracy": 0.9, "eval/f1": 0.9})
    rows = list(csv.DictReader(report.write_report(sweep)[1].open()))
    assert [(r["Accuracy"], r["Status"], r["Intermediate objective"]) for r in rows] == [("0.9", "ok", "")]


def test_every_task_metric_gets_an_interval_but_the_counts(tmp_path):
    sweep, rng = tmp_path / "qa", np.random.default_rng(2)
    for n in (10, 20):
        rows = [{"reference": f"answer {i}", "exact_match": bool(rng.random() < 0.2), "token_f1": float(rng.random()),
                 "empty": False, "too_long": False, "repetitive": False, "wrong": True} for i in range(140)]
        metrics = {"eval/exact_match": np.mean([r["exact_match"] for r in rows]),
                   "eval/token_f1": np.mean([r["token_f1"] for r in rows]), "eval/empty": 0, "eval/too_long": 0,
                   "eval/repetitive": 0, "eval/wrong": 140}
        make_run(sweep, f"n{n}", n=n, kind="qa", objective="eval/token_f1", metrics=metrics, predictions=rows)
    text = report.write_report(sweep)[0].read_text()
    row = table_row(text, "| 10 (1) |")
    assert all(" ± " in row[column(text, name)] for name in ("Exact match", "Token F1"))
    assert row[column(text, "Wrong")] == "140" and row[column(text, "Empty")] == "0"  # counts: no interval
    assert {table_row(text, f"| {n} (1) |")[column(text, "vs best")][:2] for n in (10, 20)} in ({"be", "-0"},
                                                                                              {"be", "+0"})
