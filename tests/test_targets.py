"""LoRA target discovery on the loaded model, quantized or not: "all-linear" finds
every linear layer (torch Linear and its subclasses, bitsandbytes Linear8bitLt and
Linear4bit) and leaves the output head out unless asked; named targets follow the
family's names; lm_head adapters really train."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_cfg
from ftexp import architecture, modeling, recipes, training
from ftexp.rows import tokenize
from ftexp.errors import ConfigError
from ftexp.tasks import build_task, corpus

TWINS = {"llama": "tiny", "falcon": "tiny_falcon", "t5": "tiny_t5", "gpt_neox": "tiny_gpt_neox"}
LINEARS = {
    "llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "falcon": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
    "gpt_neox": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
    "t5": ["k", "o", "q", "v", "wi_0", "wi_1", "wo"],
}
# transformers 5 calls every head lm_head (GPT-NeoX checkpoints' embed_out is renamed on load)
HEAD = {family: "lm_head" for family in LINEARS}
SMALL = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.vocab_size=300",
         "++data.generator.train_size=64", "++data.generator.eval_size=8", "cache_dir=null"]


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory):
    """One saved tiny base model per family (random weights, tokenizer trained on the spot)."""
    bases = {}
    for family, twin in TWINS.items():
        cfg = compose_cfg([f"model={twin}", *SMALL], fast=False)
        out = tmp_path_factory.mktemp(family)
        pool, _, _ = recipes.load_data(cfg)
        bases[family] = (cfg, modeling.base_model_path(cfg, out, lambda: corpus(cfg, pool)))
    return bases


def _quant(name: str):
    cfg = compose_cfg([f"quant={name}", "quant.bnb_4bit_compute_dtype=float32"], fast=False)
    return cfg.quant


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
@pytest.mark.parametrize("family", sorted(TWINS))
def test_all_linear_walks_the_loaded_model(tiny_bases, family, quant):
    import bitsandbytes as bnb

    cfg, base = tiny_bases[family]
    model = modeling.load_model(base, cfg.model, _quant(quant), "cpu")
    assert modeling.find_linear_targets(model) == LINEARS[family]
    assert modeling.find_linear_targets(model, include_lm_head=True) == sorted(LINEARS[family] + [HEAD[family]])
    kind = {"none": torch.nn.Linear, "int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}[quant]
    found = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, kind)}
    if quant == "none":
        assert found == set(LINEARS[family]) | {HEAD[family]}
    else:  # every block linear was quantized (Falcon's FalconLinear included); T5 keeps "wo" in full precision
        assert found == set(LINEARS[family]) - ({"wo"} if family == "t5" else set())


def _lora(**kw):
    base = dict(name="t", enabled=True, r=4, alpha=8, dropout=0.0, target_modules="all-linear",
                include_lm_head=False, bias="none", modules_to_save=None)
    return OmegaConf.create({**base, **kw})


def _lora_size(model, names):
    """r x (in + out) for every linear whose last name is in ``names``, r=4."""
    total = 0
    for n, m in model.named_modules():
        if n.split(".")[-1] in names and hasattr(m, "in_features"):
            total += 4 * (m.in_features + m.out_features)
    return total


@pytest.mark.parametrize("quant", ["none", "nf4", "int8"])
def test_adapters_on_all_linear_count_r_times_in_plus_out(tiny_bases, quant):
    cfg, base = tiny_bases["llama"]
    qcfg = _quant(quant)
    model = modeling.load_model(base, cfg.model, qcfg, "cpu")
    expected = _lora_size(model, LINEARS["llama"])
    wrapped = modeling.attach_adapters(model, _lora(), qcfg)
    trainable, total = architecture.count_parameters(wrapped)
    assert trainable == expected and trainable < total


def test_lm_head_is_a_target_only_when_asked(tiny_bases):
    cfg, base = tiny_bases["gpt_neox"]
    model = modeling.load_model(base, cfg.model, _quant("none"), "cpu")
    assert "lm_head" not in modeling.resolve_targets(_lora(), model)
    assert modeling.resolve_targets(_lora(include_lm_head=True), model)[-1] == "lm_head"
    assert modeling.resolve_targets(_lora(target_modules=["query_key_value"], include_lm_head=True), model) == [
        "query_key_value", "lm_head"]


def test_llama_style_names_map_to_t5_names(tiny_bases):
    cfg, base = tiny_bases["t5"]
    model = modeling.load_model(base, cfg.model, _quant("none"), "cpu")
    assert modeling.resolve_targets(_lora(target_modules=["q_proj", "v_proj"]), model) == ["q", "v"]


def test_fused_qkv_model_refuses_separate_projections_with_a_clear_error(tiny_bases):
    cfg, base = tiny_bases["falcon"]
    model = modeling.load_model(base, cfg.model, _quant("none"), "cpu")
    with pytest.raises(ConfigError, match=r"lora.target_modules: 'q_proj'.*query_key_value.*all-linear"):
        modeling.resolve_targets(_lora(target_modules=["q_proj", "v_proj"]), model)
    with pytest.raises(ConfigError, match=r"lora.target_modules='every-linear'"):
        modeling.resolve_targets(_lora(target_modules="every-linear"), model)


def test_head_adapter_rows_and_labels_match_sfttrainers(tiny_bases, tmp_path):
    """With lm_head adapted, the run trains through transformers' Trainer; its rows must
    be exactly the ones TRL's SFTTrainer prepares (prompt tokens -100, same cuts)."""
    cfg, base = tiny_bases["llama"]
    tok = modeling.load_tokenizer(base, cfg.model)
    task = build_task(cfg.task, tokenizer=tok)
    _, train_rows, _ = recipes.load_data(cfg)
    records = task.to_records(train_rows.select(range(12)))
    model = modeling.load_model(base, cfg.model, _quant("none"), "cpu")
    for truncation, max_length in (("keep_start", 256), ("keep_end", 12), ("keep_start", 12)):
        with_cfg = OmegaConf.merge(cfg, {"train": {"max_length": max_length, "truncation": truncation}})
        if (truncation, max_length) == ("keep_start", 12):  # every answer cut off: refused, with the way out
            for build in (training.build_sft_trainer, training.build_head_adapter_trainer):
                with pytest.raises(ConfigError, match="cuts the answer off every training row"):
                    build(with_cfg, model, tok, records, tmp_path / "x", "cpu", [], [])
            continue
        sft = training.build_sft_trainer(with_cfg, model, tok, records, tmp_path / "sft", "cpu", [], [])
        ours = training.build_head_adapter_trainer(with_cfg, model, tok, records, tmp_path / "ours", "cpu", [], [])
        assert ours.train_dataset["input_ids"] == sft.train_dataset["input_ids"]
        assert ours.train_dataset["labels"] == sft.train_dataset["labels"]
        assert all(len(ids) <= max_length for ids in sft.train_dataset["input_ids"])
        if max_length == 256:  # whole rows: every prompt is there, and masked
            assert all(row[0] == -100 and row[-1] != -100 for row in ours.train_dataset["labels"])
        if truncation == "keep_end":  # cut from the left: the answer and its EOS survive
            full = tokenize(records, tok)
            assert len(sft.train_dataset) == len(full)  # no row lost its answer
            for cut, whole in zip(sft.train_dataset["input_ids"], full["input_ids"]):
                assert cut == whole[-max_length:]


def test_lm_head_adapter_trains(tiny_bases, tmp_path):
    cfg, _ = tiny_bases["llama"]
    run = compose_cfg(["model=tiny", *SMALL, "lora=default", "lora.include_lm_head=true", "lora.r=4",
                       "train.max_steps=2", "train.learning_rate=1e-2", "train.batch_size=4", "eval.enabled=false",
                       "train.logging_steps=1"], tmp_path)
    metrics = recipes.finetune(run)
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    head_b = [v for k, v in weights.items() if "lm_head" in k and "lora_B" in k]
    assert head_b and head_b[0].abs().sum() > 0  # lora_B starts at zero: it moved, so the head adapter trained
    assert metrics["train/steps"] == 2
