"""Throughput figures and padding: real tokens per second, padding ratio, FLOPs per token,
MFU and data preparation time; the completion-only labels exactly as TRL's own preparation
makes them, also packed."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch
from datasets import Dataset
from omegaconf import OmegaConf

from conftest import compose_cfg, tiny_setup
from ftexp import architecture, modeling, throughput, training
from ftexp.rows import tokenize
from ftexp.config import validate
from ftexp.errors import ConfigError


def _setup(cfg, tmp_path):
    tok, _, model, records = tiny_setup(cfg, tmp_path)
    return tok, model, records


def _train(overrides, tmp_path):
    tmp_path.mkdir()
    cfg = compose_cfg(["train.max_steps=null", "train.epochs=1", *overrides], tmp_path)  # one epoch: every row once
    tok, model, records = _setup(cfg, tmp_path)
    fit = training.train(cfg, model, tok, records, tmp_path, "cpu")
    rows = training.sft_rows(cfg, tok, records)
    return cfg, model, fit["metrics"], fit["trainer"], sum(len(ids) for ids in rows["input_ids"])


def test_metrics_count_real_tokens_padding_flops_and_mfu(tmp_path):
    cfg, model, m, trainer, row_tokens = _train([], tmp_path / "grouped")
    assert m["train/tokens"] == row_tokens  # every real token of the epoch, no padding
    assert trainer.state.num_input_tokens_seen == row_tokens  # the one count, in the state checkpoints carry
    assert m["train/tokens_per_s"] == pytest.approx(row_tokens / m["train/runtime_s"])
    _, total = architecture.count_parameters(model)
    assert m["train/flops_per_token"] == 6 * total  # full fine-tune; the tiny model ties its embedding to the head
    assert m["train/peak_flops"] > 0
    assert m["train/mfu"] == pytest.approx(6 * total * row_tokens / m["train/runtime_s"] / m["train/peak_flops"])
    assert 0 < m["train/mfu"] < 1
    assert m["data/prep_s"] > 0
    # grouping by length (the default) pads less than batches of random rows
    assert cfg.train.group_by_length and training.common_args(cfg, tmp_path, "cpu", [])[
        "train_sampling_strategy"] == "group_by_length"
    _, _, random, _, _ = _train(["train.group_by_length=false", "model.attn_implementation=eager"], tmp_path / "rnd")
    assert random["train/tokens"] == row_tokens
    assert 0 <= m["train/padding_ratio"] < random["train/padding_ratio"]


def test_token_counter_counts_trained_batches_only():
    class Echo(torch.nn.Module):
        def forward(self, **kwargs):
            return kwargs

    model = Echo()
    counter = throughput.TokenCounter(model)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    model(input_ids=torch.zeros_like(mask), attention_mask=mask)
    model(input_ids=torch.zeros(1, 7, dtype=torch.long), position_ids=torch.tensor([[0, 1, 2, 0, 1, 0, 1]]))
    labels = torch.tensor([[5, 6, -100]])  # encoder-decoder: + the decoder's answer tokens
    model(input_ids=torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2, dtype=torch.long),
          labels=labels, decoder_input_ids=torch.zeros_like(labels))
    model.eval()
    model(input_ids=torch.zeros_like(mask), attention_mask=mask)  # not training: not counted
    counter.remove()
    model.train()
    model(input_ids=torch.zeros_like(mask), attention_mask=mask)  # hook removed
    assert counter.totals() == (5 + 7 + 2 + 2, 3 + 0 + 0 + 1)


def test_flops_per_token_full_lora_and_untied_embeddings():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    assert throughput.flops_per_token(model, frozen_base=False) == 6 * (total - 300 * 32)  # lookup left out
    lora = modeling.attach_adapters(model, OmegaConf.create(compose_cfg(["lora=default"]).lora),
                                    OmegaConf.create({"name": "none"}))
    _, with_adapters = architecture.count_parameters(lora)
    assert throughput.flops_per_token(lora, frozen_base=True) == 4 * (with_adapters - 300 * 32)


def test_gpu_peaks_by_name_and_precision():
    bf16, fp32 = torch.bfloat16, torch.float32
    assert throughput.gpu_peak_flops("NVIDIA H100 80GB HBM3", bf16) == 989e12
    assert throughput.gpu_peak_flops("NVIDIA H100 PCIe", bf16) == 756e12
    assert throughput.gpu_peak_flops("NVIDIA H200", fp32) == 67e12
    assert throughput.gpu_peak_flops("NVIDIA A100-SXM4-80GB", torch.float16) == 312e12
    assert throughput.gpu_peak_flops("NVIDIA A10G", bf16) == 70e12
    assert throughput.gpu_peak_flops("NVIDIA L4", bf16) == 121e12
    assert throughput.gpu_peak_flops("Tesla T4", torch.float16) == 65e12
    assert throughput.gpu_peak_flops("Tesla V100-SXM2-16GB", fp32) == 15.7e12
    assert throughput.gpu_peak_flops("NVIDIA GeForce RTX 4090", bf16) == 165.2e12
    assert throughput.gpu_peak_flops("NVIDIA L40S", bf16) is None  # not taken for an L4


def test_cpu_ceiling_is_measured_in_the_run_and_the_highest_reading_counts(monkeypatch):
    readings = iter([5e10, 7e10, 6e10])
    calls = []
    monkeypatch.setattr(throughput, "matmul_flops", lambda dtype: calls.append(dtype) or next(readings))
    ceiling = throughput.Ceiling(compose_cfg([]), "cpu", None)  # one reading when training starts
    assert calls == [torch.float32]
    assert ceiling.peak()[0] == 7e10  # one more when the metrics are read: the higher one
    peak, source = ceiling.peak()  # a lower third reading does not lower it
    assert peak == 7e10 and "measured in this run: best of 3 readings" in source
    assert len(calls) == 3


def test_peak_flops_override_and_gpu_table_measure_nothing(monkeypatch):
    monkeypatch.setattr(throughput, "matmul_flops", lambda dtype: pytest.fail("measured a matmul"))
    assert throughput.Ceiling(compose_cfg(["train.peak_flops=1.5e12"]), "cuda", None).peak() == (1.5e12,
                                                                                                "train.peak_flops")
    assert throughput.Ceiling(compose_cfg(["train.peak_flops=2e11"]), "cpu", None).peak()[0] == 2e11
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert throughput.Ceiling(compose_cfg([]), "cuda", None).peak()[0] == 67e12  # fp32 weights: fp32 peak
    with pytest.raises(ConfigError, match="train.peak_flops=-1"):
        validate(compose_cfg(["train.peak_flops=-1"]))


def test_a_reading_stays_short_for_a_dtype_the_cpu_emulates():
    # float16 runs at about 1 GFLOP/s on most CPUs: 1024 x 1024, best of 8, would take about 19 s
    start = time.perf_counter()
    assert throughput.matmul_flops(torch.float16) > 0
    assert time.perf_counter() - start < 3


def test_measuring_the_ceiling_moves_no_random_state_of_the_run():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    assert throughput.matmul_flops(torch.float32, size=64, repeats=2) > 0
    assert torch.equal(torch.rand(4), expected)


def _trl_prepared(model, rows, tok, max_length, out):
    """TRL's own preparation of input_ids + completion_mask rows (what the runs used before)."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(out), completion_only_loss=True, max_length=max_length, report_to=[],
                     use_cpu=True)
    return SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok).train_dataset


