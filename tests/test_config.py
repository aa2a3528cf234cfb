"""Composition and validation: every option composes, typos and bad combinations
fail early with a message that names the key."""

from __future__ import annotations

import json

import pytest
import yaml
from hydra.errors import ConfigCompositionException as HydraCompositionError
from omegaconf import OmegaConf

from conftest import CONF, compose_cfg
from ftexp import records
from ftexp.config import validate
from ftexp.errors import ConfigError

GROUPS = ["model", "quant", "lora", "data", "task", "logger", "train", "eval"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_of_every_group_composes(group, option):
    cfg = compose_cfg([f"{group}={option}"], fast=False)
    assert cfg[group] is not None
    if group in ("model", "data", "task", "quant", "lora", "logger"):
        assert cfg[group].name  # every option names itself


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes_and_validates(option):
    cfg = compose_cfg([f"experiment={option}"], fast=False)
    if cfg.judge.name == "openai":  # the judge's server is the user's to name (tests/test_judge_server.py)
        cfg = compose_cfg([f"experiment={option}", "judge.base_url=http://127.0.0.1:8000/v1",
                           "judge.model=some-instruct-model"], fast=False)
    validate(cfg)


def test_default_config_is_valid():
    cfg = compose_cfg(fast=False)
    validate(cfg)
    assert cfg.model.name == "tiny" and cfg.objective == "eval/accuracy"


def test_misspelt_key_fails_at_composition_naming_it():
    with pytest.raises(HydraCompositionError) as err:
        compose_cfg(["train.learnig_rate=0.1"])
    assert "learnig_rate" in str(err.value)


def test_wrong_type_fails_at_composition_naming_it():
    with pytest.raises(HydraCompositionError) as err:
        compose_cfg(["train.batch_size=lots"])
    assert "batch_size" in str(err.value)


# Settings with a fixed set of values, and those values.
CHOICES = {
    "model.arch": ["causal", "seq2seq"],
    "model.family": ["llama", "falcon", "t5", "gpt_neox"],
    "model.tiny.family": ["llama", "falcon", "t5", "gpt_neox"],
    "model.dtype": ["auto", "float32", "bfloat16", "float16"],
    "quant.name": ["none", "int8", "nf4"],
    "quant.bnb_4bit_quant_type": ["nf4", "fp4"],
    "quant.bnb_4bit_compute_dtype": ["float32", "bfloat16", "float16"],
    "quant.bnb_4bit_quant_storage": ["float32", "bfloat16", "float16"],
    "lora.bias": ["none", "all", "lora_only"],
    "task.kind": ["classification", "summarization", "qa", "scoring"],
    "train.truncation": ["keep_start", "keep_end"],
    "eval.method": ["generate", "likelihood", "both"],
    "eval.label_scoring": ["exact", "surface_forms"],
    "logger.name": ["none", "wandb"],
    "logger.mode": ["online", "offline"],
    "judge.name": ["none", "hf", "openai"],
}


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_a_value_outside_a_settings_choices_fails_at_composition_listing_them(key):
    with pytest.raises(HydraCompositionError) as err:
        compose_cfg([f"{key}=bogus"])
    message = f"{err.value}\n{err.value.__cause__}"
    assert f"{key}=bogus" in message and f"full_key: {key}" in message
    assert f"expected one of [{', '.join(CHOICES[key])}]" in message


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_each_choice_composes_and_reads_as_its_plain_string(key):
    for choice in CHOICES[key]:
        value = OmegaConf.select(compose_cfg([f"{key}={choice}"]), key)
        assert value == choice and str(value) == choice and f"{value}" == choice


def test_the_saved_config_holds_choices_as_plain_strings(tmp_path):
    cfg = compose_cfg(["model=tiny_t5", "train.truncation=keep_end"])
    records.write_config(cfg, tmp_path)
    text = (tmp_path / "config.yaml").read_text()
    assert "arch: seq2seq" in text and "truncation: keep_end" in text and "Arch" not in text
    saved = yaml.safe_load(text)
    assert type(saved["model"]["arch"]) is str and type(saved["eval"]["method"]) is str
    assert json.loads(json.dumps(records.config_dict(cfg)))["quant"]["name"] == "none"


def test_unknown_group_option_lists_the_valid_ones():
    with pytest.raises(HydraCompositionError) as err:
        compose_cfg(["model=llama99"])
    message = str(err.value)
    assert "llama99" in message and "tiny" in message and "llama2_13b" in message


def test_llama2_13b_composes_with_the_sst2_study_settings():
    cfg = compose_cfg(["model=llama2_13b", "quant=nf4", "lora=default", "data=sst2", "train.max_length=256",
                       "train.learning_rate=2e-4", "train.epochs=1"], fast=False)
    validate(cfg)
    assert cfg.model.name_or_path == "meta-llama/Llama-2-13b-chat-hf"
    assert cfg.quant.load_in_4bit and cfg.quant.bnb_4bit_use_double_quant


@pytest.mark.parametrize("overrides,needle", [
    (["quant=nf4", "lora=none"], "QLoRA trains adapters only"),
    (["quant=int8", "lora=none"], "QLoRA trains adapters only"),
    (["quant=nf4", "lora=default", "quant.load_in_8bit=true"], "int8 and nf4 are exclusive"),
    (["train.n=0"], "train.n=0"),
    (["train.epochs=null", "train.max_steps=null"], "stop condition"),
    (["eval.method=likelihood", "task=classification", "task.kind=qa"], "eval.method=likelihood"),
    (["task.labels={0: '',1: positive}"], "empty label word"),
    (["train.bf16=true", "train.fp16=true"], "pick one"),
    (["train.eval_every=0"], "train.eval_every=0: evaluate every k >= 1 optimizer steps"),
    (["train.eval_every=sometimes"], "train.eval_every=sometimes"),
    (["train.eval_every=10", "objective=judge/fluency"], "Use an eval/* objective"),
    (["train.early_stopping.patience=2"], "train.eval_every=null makes none"),
    (["train.early_stopping.patience=0", "train.eval_every=5"], "train.early_stopping.patience=0"),
    (["train.max_steps=null", "train.epochs=3", "epoch_results.epochs=[1]"],
     "the learning rate at epoch k of a 3-epoch run then depends on the total number of epochs"),
    (["train.max_steps=null", "train.epochs=3", "train.scheduler=constant", "epoch_results.epochs=[3]"],
     "whole epochs from 1 to below train.epochs=3"),
    (["train.epochs=3", "train.scheduler=constant", "epoch_results.epochs=[1]"], "Set train.max_steps=null"),
    (["train.max_steps=null", "train.epochs=3", "train.scheduler=constant", "epoch_results.epochs=[1]",
      "train.eval_every=5", "train.early_stopping.patience=1"], "Use one or the other"),
])
def test_each_cross_group_rule_refuses_with_a_message(overrides, needle):
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert needle in str(err.value)


def test_quantized_tiny_model_needs_whole_quantization_blocks():
    cfg = compose_cfg(["quant=nf4", "lora=default", "model.tiny.hidden_size=32"])
    with pytest.raises(ConfigError, match="multiple of 64"):
        validate(cfg)


CONFIG_FILES = sorted([*CONF.rglob("*.yaml"), *(CONF.parent / "sweeps").rglob("*.yaml")])


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(CONF.parent)))
def test_every_config_file_opens_with_what_it_is_for_and_how_to_run_it(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    prose = [line for line in header if not line.startswith("# @package")]
    commands = [line for line in header if "python train.py" in line or "python evaluate.py" in line]
    assert prose, f"{path.name} does not open with a comment saying what it is for"
    assert commands, f"{path.name}: its opening comment shows no command"
    if path.stem not in ("config", "default"):  # a selectable option shows itself being selected
        assert any(path.stem in line for line in commands), f"{path.name}: no command selects {path.stem}"
