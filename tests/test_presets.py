"""Model presets and their shipped architectures: the studies' published
trainable-parameter counts, computed offline on the meta device; every preset's
parameter count; and the header every config file opens with."""

from __future__ import annotations

import pytest

from conftest import CONF, compose_cfg
from ftexp import architecture, presets
from ftexp.errors import ConfigError

# experiment preset -> (trainable params, all params incl. adapters, LoRA targets): the studies' printed numbers
PUBLISHED = {
    # Falcon-7B, nf4, LoRA r=16 on all linear layers (lm_head excluded)
    "samsum_falcon_7b_qlora": (32_636_928, 6_954_357_632,
                               ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]),
    # Llama-2-7b, int8, LoRA r=32 on every projection + lm_head
    "commonlit_llama2_7b_int8": (81_108_992, 6_819_524_608,
                                 ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj",
                                  "v_proj"]),
    # flan-t5-base, LoRA r=32 on q, v
    "dialogsum_flan_t5_lora": (3_538_944, 251_116_800, ["q", "v"]),
    "dialogsum_flan_t5_full": (247_577_856, 247_577_856, []),
    "lamini_docs_pythia_70m": (70_426_624, 70_426_624, []),
}


@pytest.mark.parametrize("experiment", sorted(PUBLISHED))
def test_published_trainable_parameter_counts(experiment):
    """Computed offline from the shipped architectures on the meta device, no weights."""
    trainable, total, targets = PUBLISHED[experiment]
    cfg = compose_cfg([f"experiment={experiment}"], fast=False)
    counts = presets.count_trainable(cfg.model, cfg.lora)
    assert (counts["trainable"], counts["total"], counts["targets"]) == (trainable, total, targets)


def test_count_follows_command_line_lora_overrides():
    cfg = compose_cfg(["model=flan_t5_base", "lora=default", "lora.r=16", "lora.target_modules=[q,v]"], fast=False)
    assert presets.count_trainable(cfg.model, cfg.lora)["trainable"] == 3_538_944 // 2


MODEL_PRESETS = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if not p.stem.startswith("tiny"))


@pytest.mark.parametrize("name", MODEL_PRESETS)
def test_model_preset_num_params_matches_its_architecture(name):
    cfg = compose_cfg([f"model={name}"], fast=False)
    assert cfg.model.preset_config, f"model={name} ships no architecture"
    model = architecture.preset_meta_model(cfg.model.preset_config)
    assert architecture.parameter_count(model) == cfg.model.num_params
    assert next(model.parameters()).device.type == "meta"  # no weights were made
    assert model.config.is_encoder_decoder == (cfg.model.arch == "seq2seq")


def test_tiny_twins_cover_every_family():
    families = {compose_cfg([f"model={m}"], fast=False).model.family for m in MODEL_PRESETS}
    twins = {compose_cfg([f"model={p.stem}"], fast=False).model.tiny.family
             for p in (CONF / "model").glob("tiny*.yaml")}
    assert families <= twins == {"llama", "falcon", "t5", "gpt_neox"}


def test_cli_prints_the_count(capsys):
    assert presets.main(["experiment=dialogsum_flan_t5_lora"]) == 0
    out = capsys.readouterr().out
    assert "trainable params: 3,538,944 || all params: 251,116,800 || trainable%: 1.4093" in out
    assert "weights on a GPU with quant=none: ~944 MB" in out


def test_cli_without_an_architecture_is_a_clear_error(capsys):
    assert presets.main(["model=tiny"]) == 2
    assert "model.preset_config" in capsys.readouterr().err


def test_unknown_architecture_file_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"model.preset_config='nope'.*falcon_7b"):
        architecture.load_config("nope")
