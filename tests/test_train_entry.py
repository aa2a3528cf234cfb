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
    (["objective=eval/nonsense"], "objective=eval/nonsense is not a metric a classification run writes"),
    (["objective=judge/relevance"], "this run has no LLM judge"),
    (["train.learnig_rate=1"], "learnig_rate"),
    (["logger.name=bogus"], "Invalid value 'bogus', expected one of [none, wandb]"),
    (["+train.epoch=3"], "train.epoch is not a setting ftexp knows. Did you mean train.epochs?"),
    (["+train.save_step=50"], "Did you mean train.save_steps"),
    (["train.learning_rate=-1"], "train.learning_rate=-1.0: must be a positive number"),
    (["train.batch_size=0"], "train.batch_size=0: must be at least 1"),
    (["task.generation.max_new_tokens=0"], "task.generation.max_new_tokens=0: must be at least 1"),
    (["eval.batch_tokens=0"], "eval.batch_tokens=0: must be at least 1 token"),
    (["train.save_steps=0"], "train.save_steps=0"),
    (["model.name_or_path=/no/such/model"], "model.name_or_path=/no/such/model: no such folder"),
    (["lora=default", "lora.target_modules=[no_such_proj]"],
     "'no_such_proj' is not a linear layer of LlamaForCausalLM. Linear layers found: ['down_proj', 'gate_proj'"),
    (["model.name_or_path=some-org/no-such-model"], "model.name_or_path=some-org/no-such-model: could not load its tokenizer"),
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
    assert not (tmp_path / "run" / "train_log.jsonl").exists(), "refused only after training started"


def test_a_diverging_run_stops_at_once_with_the_step_and_learning_rate(tmp_path):
    out = tmp_path / "run"
    proc = run_script("train.py", *[a for a in FAST if not a.startswith("train.max_steps")], "train.max_steps=20",
                      "train.logging_steps=1", "train.learning_rate=1e6", "eval.n=4", f"output_dir={out}")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in text, text[-2000:]
    assert "ftexp: error: training diverged at step " in text and "(train.learning_rate=1e+06)" in text, text[-2000:]
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert 1 <= len(logged) < 20  # kept, and cut short at the first non-finite step
    assert not (out / "metrics.json").exists()


BAD_FILES = {  # file body, what the message must say
    "empty": ("", "train.tsv could not be read as tsv (EmptyDataError"),
    "broken_jsonl": ('{"text": "a fine film", "label": 1}\n{"text": "dull", "lab\n', "train.jsonl could not be read as jsonl"),
    "corrupt_parquet": ("PAR1 not really parquet", "train.parquet could not be read as parquet"),
    "unknown_label": ("text\tlabel\na fine film\t1\ndull\t0\nmeh\t2\n", "label 2 (field 'label') has no word in task.labels"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_data_file_is_named_in_one_line(tmp_path, case):
    body, needle = BAD_FILES[case]
    suffix = {"broken_jsonl": "jsonl", "corrupt_parquet": "parquet"}.get(case, "tsv")
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "validation"):
        (folder / f"{split}.{suffix}").write_text(body)
    proc = run_script("train.py", *FAST, "eval.n=2", f"output_dir={tmp_path / 'run'}", f"data.path={folder}")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-2000:]
    assert needle in text, text[-2000:]
    assert "Traceback" not in text
