"""The GPU paths, on a small real model (SmolLM2-135M-Instruct from its GGUF file) and the real
SST-2 files: bf16 LoRA, QLoRA nf4 with double quantization, int8 LoRA, TRL's own loss on CUDA
(its fused head, where ftexp's CPU loss steps aside), padding-free batches with flash attention,
and a 2-GPU DDP run. Each trains 24 steps and evaluates 128 dev sentences.

Marked ``gpu``: skipped without CUDA, and left out of the default run (``-m 'not gpu'``).
Run them, with a markdown report of their figures, through

    python -m ftexp.bench --gpu

or alone with ``python -m pytest tests/gpu -m gpu``. With ``FTEXP_GPU_REPORT=<dir>`` each test
writes its metrics there as ``<test>.json`` for the report.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose_cfg
from ftexp import recipes

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

SMOL = ["model=smollm2_135m_gguf", "data=sst2", "device=cuda", "train.n=192", "train.max_steps=24",
        "train.batch_size=8", "train.learning_rate=1e-3", "train.logging_steps=4", "eval.n=128",
        "eval.method=both", "lora=default"]


def _record(name: str, metrics: dict) -> None:
    out = os.environ.get("FTEXP_GPU_REPORT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(metrics, indent=1, default=str))


def _run(tmp_path, shared_data, name: str, *overrides: str) -> dict:
    cfg = compose_cfg([*SMOL, f"data.path={shared_data / 'SST-2'}", *overrides], tmp_path / name, fast=False)
    metrics = recipes.finetune(cfg)
    _record(name, metrics)
    assert metrics["train/loss_last"] < metrics["train/loss_first"], "the loss did not fall"
    assert metrics["eval/likelihood_accuracy"] > 0.6, "no better than a coin after 24 steps"
    assert metrics["eval/irregular"] <= 0.1 * metrics["eval/n"]
    return metrics


def test_bf16_lora(tmp_path, shared_data):
    m = _run(tmp_path, shared_data, "bf16_lora", "train.bf16=true")
    assert m["train/mfu"] > 0  # measured against the card's bf16 figure


def test_qlora_nf4_with_double_quantization(tmp_path, shared_data):
    m = _run(tmp_path, shared_data, "qlora_nf4", "quant=nf4", "train.bf16=true")
    assert m["model/weight_memory_mb"] < 0.5 * 540  # 4-bit linear layers: well under the fp32 weights


def test_int8_lora(tmp_path, shared_data):
    m = _run(tmp_path, shared_data, "int8_lora", "quant=int8")
    assert m["model/weight_memory_mb"] < 0.75 * 540


def test_trl_loss_on_cuda_with_the_whole_batch(tmp_path, shared_data):
    """On CUDA TRL's own loss runs (ftexp's labelled-positions loss is for CPUs and head adapters),
    and a batch is one pass unless train.micro_batch_size says otherwise."""
    m = _run(tmp_path, shared_data, "trl_loss", "train.bf16=true")
    assert m["train/micro_batch_size"] == 8


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_padding_free_with_flash_attention(tmp_path, shared_data):
    m = _run(tmp_path, shared_data, "padding_free", "train.bf16=true", "train.padding_free=true",
             "model.attn_implementation=flash_attention_2")
    assert m["train/padding_ratio"] == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ddp_on_two_gpus(tmp_path, shared_data):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(ROOT / "train.py"), *SMOL,
           f"data.path={shared_data / 'SST-2'}", "train.bf16=true", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    _record("ddp_on_two_gpus", m)
    assert m["train/world_size"] == 2 and m["train/global_batch_size"] == 16
    assert m["train/loss_last"] < m["train/loss_first"]