@pytest.mark.parametrize("truncation", ["keep_start", "keep_end"])
def test_prepared_rows_match_trls_own_preparation(tmp_path, truncation):
    cfg = compose_cfg([], tmp_path)
    tok, model, records = _setup(cfg, tmp_path)
    full = tokenize(records, tok)
    prompts = sorted(mask.index(1) for mask in full["completion_mask"])
    # cut through the prompts of half of the rows: keep_start leaves some with no answer at all
    max_length = prompts[len(prompts) // 2] + 1
    for length in (cfg.train.max_length, max_length):
        run = OmegaConf.merge(cfg, {"train": {"max_length": length, "truncation": truncation}})
        ours = training.sft_rows(run, tok, records)
        cut = slice(None) if truncation == "keep_start" else slice(-length, None)  # TRL 1.16 cuts keep_end itself
        rows = Dataset.from_dict({"input_ids": [ids[cut] for ids in full["input_ids"]],
                                  "completion_mask": [m[cut] for m in full["completion_mask"]]})
        theirs = _trl_prepared(model, rows, tok, length, tmp_path / f"trl_{length}")
        assert ours["input_ids"] == theirs["input_ids"]
        assert ours["labels"] == theirs["labels"]
        assert ours["length"] == [len(ids) for ids in ours["input_ids"]]
        if length == max_length and truncation == "keep_start":
            assert 0 < len(ours) < len(full)  # rows left without an answer were dropped, as TRL drops them


def _trained(ids, labels):
    """(sequence, positions it learns): a label at position p > 0 trains the prediction of token p."""
    return tuple(ids), tuple(p for p in range(1, len(ids)) if labels[p] != -100)


def _trained_sets(cfg, tok, records, packed: bool) -> Counter:
    """Every prepared row as TRL's collator hands it to the model, as (sequence, positions learned);
    packed rows are split back into their sequences by their position ids."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = training.sft_rows(OmegaConf.merge(cfg, {"train": {"packing": packed}}), tok, records)
    collate = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=packed)
    seen = Counter()
    for i in range(0, len(rows), 4):
        batch = collate([rows[j] for j in range(i, min(i + 4, len(rows)))])
        if not packed:
            for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
                seen[_trained(ids[mask.bool()].tolist(), labels[mask.bool()].tolist())] += 1
            continue
        assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # one row, no padding
        ids, labels, pos = batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), batch["position_ids"][0]
        starts = (pos == 0).nonzero().flatten().tolist() + [len(ids)]
        for a, b in zip(starts, starts[1:]):
            assert pos[a:b].tolist() == list(range(b - a)) and b - a <= cfg.train.max_length
            assert labels[a] == -100  # never learned across the boundary from the sequence before
            seen[_trained(ids[a:b], labels[a:b])] += 1
    return seen, len(rows)


@pytest.mark.parametrize("truncation", ["keep_start", "keep_end"])
def test_packing_keeps_exactly_the_trained_tokens(tmp_path, truncation):
    cfg = compose_cfg(["++data.generator.train_size=96", f"train.truncation={truncation}"], tmp_path)
    tok, _, records = _setup(cfg, tmp_path)
    longest = max(len(ids) for ids in tokenize(records, tok)["input_ids"])
    # rows packed two or more to a sequence; then rows cut (keep_start drops some), one to a sequence
    for max_length in (2 * longest, longest - 10):
        cfg.train.max_length = max_length
        expected, n_padded = _trained_sets(cfg, tok, records, packed=False)
        got, n_packed = _trained_sets(cfg, tok, records, packed=True)
        assert got == expected
        assert sum(expected.values()) == n_padded
        if max_length > longest:
            assert n_packed <= n_padded / 2


@pytest.mark.parametrize("key", ["train.packing", "train.padding_free"])
def test_packing_and_padding_free_need_flash_attention(key):
    with pytest.raises(ConfigError, match=rf"{key}=true needs model.attn_implementation=flash_attention_2.*"
                                          rf"{key}=false"):
        validate(compose_cfg([f"{key}=true"]))
    with pytest.raises(ConfigError, match="CUDA GPUs only"):
        validate(compose_cfg([f"{key}=true", "model.attn_implementation=flash_attention_2", "device=cpu"]))
    with pytest.raises(ConfigError, match="model.arch=seq2seq"):
        validate(compose_cfg([f"{key}=true", "model=tiny_t5", "model.attn_implementation=flash_attention_2"]))
    validate(compose_cfg([f"{key}=true", "model.attn_implementation=flash_attention_2"]))  # on a GPU: accepted


@pytest.mark.parametrize("event", ["on_step_end", "on_epoch_end"])
def test_the_token_count_goes_into_the_state_a_checkpoint_saves(event):
    """Steps (save_strategy=steps) and epoch ends (save_strategy=epoch) both save checkpoints: the
    count must be in the Trainer's state when either does, so a resumed run goes on from it."""
    from transformers import TrainerControl, TrainerState

    class Echo(torch.nn.Module):
        def forward(self, **kwargs):
            return kwargs

    model, counter = Echo(), throughput.TokenCounter()
    state, control = TrainerState(), TrainerControl()
    state.num_input_tokens_seen = 10  # restored from a checkpoint
    counter.on_train_begin(None, state, control, model=model)
    model(input_ids=torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 3, dtype=torch.long))
    getattr(counter, event)(None, state, control)
    assert state.num_input_tokens_seen == 10  # no checkpoint due: the state is left alone
    control.should_save = True
    getattr(counter, event)(None, state, control)
    assert state.num_input_tokens_seen == 13
    counter.remove()
