"""Batched evaluation: greedy (or configured) generation with left padding, and
label log-likelihood scoring for classification. Prompts are sorted by length
before batching so a batch pads to similar lengths, then put back in order.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

log = logging.getLogger(__name__)


def _batches(order: list[int], size: int):
    for start in range(0, len(order), size):
        yield order[start:start + size]


def _model_device(model):
    try:
        return next(p.device for p in model.parameters())
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], gcfg, *, batch_size: int = 16, max_length: int | None = None,
             seed: int = 0) -> list[str]:
    """Generate a completion per prompt; returns only the text after the prompt."""
    model.eval()
    device = _model_device(model)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "right" if seq2seq else "left"
    lengths = [len(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    outputs: list[str] = [""] * len(prompts)
    kwargs = dict(max_new_tokens=gcfg.max_new_tokens, do_sample=gcfg.do_sample, num_beams=gcfg.num_beams,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if gcfg.do_sample:
        kwargs.update(temperature=gcfg.temperature, top_p=gcfg.top_p)
    if gcfg.stop:
        kwargs.update(stop_strings=list(gcfg.stop), tokenizer=tokenizer)
    torch.manual_seed(seed)
    try:
        for idx in _batches(order, batch_size):
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                            truncation=max_length is not None, max_length=max_length).to(device)
            out = model.generate(**enc, **kwargs)
            new = out if seq2seq else out[:, enc["input_ids"].shape[1]:]
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                outputs[i] = text
    finally:
        tokenizer.padding_side = old_side
    return outputs


@torch.no_grad()
def label_logprobs(model, tokenizer, prompts: Sequence[str], options: Sequence[str], *, batch_size: int = 32,
                   max_length: int | None = None) -> torch.Tensor:
    """Summed log-probability of each option's tokens after each prompt: (len(prompts), len(options)).

    One forward pass per batch of prompt x option sequences; a multi-token option
    sums over its tokens.
    """
    model.eval()
    device = _model_device(model)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    prompt_ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if max_length:
        prompt_ids = [ids[-max_length:] for ids in prompt_ids]
    scores = torch.zeros(len(prompts), len(options))
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(options))]
    option_ids = []
    for opt in options:
        if seq2seq:
            ids = tokenizer(text_target=opt.strip(), add_special_tokens=False)["input_ids"]
        else:
            # tokens the option adds after the prompt (so merges at the boundary are honoured)
            ids = tokenizer("x" + opt, add_special_tokens=False)["input_ids"][len(tokenizer("x", add_special_tokens=False)["input_ids"]):]
        option_ids.append(ids)
    pairs.sort(key=lambda ij: -(len(prompt_ids[ij[0]]) + len(option_ids[ij[1]])))
    pad = tokenizer.pad_token_id
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        if seq2seq:
            enc = [prompt_ids[i] for i, _ in chunk]
            dec = [option_ids[j] for _, j in chunk]
            L, D = max(map(len, enc)), max(map(len, dec))
            input_ids = torch.tensor([e + [pad] * (L - len(e)) for e in enc], device=device)
            attn = torch.tensor([[1] * len(e) + [0] * (L - len(e)) for e in enc], device=device)
            labels = torch.tensor([d + [-100] * (D - len(d)) for d in dec], device=device)
            logits = model(input_ids=input_ids, attention_mask=attn, labels=labels).logits.float()
            logp = torch.log_softmax(logits, -1)
            for row, (i, j) in enumerate(chunk):
                n = len(option_ids[j])
                tok = torch.tensor(option_ids[j], device=device)
                scores[i, j] = logp[row, torch.arange(n, device=device), tok].sum().cpu()
            continue
        seqs = [prompt_ids[i] + option_ids[j] for i, j in chunk]
        L = max(map(len, seqs))
        input_ids = torch.tensor([[pad] * (L - len(s)) + s for s in seqs], device=device)  # left padding
        attn = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs], device=device)
        positions_ids = (attn.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift positions
        logits = model(input_ids=input_ids, attention_mask=attn, position_ids=positions_ids).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1)
        for row, (i, j) in enumerate(chunk):
            n = len(option_ids[j])
            positions = torch.arange(L - n - 1, L - 1, device=device)
            tok = torch.tensor(option_ids[j], device=device)
            scores[i, j] = logp[row, positions, tok].sum().cpu()
    return scores


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def pick_shots(pool, k: int, seed: int, exclude_texts=()) -> list[dict]:
    """k fixed solved examples from the train split (a seeded draw, same for every prompt)."""
    if k == 0:
        return []
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(pool)).tolist()
    shots = []
    for i in order:
        if len(shots) == k:
            break
        shots.append(dict(pool[int(i)]))
    if len(shots) < k:
        raise ValueError(f"eval.shots={k} but the train split has only {len(pool)} rows.")
    return shots


def evaluate(cfg, model, tokenizer, task, eval_rows, shot_pool=None) -> tuple[dict, list[dict]]:
    """Score ``model`` on ``eval_rows`` with the task's metrics.

    Returns flat ``eval/*`` metrics and one prediction row per example
    (input, reference, prediction, correct/irregular or per-example scores).
    """
    records = [dict(r) for r in eval_rows]
    ecfg = cfg.eval
    shots_all = pick_shots(shot_pool, ecfg.shots + 1, ecfg.seed) if ecfg.shots and shot_pool is not None else []
    prompts, used_shots = [], []
    for rec in records:
        # never show the evaluated example itself as a solved shot
        shots = [s for s in shots_all if task.user_text(s) != task.user_text(rec)][: ecfg.shots]
        used_shots.append(len(shots))
        prompts.append(task.prompt(rec, shots))
    metrics: dict = {}
    max_len = cfg.train.max_length if cfg.train.truncation == "keep_end" else None
    methods = ["generate", "likelihood"] if ecfg.method == "both" else [ecfg.method]
    rows = [{"input": p, "reference": task.reference(r)} for p, r in zip(prompts, records)]
    results = {}
    for method in methods:
        start = time.perf_counter()
        if method == "generate":
            raw = generate(model, tokenizer, prompts, task.cfg.generation, batch_size=ecfg.batch_size,
                           max_length=max_len, seed=ecfg.seed)
            preds = [task.clean_prediction(t) for t in raw]
            m, per_row = task.score(preds, records)
            for row, pred, extra in zip(rows, preds, per_row):
                row.setdefault("prediction", pred)
                for k, v in extra.items():
                    row.setdefault(k, v)
            results["generate"] = [r.get("predicted_label") for r in per_row]
        else:
            options = [task.completion({**records[0], task.cfg.target: k}) for k in task.label_keys]
            scores = label_logprobs(model, tokenizer, prompts, options, batch_size=ecfg.batch_size)
            parsed = scores.argmax(-1).tolist()
            gold = [task.label_index(r) for r in records]
            prefix = "eval/" if len(methods) == 1 else "eval/likelihood_"
            m, per_row = task.score_indices(parsed, gold, [task.words[i] for i in parsed], prefix=prefix)
            m.pop(f"{prefix}irregular_top", None)
            for row, p, extra in zip(rows, parsed, per_row):
                row["likelihood_prediction"] = task.words[p]
                if len(methods) == 1:
                    row.update(prediction=task.words[p], correct=extra["correct"], irregular=False)
            results["likelihood"] = [task.words[i] for i in parsed]
        m[f"eval/{method}_runtime_s" if len(methods) > 1 else "eval/runtime_s"] = time.perf_counter() - start
        metrics.update(m)
    if len(methods) > 1:
        agree = [a == b for a, b in zip(results["generate"], results["likelihood"])]
        metrics["eval/method_agreement"] = sum(agree) / max(len(agree), 1)
        metrics["eval/runtime_s"] = metrics["eval/generate_runtime_s"] + metrics["eval/likelihood_runtime_s"]
    metrics["eval/n"] = len(records)
    metrics["eval/shots"] = ecfg.shots
    return metrics, rows
