"""Shared test helpers: compose real configs from conf/, shrink them for a CPU, and
find the real datasets kept beside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from ftexp.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"

register_configs()
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Settings that make a run take seconds: a smaller tiny model, a few steps, few rows.
FAST = [
    "model.tiny.hidden_size=32",
    "model.tiny.intermediate_size=64",
    "model.tiny.vocab_size=400",
    "++data.generator.train_size=64",
    "++data.generator.eval_size=16",
    "train.max_steps=4",
    "train.batch_size=8",
    "train.logging_steps=1",
    "eval.batch_size=8",
    "cache_dir=null",
]


def compose_cfg(overrides=(), tmp_path: Path | None = None, fast: bool = True):
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=[*(FAST if fast else []), *overrides])
    if tmp_path is not None:
        with open_dict(cfg):
            cfg.output_dir = str(tmp_path)
    return cfg


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip("real datasets (shared/data beside the repository) are not present")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and two spinning threads on a
    busy 2-core machine make each step many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_setup(cfg, tmp_path):
    """(tokenizer, task, model, training records) of a composed tiny-model config."""
    from ftexp import modeling, recipes
    from ftexp.tasks import build_task, corpus

    pool, train_rows, _ = recipes.load_data(cfg)
    base = modeling.base_model_path(cfg, tmp_path, lambda: corpus(cfg, pool))
    tok = modeling.load_tokenizer(base, cfg.model)
    task = build_task(cfg.task, tokenizer=tok)
    model = modeling.load_model(base, cfg.model, cfg.quant, "cpu")
    return tok, task, model, task.to_records(train_rows)
