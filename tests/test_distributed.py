"""One run over two processes: torchrun with the gloo backend on the CPU. Both ranks use one
run directory, rank 0 alone writes the records, and the loss equals a one-process run with
the same global batch (2 x 4 rows = 1 x 8 rows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import FAST, ROOT



SAME = [*[a for a in FAST if not a.startswith(("train.batch_size", "train.max_steps"))],
        "train.max_steps=6", "train.logging_steps=1", "train.group_by_length=false", "eval.n=8"]


def _run(cmd, cwd):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_one_run_like_one_process_with_the_same_global_batch(tmp_path):
    one = tmp_path / "one"
    _run([sys.executable, str(ROOT / "train.py"), *SAME, "train.batch_size=8", f"output_dir={one}"], ROOT)
    # no output_dir: both ranks must agree on the ${ftexp_now:...} folder by themselves
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          str(ROOT / "train.py"), *SAME, "train.batch_size=4", f"hydra.run.dir={tmp_path}/runs/" + "${ftexp_now:%H-%M-%S}"],
         tmp_path)
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1, runs
    two = runs[0]
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["train/world_size"] == 2 and m1["train/world_size"] == 1
    assert m2["train/global_batch_size"] == m1["train/global_batch_size"] == 8
    assert m2["train/steps"] == m1["train/steps"] == 6
    assert _losses(two) == pytest.approx(_losses(one), rel=2e-3)
    assert len(_losses(two)) == 6  # one train_log row per step: rank 1 wrote none
    assert m2["eval/n"] == 8 and len((two / "predictions.jsonl").read_text().splitlines()) == 8  # evaluated once


@pytest.mark.parametrize("name,kind", [("ddp", "MULTI_GPU"), ("fsdp_qlora", "FSDP"), ("deepspeed_zero3", "DEEPSPEED")])
def test_shipped_accelerate_configs_load_and_say_how_to_launch(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.name == kind
    head = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"--config_file accelerate/{name}.yaml train.py" in line for line in head)
    if name != "ddp":  # sharding 4-bit weights needs them stored in the compute dtype
        assert any("quant.bnb_4bit_quant_storage=bfloat16" in line for line in head)
