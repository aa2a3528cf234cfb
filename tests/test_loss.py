"""The loss with the output head run only at labelled positions (ftexp/loss.py) is the plain
causal-LM loss: same value, same gradients, for a full fine-tune, LoRA and LoRA on lm_head,
and the same as TRL's own SFT loss. Rows have prompts of different lengths, so each row's
labels sit at different positions."""

from __future__ import annotations

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ftexp import loss, modeling, training
from conftest import compose_cfg, tiny_setup

MODES = {
    "full fine-tune": ["lora=none"],
    "LoRA": ["lora=default", "lora.r=4", "lora.dropout=0"],
    "LoRA on lm_head": ["lora=default", "lora.r=4", "lora.dropout=0", "lora.include_lm_head=true"],
}


def setup(tmp_path, mode):
    cfg = compose_cfg(["model=tiny", *MODES[mode]], tmp_path)
    tok, task, model, records = tiny_setup(cfg, tmp_path)
    if cfg.lora.enabled:
        model = modeling.attach_adapters(model, cfg.lora, cfg.quant, False)
        for name, p in model.named_parameters():  # lora_B starts at zero: give the adapters a say in the output
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    rows = training.sft_rows(cfg, tok, records)
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)([rows[i] for i in range(8)])
    return cfg, tok, model, records, {k: v for k, v in batch.items()}


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_loss_and_gradients_equal_the_plain_path(tmp_path, mode):
    cfg, _, model, _, batch = setup(tmp_path, mode)
    model.train()
    plain = model(**batch).loss  # transformers' own shifted cross-entropy over every position's logits
    plain.backward()
    expected = grads(model)

    ours, outputs = loss.completion_loss(model, batch)
    ours.backward()
    got = grads(model)

    assert torch.allclose(ours, plain, rtol=1e-6, atol=1e-6), (ours.item(), plain.item())
    assert expected.keys() == got.keys() and len(got) > 0
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-7), name
    if mode == "LoRA on lm_head":
        assert any("lm_head" in n and "lora" in n for n in got)  # the head's adapter gets its gradient
    # the head ran on fewer positions than the batch holds: only where some row's next token is a label
    seq = batch["input_ids"].shape[1]
    assert outputs.logits.shape[1] == len(loss.labelled_positions(batch["labels"])) < seq - 1


def test_a_token_count_from_the_trainer_divides_the_sum(tmp_path):
    _, _, model, _, batch = setup(tmp_path, "LoRA")
    mean, _ = loss.completion_loss(model, batch)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    accumulated, _ = loss.completion_loss(model, batch, num_items_in_batch=torch.tensor(3 * labelled))
    assert torch.allclose(accumulated * 3, mean, rtol=1e-6)  # gradient accumulation over 3 such batches


def test_it_equals_trls_own_sft_loss_and_runs_on_a_cpu(tmp_path):
    cfg, tok, model, records, batch = setup(tmp_path, "LoRA")
    trainer = training.build_sft_trainer(cfg, model, tok, records, tmp_path / "out", "cpu", [], [])
    assert trainer.head_positions_only  # on a CPU TRL's fused head scores every position
    ours = trainer.compute_loss(trainer.model, dict(batch))
    trainer.head_positions_only = False
    trls = trainer.compute_loss(trainer.model, dict(batch))
    assert torch.allclose(ours, trls, rtol=1e-5), (ours.item(), trls.item())


def test_where_trl_scores_labelled_positions_itself_its_loss_stays(tmp_path):
    _, _, model, _, _ = setup(tmp_path, "LoRA")
    assert loss.runs_on(model, "cpu", head_adapter=False)
    assert not loss.runs_on(model, "cuda:0", head_adapter=False)  # TRL's Triton head reads labelled rows only
    assert loss.runs_on(model, "cuda:0", head_adapter=True)  # TRL's head would bypass the adapter


def test_the_head_adapter_collator_pads_rows_and_masks_the_padding():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "length": 3, "completion_mask": [0, 1, 1]},
            {"input_ids": [8], "labels": [8], "length": 1, "completion_mask": [1]}]
    batch = training.completion_collator(pad_token_id=0)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    flat = training.completion_collator(pad_token_id=0, padding_free=True)(rows)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8]] and flat["position_ids"].tolist() == [[0, 1, 2, 0]]
    assert flat["labels"].tolist() == [[-100, 6, 7, -100]]  # a row's first token predicts nothing across rows
