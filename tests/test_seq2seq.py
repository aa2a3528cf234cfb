"""Encoder-decoder training from the same recipe: the prompt feeds the encoder, only
the completion is in the labels; LoRA on q,v and full fine-tuning both train, and the
run directory holds what a decoder-only run's holds."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from conftest import compose_cfg
from ftexp import modeling, recipes, training
from ftexp.errors import ConfigError
from ftexp.tasks import build_task, corpus

SMALL = ["model=tiny_t5", "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128",
         "model.tiny.vocab_size=300", "++data.generator.train_size=64", "++data.generator.eval_size=8",
         "train.batch_size=4", "train.logging_steps=1", "eval.batch_size=8", "cache_dir=null"]


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    cfg = compose_cfg(SMALL, fast=False)
    pool, train_rows, _ = recipes.load_data(cfg)
    base = modeling.base_model_path(cfg, tmp_path_factory.mktemp("t5"), lambda: corpus(cfg, pool))
    tok = modeling.load_tokenizer(base, cfg.model)
    task = build_task(cfg.task, tokenizer=tok)
    return cfg, base, tok, task.to_records(train_rows.select(range(8)))


def test_only_completion_tokens_are_labels(t5, tmp_path):
    cfg, base, tok, records = t5
    model = modeling.load_model(base, cfg.model, cfg.quant, "cpu")
    trainer = training.build_seq2seq_trainer(cfg, model, tok, records, tmp_path, "cpu", [], [])
    batch = next(iter(trainer.get_train_dataloader()))
    by_prompt = {tuple(tok(r["prompt"])["input_ids"]): r for r in records}
    for ids, attn, labels, dec in zip(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                      batch["decoder_input_ids"]):
        record = by_prompt[tuple(ids[attn.bool()].tolist())]  # the encoder sees exactly the prompt
        kept = labels[labels != -100].tolist()
        assert kept == tok(text_target=record["completion"].strip())["input_ids"]  # completion + EOS, nothing else
        assert kept[-1] == tok.eos_token_id
        assert (labels[len(kept):] == -100).all()  # label padding never counts
        # the decoder reads the labels shifted right, from the start token
        assert dec[0].item() == model.config.decoder_start_token_id and dec[1:len(kept)].tolist() == kept[:-1]


def test_keep_end_cuts_the_prompt_from_the_left_and_restores_the_tokenizer(t5):
    _, _, tok, _ = t5
    rows = Dataset.from_list([{"prompt": "one two three four five six seven eight nine ten", "completion": " done"}])
    side = tok.truncation_side
    kept_end = training.tokenize_seq2seq(rows, tok, 5, "keep_end")[0]
    kept_start = training.tokenize_seq2seq(rows, tok, 5, "keep_start")[0]
    assert tok.truncation_side == side
    assert len(kept_end["input_ids"]) == 5 and tok.decode(kept_end["input_ids"], skip_special_tokens=True).endswith("ten")
    assert tok.decode(kept_start["input_ids"], skip_special_tokens=True).startswith("one")
    assert kept_end["labels"] == kept_start["labels"] == tok(text_target="done")["input_ids"]


@pytest.mark.parametrize("adapter", [["lora=default", "lora.target_modules=[q,v]", "lora.r=8"], ["lora=none"]],
                         ids=["lora_qv", "full"])
def test_t5_trains_and_evaluates_like_a_decoder_only_run(tmp_path, adapter):
    cfg = compose_cfg([*SMALL, *adapter, "train.max_steps=12", "train.learning_rate=3e-3", "eval.n=8"], tmp_path)
    metrics = recipes.finetune(cfg)
    assert metrics["train/loss_last"] < metrics["train/loss_first"]
    lora = adapter[0] == "lora=default"
    assert (metrics["train/trainable_pct"] < 100) == lora
    for key in ("eval/accuracy", "eval/f1", "eval/irregular", "eval/n", "train/tokens_per_s", "train/peak_memory_mb",
                "model/weight_memory_est_mb"):
        assert key in metrics, key
    rows = [json.loads(l) for l in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {"input", "reference", "prediction"} <= set(rows[0])
    saved = tmp_path / ("adapter" if lora else "model")
    assert (saved / "tokenizer.json").exists()
    if lora:
        targets = json.loads((saved / "adapter_config.json").read_text())["target_modules"]
        assert sorted(targets) == ["q", "v"]


def test_only_t5_is_an_encoder_decoder_twin(tmp_path):
    cfg = compose_cfg([*SMALL, "model.arch=causal"], tmp_path)
    with pytest.raises(ConfigError, match=r"model.arch=causal with model.tiny.family=t5"):
        modeling.build_tiny(cfg.model, ["some text"] * 4, 0, tmp_path / "base")
