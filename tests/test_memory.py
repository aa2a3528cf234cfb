"""The weight-memory check before loading: bits per parameter, estimates against
what the loaded tiny models really take, a GPU too small refused with both numbers,
a CPU only warned, and the numbers recorded in metrics.json, each run's peak its own."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_cfg
from ftexp import memory, modeling, recipes
from ftexp.errors import ConfigError
from ftexp.tasks import corpus


def _q(name, double=True):
    return OmegaConf.create({"name": name, "bnb_4bit_use_double_quant": double})


def test_bits_per_quantized_weight():
    assert round(memory.quantized_bits(_q("nf4")), 2) == 4.13  # QLoRA's double quantization
    assert memory.quantized_bits(_q("nf4", double=False)) == 4.5
    assert memory.quantized_bits(_q("int8")) == 8


def test_preset_estimates_from_the_shipped_architecture():
    mcfg = compose_cfg(["model=llama2_13b"], fast=False).model
    split = memory.param_split(mcfg, mcfg.name_or_path)  # no network: the preset's architecture file
    assert split.exact and split.total == 13_015_864_320
    bf16 = memory.estimate_mb(split, _q("none"), torch.bfloat16)
    nf4 = memory.estimate_mb(split, _q("nf4"), torch.bfloat16)
    assert bf16 == pytest.approx(13_015_864_320 * 2 / 2**20)
    # 4.13 bits on the block linears, bf16 on embeddings, head and norms
    assert 6_800 < nf4 < 7_000 and nf4 < bf16 / 3.5


@pytest.mark.parametrize("twin,quant", [("tiny", "none"), ("tiny", "int8"), ("tiny", "nf4"),
                                        ("tiny_falcon", "nf4"), ("tiny_t5", "int8")])
def test_estimate_matches_the_loaded_model(tmp_path, twin, quant):
    cfg = compose_cfg([f"model={twin}", f"quant={quant}", "quant.bnb_4bit_compute_dtype=float32",
                       "model.tiny.hidden_size=128", "model.tiny.intermediate_size=512", "model.tiny.vocab_size=300",
                       "++data.generator.train_size=64"], fast=False)
    pool, _, _ = recipes.load_data(cfg)
    base = modeling.base_model_path(cfg, tmp_path, lambda: corpus(cfg, pool))
    est = memory.check(cfg.model, cfg.quant, base, "cpu")
    model = modeling.load_model(base, cfg.model, cfg.quant, "cpu")
    assert est["model/weight_memory_est_mb"] == pytest.approx(memory.measured_mb(model), rel=0.05)


def test_gpu_too_small_is_refused_with_both_numbers(monkeypatch):
    monkeypatch.setattr(memory, "gpu_memory_mb", lambda: (10_000.0, 16_000.0))
    cfg = compose_cfg(["model=llama2_13b", "quant=none"], fast=False)
    with pytest.raises(ConfigError) as err:
        memory.check(cfg.model, cfg.quant, cfg.model.name_or_path, "cuda")
    msg = str(err.value)
    assert "model=llama2_13b" in msg and "24,826 MB" in msg and "10,000 MB free" in msg and "16,000 MB" in msg
    assert "quant=nf4 would need ~6,868 MB" in msg


def test_gpu_that_fits_passes_and_reports(monkeypatch):
    monkeypatch.setattr(memory, "gpu_memory_mb", lambda: (10_000.0, 16_000.0))
    cfg = compose_cfg(["model=llama2_13b", "quant=nf4"], fast=False)
    out = memory.check(cfg.model, cfg.quant, cfg.model.name_or_path, "cuda")
    assert out["model/num_params"] == 13_015_864_320 and round(out["model/weight_memory_est_mb"]) == 6_868


def test_cpu_short_of_ram_only_warns(monkeypatch, caplog):
    monkeypatch.setattr(memory, "available_ram_mb", lambda: 1_000.0)
    cfg = compose_cfg(["model=falcon_7b", "quant=nf4", "quant.bnb_4bit_compute_dtype=float32"], fast=False)
    with caplog.at_level(logging.WARNING, logger="ftexp.memory"):
        out = memory.check(cfg.model, cfg.quant, cfg.model.name_or_path, "cpu")
    assert out["model/weight_memory_est_mb"] > 1_000
    assert "only 1,000 MB of RAM" in caplog.text


def test_unknown_size_skips_the_check_with_a_warning(tmp_path, caplog):
    mcfg = OmegaConf.create({"name": "mystery", "preset_config": None, "num_params": None,
                             "trust_remote_code": False, "dtype": "float32"})
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    with caplog.at_level(logging.WARNING, logger="ftexp.memory"):
        assert memory.check(mcfg, _q("none"), str(empty), "cpu") == {}
    assert "model.num_params" in caplog.text


def test_num_params_alone_still_gives_an_estimate(tmp_path):
    mcfg = OmegaConf.create({"name": "hub_model", "preset_config": None, "num_params": 1_000_000_000,
                             "trust_remote_code": False, "dtype": "bfloat16"})
    out = memory.check(mcfg, _q("none"), "someone/some-model", "cpu")  # not read: num_params is enough
    assert out["model/weight_memory_est_mb"] == pytest.approx(1e9 * 2 / 2**20, rel=1e-6)


def test_run_records_estimate_measured_and_peak(tmp_path):
    cfg = compose_cfg(["train.max_steps=1", "eval.n=4", "cache_dir=null"], tmp_path)
    recipes.finetune(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("model/num_params", "model/weight_memory_est_mb", "model/weight_memory_mb", "train/peak_memory_mb",
                "train/trainable_params", "train/trainable_pct"):
        assert metrics[key] is not None and metrics[key] > 0, key


@pytest.mark.skipif(not memory.CLEAR_REFS.exists(), reason="needs Linux's /proc/self/clear_refs")
def test_each_run_in_one_process_reports_its_own_peak(tmp_path):
    """A sweep runs its trials in one process: the second, smaller run's peak is its own,
    not the high-water mark the first one left behind."""
    overrides = ["train.max_steps=1", "eval.n=4", "device=cpu"]
    ballast = np.ones(400 * 2**20 // 8)  # 400 MiB the first run holds while it trains
    first = recipes.finetune(compose_cfg(overrides, tmp_path / "first"))["train/peak_memory_mb"]
    del ballast
    second = recipes.finetune(compose_cfg(overrides, tmp_path / "second"))["train/peak_memory_mb"]
    assert first > 400 and 0 < second < first - 300
