"""Evaluating a finished LoRA run with its adapter folded into the base weights
(``modeling.merged_adapter``, eval.merge_adapter): the same label log-probabilities and the
same greedy outputs as the unmerged model, the adapter taken out again afterwards, and no
merge where it would change the outputs (16-bit weights, a tied head) or where it is turned off."""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

from conftest import compose_cfg, tiny_setup
from ftexp import evaluation, modeling, recipes


def lora_model(tmp_path, *overrides):
    lora = [] if "lora=none" in overrides else ["lora=default", "lora.r=4"]
    cfg = compose_cfg(["model=tiny", *lora, *overrides], tmp_path)
    tok, task, model, _ = tiny_setup(cfg, tmp_path)
    records = [dict(r) for r in recipes.load_data(cfg).eval][:12]
    model = modeling.attach_adapters(model, cfg.lora, cfg.quant)  # lora=none: the model as it is
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero: give the adapters a say in the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.eval()
    return cfg, tok, task, model, records


def merged_flags(model) -> list[bool]:
    return [m.merged for m in modeling.lora_layers(model)]


def scores_and_texts(cfg, tok, task, model, records):
    prompts = [task.prompt(r) for r in records]
    scores = evaluation.label_scores(model, tok, task, prompts, records[0], cfg.eval)
    with open_dict(cfg):
        cfg.task.generation.max_new_tokens = 6
    texts = evaluation.generate(model, tok, prompts, cfg.task.generation, batch_size=4)
    return scores, texts


def test_merged_evaluation_equals_the_unmerged_one_and_is_undone_after(tmp_path):
    cfg, tok, task, model, records = lora_model(tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain_scores, plain_texts = scores_and_texts(cfg, tok, task, model, records)

    with modeling.merged_adapter(model) as merged:
        assert merged and all(merged_flags(model))
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert changed and all("base_layer.weight" in n for n in changed)  # the adapter is in the weights
        scores, texts = scores_and_texts(cfg, tok, task, model, records)

    assert torch.allclose(scores, plain_scores, atol=1e-5, rtol=0), (scores - plain_scores).abs().max()
    with model.disable_adapter():  # the adapter moves the scores: the comparison can fail
        base_scores, _ = scores_and_texts(cfg, tok, task, model, records)
    assert (base_scores - plain_scores).abs().max() > 0.01
    assert texts == plain_texts
    assert not any(merged_flags(model))
    for n, p in model.named_parameters():  # taken out again, to float rounding
        assert torch.allclose(p, before[n], atol=1e-6), n


REASONS = {"turned off": "eval.merge_adapter=false", "bfloat16 weights": "Parameter of torch.bfloat16",
           "adapter on a tied head": "shared with another module", "full fine-tune": "no LoRA adapter",
           "trained under autocast": "mixed-precision autocast"}


@pytest.mark.parametrize("case", list(REASONS))
def test_no_merge_where_it_would_change_the_outputs_or_is_turned_off(tmp_path, case, caplog):
    extra = {"adapter on a tied head": ["lora.include_lm_head=true"], "full fine-tune": ["lora=none"]}
    cfg, tok, task, model, records = lora_model(tmp_path, *extra.get(case, []))
    if case == "bfloat16 weights":
        model = model.to(torch.bfloat16)
    if case == "adapter on a tied head":
        head = model.get_output_embeddings()
        assert head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    caplog.set_level("INFO", logger="ftexp.modeling")
    off, autocast = case == "turned off", case == "trained under autocast"
    with modeling.merged_adapter(model, enabled=not off, autocast=autocast) as merged:
        assert not merged
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(merged_flags(model))
    if case == "full fine-tune":  # nothing to say about an adapter there is not
        assert modeling.why_not_merged(model) == REASONS[case] and "unmerged" not in caplog.text
    else:
        assert "unmerged: " in caplog.text and REASONS[case] in caplog.text, caplog.text


def test_a_merge_that_fails_midway_is_undone_and_evaluation_goes_on_unmerged(tmp_path, caplog, monkeypatch):
    cfg, tok, task, model, records = lora_model(tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    layers = modeling.lora_layers(model)

    def merge_two_then_fail(*args, **kwargs):
        for layer in layers[:2]:
            layer.merge()
        raise RuntimeError("this layer type cannot be merged")

    monkeypatch.setattr(model, "merge_adapter", merge_two_then_fail)
    caplog.set_level("INFO", logger="ftexp.modeling")
    with modeling.merged_adapter(model) as merged:
        assert not merged and not any(merged_flags(model))
        for n, p in model.named_parameters():
            assert torch.allclose(p, before[n], atol=1e-6), n
    assert "merging failed (RuntimeError: this layer type cannot be merged)" in caplog.text


def test_a_peft_model_gives_both_methods_its_first_step(tmp_path):
    """generate on a peft model runs its base model: the first step's logits are read there too,
    so eval.method=both encodes no prompt a second time for the labels."""
    cfg, tok, task, model, records = lora_model(tmp_path, "task.generation.max_new_tokens=2")
    encoded = []
    handle = model.get_base_model().register_forward_pre_hook(
        lambda m, args, kwargs: encoded.append(kwargs["input_ids"].shape) if kwargs["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    runs = {}
    for method in ("generate", "both"):
        with open_dict(cfg):
            cfg.eval.method = method
        encoded.clear()
        metrics, rows = evaluation.evaluate(cfg, model, tok, task, records)
        runs[method] = list(encoded)
    handle.remove()
    assert runs["both"] == runs["generate"] and runs["generate"]
    assert all(set(r["label_logprobs"]) == set(task.words) for r in rows)
