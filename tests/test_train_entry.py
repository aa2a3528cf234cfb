"""The real entry point as a user runs it: a short run ends with its result row and
returns the objective; bad input gives one clear message and a non-zero exit."""

from __future__ import annotations

import json

import pytest

from conftest import FAST, run_script


def test_train_py_runs_and_prints_the_result_row(tmp_path):
    out = tmp_path / "run"
    proc = run_script("train.py", *FAST, "eval.n=8", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[ftexp]" in proc.stdout and "accuracy" in proc.stdout and "irregular" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval/n"] == 8


@pytest.mark.parametrize("args,needle", [
    (["model=llama99"], "Available options in 'model'"),
    (["data=sst2", "data.path=/no/such/folder"], "data.path=/no/such/folder does not exist"),
    (["data.columns.text=review"], "column(s) not found: data.columns.text='review'. Columns found:"),
    (["train.n=100000"], "train.n=100000 but the split has only 64 rows"),
    (["quant=nf4", "lora=none"], "QLoRA trains adapters only"),
    (["train.epochs=null"], "stop condition"),
    (["task.labels={0: '',1: positive}"], "empty label word"),
    (["objective=eval/nonsense"], "objective='eval/nonsense' is not in this run's metrics"),
    (["train.learnig_rate=1"], "learnig_rate"),
])
def test_bad_input_gives_a_clear_message_and_nonzero_exit(tmp_path, args, needle):
    overrides = [a for a in FAST if not (a.startswith("train.max_steps") and "train.epochs=null" in args)]
    if "train.epochs=null" in args:
        overrides = [a for a in overrides if not a.startswith("train.max_steps")] + ["train.max_steps=null"]
    proc = run_script("train.py", *overrides, "eval.n=4", f"output_dir={tmp_path / 'run'}", *args)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert needle in text, text[-2000:]
    assert "Traceback" not in text
