"""``python -m ftexp.export``: a trained run as a plain transformers folder with a model card.
The exported model, loaded with nothing but transformers, gives the run's own logits and
predictions; the card's command composes the run's config again; bad input is refused."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, compose_cfg
from ftexp import evaluation, export, identity, modeling, recipes, records
from ftexp.config import load_run_config
from ftexp.errors import ConfigError


@pytest.fixture(scope="module", params=["default", "none"])
def trained(request, tmp_path_factory):
    """A tiny LoRA run and a tiny full fine-tune, each with its predictions."""
    run = tmp_path_factory.mktemp(f"run_{request.param}")
    recipes.finetune(compose_cfg([f"lora={request.param}", "eval.n=8", "train.max_steps=6"], run))
    return run


def test_the_exported_model_gives_the_runs_logits_and_predictions(trained, tmp_path):
    out = export.export({"run": str(trained), "out": str(tmp_path / "exported")})
    plain = AutoModelForCausalLM.from_pretrained(out)  # transformers alone
    tokenizer = AutoTokenizer.from_pretrained(out)
    cfg = load_run_config(trained)
    model, _ = modeling.load_trained(cfg, trained, "cpu")
    rows = [json.loads(line) for line in (trained / "predictions.jsonl").read_text().splitlines()]
    batch = tokenizer([r["input"] for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected, got = model(**batch).logits, plain(**batch).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    outputs = evaluation.generate(plain, tokenizer, [r["input"] for r in rows],
                                  OmegaConf.create(OmegaConf.to_container(cfg.task.generation)), batch_size=8)
    task = recipes.load_task(cfg, tokenizer)
    assert [task.clean_prediction(o) for o in outputs] == [r["prediction"] for r in rows]
    assert not any(p.name.startswith("adapter") for p in out.iterdir())  # merged: no adapter files left


def test_the_model_card_holds_the_metrics_and_a_command_that_composes_the_run_again(trained, tmp_path):
    out = export.export({"run": str(trained), "out": str(tmp_path / "exported")})
    card = (out / "README.md").read_text()
    metrics = json.loads((trained / "metrics.json").read_text())
    assert f"| `eval/accuracy` | {metrics['eval/accuracy']:.4g} |" in card
    assert "library_name: transformers" in card and ("merge_and_unload" in card or "fully fine-tuned" in card)
    command = card.split("## Train it again\n\n```bash\n", 1)[1].split("\n", 1)[0]
    args = shlex.split(command)
    assert args[:2] == ["python", "train.py"]
    again = compose_cfg([a for a in args[2:] if not a.startswith("output_dir=")], fast=False)
    saved = yaml.safe_load((trained / "config.yaml").read_text())
    differ = [d for d in identity.config_differences(saved, records.config_dict(again))
              if not d[0].startswith(("output_dir", "run_name", "cache_dir", "device", "logger"))]
    assert differ == []


def test_bad_export_settings_are_refused_with_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"'ouput=x': not an export setting. Valid settings: run=<"):
        export.parse(["run=x", "ouput=x"])
    with pytest.raises(ConfigError, match="run=<run dir> is required"):
        export.parse(["dtype=float32"])
    with pytest.raises(ConfigError, match="dtype=int4: one of auto, float32, bfloat16, float16"):
        export.parse(["run=x", "dtype=int4"])
    with pytest.raises(ConfigError, match="no config.yaml there"):
        export.export({"run": str(tmp_path)})


def test_an_upload_that_fails_keeps_the_folder_and_says_why(trained, tmp_path):
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "ftexp.export", f"run={trained}", f"out={out}",
                           "push_to_hub=someone/some-model"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "push_to_hub=someone/some-model: the upload failed" in proc.stderr
    assert f"The exported folder is kept at {out}" in proc.stderr
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    assert "Traceback" not in proc.stderr


def test_a_qlora_run_merges_into_the_unquantized_base_and_its_card_says_so(tmp_path):
    run = tmp_path / "qlora"
    recipes.finetune(compose_cfg(["quant=nf4", "lora=default", "quant.bnb_4bit_compute_dtype=float32",
                                  "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128",
                                  "train.max_steps=2", "eval.n=4"], run))
    out = export.export({"run": str(run), "out": str(tmp_path / "exported")})
    card = (out / "README.md").read_text()
    assert "trained the adapter on a 4-bit nf4 base" in card and "unquantized base loaded in torch.float32" in card
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(plain.config, "quantization_config")  # plain float weights, loadable without bitsandbytes
    assert all(p.dtype == torch.float32 for p in plain.parameters())
