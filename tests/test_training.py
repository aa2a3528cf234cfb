"""Training behaviour on the tiny model: completion-only masks, falling loss,
quantized (int8 / nf4) LoRA runs, determinism, and the run-directory contract."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import compose_cfg, tiny_setup
from ftexp import modeling, recipes, training
from ftexp.config import validate
from ftexp.errors import ConfigError
from ftexp.tasks import build_task

CONTRACT_KEYS = ["train/loss_first", "train/loss_last", "train/runtime_s", "train/samples", "train/tokens_per_s",
                 "train/trainable_params", "train/peak_memory_mb", "eval/n", "eval/accuracy", "eval/f1",
                 "eval/irregular", "eval/runtime_s", "eval/peak_memory_mb"]


def _setup(cfg, tmp_path):
    return tiny_setup(cfg, tmp_path)


def test_trainer_batch_masks_prompt_tokens_and_keeps_completion_tokens(tmp_path):
    cfg = compose_cfg([], tmp_path)
    tok, task, model, records = _setup(cfg, tmp_path)
    trainer = training.build_sft_trainer(cfg, model, tok, records, tmp_path / "ckpt", "cpu", [], [])
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for row in range(ids.shape[0]):
        real = attn[row].bool()
        seq, lab = ids[row][real].tolist(), labels[row][real].tolist()
        text = tok.decode(seq, skip_special_tokens=False)
        record = next(r for r in records if text.endswith(r["prompt"] + r["completion"] + tok.eos_token)
                      or r["prompt"] in text)
        n_prompt = len(tok(record["prompt"])["input_ids"])  # BOS + prompt tokens
        assert all(l == -100 for l in lab[:n_prompt]), "a prompt token carries a label"
        kept = [t for t, l in zip(seq, lab) if l != -100]
        assert kept, "no completion token is trained"
        assert tok.decode(kept) == record["completion"] + tok.eos_token
        assert lab[n_prompt:] == seq[n_prompt:]
    # padding never contributes to the loss
    assert (labels[~attn.bool()] == -100).all()


def test_loss_falls_on_a_learnable_task(tmp_path):
    cfg = compose_cfg(["train.max_steps=60", "train.warmup_steps=5", "train.learning_rate=2e-3",
                       "++data.generator.train_size=320", "eval.enabled=false",
                       "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "train.logging_steps=5"],
                      tmp_path)
    metrics = recipes.finetune(cfg)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) >= 8
    assert metrics["train/loss_last"] < 0.3 * metrics["train/loss_first"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_lora_runs_go_through_on_the_tiny_model(tmp_path, quant):
    cfg = compose_cfg([f"quant={quant}", "lora=default", "quant.bnb_4bit_compute_dtype=float32",
                       "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128",
                       "train.max_steps=3", "eval.n=8"], tmp_path)
    metrics = recipes.finetune(cfg)
    for key in CONTRACT_KEYS:
        assert key in metrics, key
    _, total = metrics["train/trainable_params"], metrics["train/total_params"]
    assert 0 < metrics["train/trainable_params"] < total
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    import bitsandbytes as bnb
    kinds = {"int8": bnb.nn.Linear8bitLt, "nf4": bnb.nn.Linear4bit}
    # the adapters sit on quantized layers: the quantized base was really used
    base = modeling.load_model(str(tmp_path / "base_model"), cfg.model, cfg.quant, "cpu")
    assert any(isinstance(m, kinds[quant]) for m in base.modules())


def test_same_seed_same_result(tmp_path):
    a = recipes.finetune(compose_cfg(["eval.n=8"], tmp_path / "a"))
    b = recipes.finetune(compose_cfg(["eval.n=8"], tmp_path / "b"))
    assert a["train/loss_last"] == b["train/loss_last"]
    assert (tmp_path / "a" / "predictions.jsonl").read_text() == (tmp_path / "b" / "predictions.jsonl").read_text()


@pytest.mark.parametrize("lora", ["none", "default"])
def test_micro_batches_train_like_the_whole_batch(tmp_path, lora):
    """train.batch_size=8 as micro-batches of 2 (gradients added up over 4 passes) trains the same rows
    each step to the same losses and weights as the 8 rows at once (dropout off: its masks are drawn per
    pass). On a CPU the default splits a batch of 8 into micro-batches of 4."""
    logs, weights = {}, {}
    for micro in (8, 2, None):
        out = tmp_path / str(micro)
        cfg = compose_cfg([f"lora={lora}", "lora.dropout=0", f"train.micro_batch_size={micro or 'null'}",
                           "eval.enabled=false"], out)
        metrics = recipes.finetune(cfg)
        assert metrics["train/micro_batch_size"] == (micro or 4)
        assert metrics["train/global_batch_size"] == 8
        logs[micro] = [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, (out / "train_log.jsonl")
                       .read_text().splitlines()) if "grad_norm" in r]
        weights[micro] = load_file(next((out / ("model" if lora == "none" else "adapter")).glob("*.safetensors")))
    for micro in (2, None):
        assert [s for s, _, _ in logs[micro]] == [s for s, _, _ in logs[8]] == [1, 2, 3, 4]
        for (_, loss, norm), (_, loss8, norm8) in zip(logs[micro], logs[8]):
            assert loss == pytest.approx(loss8, rel=1e-4) and norm == pytest.approx(norm8, rel=1e-3)
        for name, tensor in weights[8].items():
            assert torch.allclose(weights[micro][name], tensor, atol=1e-5), name


def test_a_micro_batch_that_does_not_divide_the_batch_is_refused():
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=3: .* must divide 8: one of \[1, 2, 4, 8\]"):
        validate(compose_cfg(["train.micro_batch_size=3"]))


def test_run_directory_holds_the_contract_files(tmp_path):
    cfg = compose_cfg(["eval.n=8"], tmp_path)
    metrics = recipes.finetune(cfg)
    for name in ("config.yaml", "metrics.json", "predictions.jsonl", "train_log.jsonl"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "model" / "config.json").exists()  # full fine-tune saves the model
    assert (tmp_path / "model" / "tokenizer.json").exists()
    assert not (tmp_path / "checkpoints").exists()  # no empty scratch folder left behind
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert all("/" in k for k in on_disk)
    for key in CONTRACT_KEYS:
        assert key in on_disk, key
    rows = [json.loads(l) for l in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["eval/n"] == 8
    assert {"input", "reference", "prediction", "correct", "irregular"} <= set(rows[0])
    assert sum(r["correct"] for r in rows) / 8 == pytest.approx(metrics["eval/accuracy"])
    assert sum(r["irregular"] for r in rows) == metrics["eval/irregular"]


def test_a_failed_evaluation_keeps_the_trained_model_and_its_training_metrics(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("generation broke")

    monkeypatch.setattr(recipes.evaluation, "evaluate", broken)
    with pytest.raises(RuntimeError, match="generation broke"):
        recipes.finetune(compose_cfg(["train.max_steps=2"], tmp_path))
    kept = json.loads((tmp_path / "train_metrics.json").read_text())
    assert kept["train/steps"] == 2 and "eval/accuracy" not in kept
    assert (tmp_path / "model" / "config.json").exists()
    assert not (tmp_path / "metrics.json").exists()  # not finished: a rerun trains again


def test_label_word_that_tokenizes_to_nothing_is_refused():
    cfg = compose_cfg([])
    class Empty:
        unk_token_id = None
        chat_template = None
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [] if "negative" in text else [5]}
    task = build_task(cfg.task)
    with pytest.raises(Exception, match="negative.*tokenizes to nothing"):
        task.check_tokenizer(Empty())


def test_the_adapters_start_the_same_whatever_loading_drew_from_the_rng(tmp_path, monkeypatch):
    """A GGUF checkpoint is dequantized into a randomly initialised model on a cold cache only: the same
    seed must still give the same LoRA weights, so the same training."""
    import torch

    base = ["lora=default", "train.max_steps=2", "eval.enabled=false", "train.save_model=false"]
    recipes.finetune(compose_cfg(base, tmp_path / "warm"))
    load = modeling.load_model

    def drawing_load(*args, **kwargs):
        torch.rand(1000)  # what a model built from its config and then overwritten draws
        return load(*args, **kwargs)

    monkeypatch.setattr(modeling, "load_model", drawing_load)
    recipes.finetune(compose_cfg(base, tmp_path / "cold"))
    logs = [[{k: v for k, v in json.loads(line).items() if k in ("step", "loss", "grad_norm")}
             for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()] for run in ("warm", "cold")]
    assert logs[0] == logs[1] and logs[0][0]["grad_norm"] > 0
