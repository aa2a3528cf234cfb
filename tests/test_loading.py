"""Loading a checkpoint whose config only remote code understands (the sharded
Falcon-7B's RefinedWebModel config) on transformers' own Falcon code, through the
architecture shipped with the preset."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import compose_cfg
from ftexp import modeling, recipes
from ftexp.errors import ConfigError
from ftexp.tasks import corpus

SMALL = ["model=tiny_falcon", "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128",
         "model.tiny.vocab_size=300", "++data.generator.train_size=32", "cache_dir=null"]


@pytest.fixture
def refined_web_checkpoint(tmp_path):
    """A tiny Falcon saved with a pre-integration config: model_type RefinedWebModel,
    n_head / n_layer, and an auto_map pointing at remote code."""
    cfg = compose_cfg(SMALL, fast=False)
    pool, _, _ = recipes.load_data(cfg)
    base = modeling.base_model_path(cfg, tmp_path, lambda: corpus(cfg, pool))
    config_file = tmp_path / "base_model" / "config.json"
    native = json.loads(config_file.read_text())
    (tmp_path / "falcon_native.json").write_text(json.dumps(native))  # what ftexp would ship for it
    old = {k: v for k, v in native.items() if k not in ("num_attention_heads", "num_hidden_layers")}
    old.update(model_type="RefinedWebModel", n_head=native["num_attention_heads"],
               n_layer=native["num_hidden_layers"], architectures=["RWForCausalLM"],
               auto_map={"AutoConfig": "configuration_RW.RWConfig",
                         "AutoModelForCausalLM": "modelling_RW.RWForCausalLM"})
    config_file.write_text(json.dumps(old))
    return cfg, base, tmp_path / "falcon_native.json"


def test_remote_code_config_loads_on_transformers_falcon_via_the_preset(refined_web_checkpoint):
    from safetensors.torch import load_file

    cfg, base, preset = refined_web_checkpoint
    mcfg = cfg.model.copy()
    mcfg.preset_config = str(preset)
    model = modeling.load_model(base, mcfg, cfg.quant, "cpu")
    assert type(model).__name__ == "FalconForCausalLM"
    saved = load_file(f"{base}/model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())  # every weight arrived under its own name


def test_remote_code_config_without_a_preset_says_what_to_do(refined_web_checkpoint):
    cfg, base, _ = refined_web_checkpoint
    with pytest.raises(ConfigError, match=r"trust_remote_code=true.*model.preset_config"):
        modeling.load_model(base, cfg.model, cfg.quant, "cpu")


def test_quantized_falcon_linears_are_really_quantized(tmp_path):
    import bitsandbytes as bnb

    cfg = compose_cfg([*SMALL, "quant=nf4", "lora=default", "quant.bnb_4bit_compute_dtype=float32"], fast=False)
    pool, _, _ = recipes.load_data(cfg)
    base = modeling.base_model_path(cfg, tmp_path, lambda: corpus(cfg, pool))
    model = modeling.load_model(base, cfg.model, cfg.quant, "cpu")
    kinds = {type(m) for n, m in model.named_modules() if n.endswith(("query_key_value", "dense_h_to_4h"))}
    assert kinds == {bnb.nn.Linear4bit}
    from transformers.models.falcon import modeling_falcon

    assert modeling_falcon.FalconLinear is not torch.nn.Linear  # the class swap was undone after loading
