"""Batched evaluation: generation with left padding (greedy unless the task's
generation config samples), label log-likelihood scoring for classification, and
k-shot prompts. Prompts are sorted by length before batching so a batch pads to
similar lengths, then put back in order; the prediction is only the text generated
after the prompt, cut at EOS or at the first stop string.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from typing import Callable, Sequence

import torch

from ftexp.config import ConfigError

log = logging.getLogger(__name__)


def _batches(order: list[int], size: int):
    for start in range(0, len(order), size):
        yield order[start:start + size]


def _model_device(model):
    try:
        return next(p.device for p in model.parameters())
    except StopIteration:
        return torch.device("cpu")


def _eos_ids(model, tokenizer) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models may
    end a turn with a token of their own)."""
    ids = []
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        for i in (source if isinstance(source, (list, tuple)) else [source]):
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], gcfg, *, batch_size: int = 16, max_length: int | None = None,
             seed: int = 0) -> list[str]:
    """Generate a completion per prompt; returns only the text after the prompt.

    ``max_length`` caps the prompt at its last ``max_length`` tokens (the end of a
    prompt carries the question); None keeps it whole.
    """
    model.eval()
    device = _model_device(model)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    old_side, old_trunc = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = "right" if seq2seq else "left"
    tokenizer.truncation_side = "left"
    # Tokenize every prompt once; batches are then padded from these ids, longest first,
    # so each batch pads only to its own longest prompt.
    encoded = tokenizer(list(prompts), add_special_tokens=True, truncation=max_length is not None,
                        max_length=max_length)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    eos = _eos_ids(model, tokenizer)
    kwargs = dict(max_new_tokens=gcfg.max_new_tokens, do_sample=gcfg.do_sample, num_beams=gcfg.num_beams,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=eos if len(eos) > 1 else eos[0])
    if gcfg.do_sample:
        kwargs.update(temperature=gcfg.temperature, top_p=gcfg.top_p)
    else:  # greedy: silence a model's own sampling defaults
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if gcfg.stop:
        kwargs.update(stop_strings=list(gcfg.stop), tokenizer=tokenizer)
    torch.manual_seed(seed)
    try:
        for idx in _batches(order, max(1, batch_size)):
            enc = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, padding=True,
                                return_tensors="pt").to(device)
            out = model.generate(**enc, **kwargs)
            new = out if seq2seq else out[:, enc["input_ids"].shape[1]:]
            for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                outputs[i] = text
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = old_side, old_trunc
    return outputs


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def answer_split(tokenizer, prompt: str, answers: Sequence[str],
                 prompt_ids: list[int] | None = None) -> tuple[list[int], list[list[int]]]:
    """(context ids, each answer's ids): ``prompt + answer`` encoded whole, cut where the
    prompt's own ids stop matching. Those are exactly the tokens the model writes after
    the prompt; a prompt ending in a space that merges into the answer's first token
    leaves a context one token shorter than the prompt (as training sees that text)."""
    head = prompt_ids if prompt_ids is not None else tokenizer(prompt)["input_ids"]
    wholes = [tokenizer(prompt + a)["input_ids"] for a in answers]
    cut = min(_common_prefix(head, w) for w in wholes)
    if any(len(w) <= cut for w in wholes):
        raise ConfigError(f"task.labels: an answer encodes to no tokens after the prompt; answers: {list(answers)}")
    return head[:cut], [w[cut:] for w in wholes]


def option_token_ids(tokenizer, options: Sequence[str], seq2seq: bool = False) -> list[list[int]]:
    """Token ids of each option on its own (for encoder-decoder labels), or after a stand-in
    character so a leading space is tokenized as in prompt+answer (``answer_split`` encodes
    options after the real prompt)."""
    ids = []
    for opt in options:
        if seq2seq:
            tok = tokenizer(text_target=opt.strip(), add_special_tokens=False)["input_ids"]
        else:
            stub = len(tokenizer("x", add_special_tokens=False)["input_ids"])
            tok = tokenizer("x" + opt, add_special_tokens=False)["input_ids"][stub:]
        if not tok:
            raise ConfigError(f"task.labels: the option {opt!r} encodes to no tokens; give every label a word.")
        ids.append(tok)
    return ids


# A prompt prefix shared by every prompt (system prompt, template head, k-shot examples)
# is run once and its key/value cache reused when it is at least this many tokens.
MIN_SHARED_PREFIX = 8


@torch.no_grad()
def label_logprobs(model, tokenizer, prompts: Sequence[str], options: Sequence[str], *, batch_size: int = 32,
                   max_length: int | None = None, share_prefix: bool = True,
                   join: Callable[[str, str], str] | None = None) -> torch.Tensor:
    """Summed log-probability of each option's tokens after each prompt: (len(prompts), len(options)).

    With ``join(prompt, option)`` each option is encoded as it continues its own
    prompt (the tokens past the prompt's in ``prompt + join(prompt, option)``), so a
    label scored after a chat template's ``assistant\n`` is the token the model would
    generate there. Prompts whose options encode alike are scored together.

    Batched forward passes over length-sorted prompts. When every option is one
    token, one pass per prompt reads all of them from the next-token distribution;
    otherwise each prompt x option pair is a sequence and a multi-token option sums
    over its tokens. The token prefix all prompts share is encoded once and its cache
    reused by every batch (``share_prefix``); without one, batches are left-padded
    with explicit position ids and only the logits that are read are computed.
    """
    model.eval()
    device = _model_device(model)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    scores = torch.zeros(len(prompts), len(options))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if seq2seq or join is None:
        groups = {tuple(map(tuple, option_token_ids(tokenizer, options, seq2seq))): list(range(len(prompts)))}
    else:
        groups: dict = {}
        for i, (p, ids) in enumerate(zip(prompts, prompt_ids)):
            prompt_ids[i], answer_ids = answer_split(tokenizer, p, [join(p, o) for o in options], ids)
            groups.setdefault(tuple(map(tuple, answer_ids)), []).append(i)
    if max_length:
        prompt_ids = [ids[-max_length:] for ids in prompt_ids]
    for key, members in groups.items():
        option_ids = [list(ids) for ids in key]
        group_ids = [prompt_ids[i] for i in members]
        if seq2seq:
            part = _seq2seq_logprobs(model, group_ids, option_ids, torch.zeros(len(members), len(options)), pad,
                                     batch_size, device)
        else:
            part = _causal_logprobs(model, group_ids, option_ids, pad, batch_size, device, share_prefix)
        scores[members] = part
    return scores


def _causal_logprobs(model, prompt_ids, option_ids, pad, batch_size, device, share_prefix) -> torch.Tensor:
    scores = torch.zeros(len(prompt_ids), len(option_ids))
    forward = _Forward(model, pad, device, _shared_prefix(prompt_ids) if share_prefix else [])
    if all(len(ids) == 1 for ids in option_ids):
        first = torch.tensor([ids[0] for ids in option_ids])
        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        for idx in _batches(order, max(1, batch_size)):
            logp = forward([prompt_ids[i] for i in idx], 1)[:, -1].cpu()
            scores[idx] = logp[:, first]
        return scores

    pairs = [(i, j) for i in range(len(prompt_ids)) for j in range(len(option_ids))]
    pairs.sort(key=lambda ij: -(len(prompt_ids[ij[0]]) + len(option_ids[ij[1]])))
    for chunk in _batches(pairs, max(1, batch_size)):
        width = max(len(option_ids[j]) for _, j in chunk)
        # position p predicts token p+1: the option's n tokens are read at the n
        # positions before the last one
        logp = forward([prompt_ids[i] + option_ids[j] for i, j in chunk], width + 1).cpu()
        for row, (i, j) in enumerate(chunk):
            n = len(option_ids[j])
            positions = torch.arange(width - n, width)
            scores[i, j] = logp[row, positions, torch.tensor(option_ids[j])].sum()
    return scores


def _common_prefix(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def _shared_prefix(seqs: list[list[int]]) -> list[int]:
    """The token prefix of every sequence, leaving each at least one token of its own;
    [] when shorter than MIN_SHARED_PREFIX."""
    if not seqs:
        return []
    limit = min(map(len, seqs)) - 1
    n = 0
    first = seqs[0]
    while n < limit and all(s[n] == first[n] for s in seqs):
        n += 1
    return first[:n] if n >= MIN_SHARED_PREFIX else []


class _Forward:
    """Next-token log-probs at the last ``last`` positions of each sequence: (batch, last, vocab).

    Rows are left-padded so every row ends at the last column and only the logits
    read are computed; position ids skip the padding. With a shared prefix, the
    prefix is encoded once and each batch runs only its rows' remaining tokens on a
    copy of that cache; a model whose cache cannot be reused scores whole rows.
    """

    def __init__(self, model, pad: int, device, prefix: list[int]):
        self.model, self.pad, self.device = model, pad, device
        self.keep = _accepts_logits_to_keep(model)
        self.prefix, self.cache = [], None
        if prefix:
            ids = torch.tensor([prefix], device=device)
            try:
                cache = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).past_key_values
            except Exception as err:
                log.warning("likelihood: prompt prefix not shared (%s); scoring whole prompts.", err)
                cache = None
            if hasattr(cache, "batch_repeat_interleave"):
                self.prefix, self.cache = prefix, cache

    def __call__(self, seqs: list[list[int]], last: int) -> torch.Tensor:
        p = len(self.prefix)
        tails = [s[p:] for s in seqs]
        width = max(map(len, tails))
        input_ids = torch.tensor([[self.pad] * (width - len(t)) + t for t in tails], device=self.device)
        attn = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tails], device=self.device)
        position_ids = p + (attn.cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": last} if self.keep else {}
        if self.cache is not None:
            cache = copy.deepcopy(self.cache)  # each batch extends its own copy
            cache.batch_repeat_interleave(len(tails))
            attn = torch.cat([torch.ones(len(tails), p, dtype=attn.dtype, device=self.device), attn], dim=1)
            extra.update(past_key_values=cache, use_cache=True)
        logits = self.model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, **extra).logits
        return torch.log_softmax(logits[:, -last:].float(), -1)


def _seq2seq_logprobs(model, prompt_ids, option_ids, scores, pad, batch_size, device):
    pairs = [(i, j) for i in range(len(prompt_ids)) for j in range(len(option_ids))]
    pairs.sort(key=lambda ij: -len(prompt_ids[ij[0]]))
    for chunk in _batches(pairs, max(1, batch_size)):
        enc = [prompt_ids[i] for i, _ in chunk]
        dec = [option_ids[j] for _, j in chunk]
        L, D = max(map(len, enc)), max(map(len, dec))
        input_ids = torch.tensor([e + [pad] * (L - len(e)) for e in enc], device=device)
        attn = torch.tensor([[1] * len(e) + [0] * (L - len(e)) for e in enc], device=device)
        labels = torch.tensor([d + [-100] * (D - len(d)) for d in dec], device=device)
        logits = model(input_ids=input_ids, attention_mask=attn, labels=labels).logits.float()
        logp = torch.log_softmax(logits, -1).cpu()
        for row, (i, j) in enumerate(chunk):
            n = len(option_ids[j])
            scores[i, j] = logp[row, torch.arange(n), torch.tensor(option_ids[j])].sum()
    return scores


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


class ShotPicker:
    """k solved examples from the train split for k-shot prompts.

    One seeded permutation of the pool fixes the shots: every prompt gets the first k
    rows of it, except that a row equal to the evaluated example (same prompt text)
    is skipped and the next one takes its place. So a prompt holds exactly k examples
    and never the one under evaluation.
    """

    def __init__(self, pool, seed: int):
        import numpy as np

        self.pool = pool
        self.order = np.random.default_rng(seed).permutation(len(pool)).tolist() if pool is not None else []
        self._rows: list[dict] = []

    def _row(self, pos: int) -> dict:
        while len(self._rows) <= pos:
            self._rows.append(dict(self.pool[int(self.order[len(self._rows)])]))
        return self._rows[pos]

    def pick(self, k: int, exclude: Callable[[dict], bool] = lambda row: False) -> list[dict]:
        if k <= 0:
            return []
        if self.pool is None or len(self.order) == 0:
            raise ConfigError(f"eval.shots={k} needs a train split to draw the examples from; none was loaded.")
        shots = []
        for pos in range(len(self.order)):
            row = self._row(pos)
            if exclude(row):
                continue
            shots.append(row)
            if len(shots) == k:
                return shots
        raise ConfigError(f"eval.shots={k} but the train split has only {len(shots)} usable rows. "
                          f"Use eval.shots<={len(shots)}.")


def pick_shots(pool, k: int, seed: int, exclude: Callable[[dict], bool] = lambda row: False) -> list[dict]:
    """k fixed solved examples from the train split (see ``ShotPicker``)."""
    return ShotPicker(pool, seed).pick(k, exclude)


def build_prompts(task, records: Sequence[dict], shots: int, shot_pool=None, seed: int = 0) -> list[str]:
    """The prompt for each record: zero-shot, or k solved train examples before it."""
    if shots <= 0:
        return [task.prompt(rec) for rec in records]
    picker = ShotPicker(shot_pool, seed)
    prompts = []
    for rec in records:
        own = task.user_text(rec)
        prompts.append(task.prompt(rec, picker.pick(shots, lambda row: task.user_text(row) == own)))
    return prompts


def surface_forms(answer: str) -> list[str]:
    """Ways a model may write a label word: as written, lower case, capitalised, each
    with and without a leading space (``positive``, ``Positive``, `` positive`` ...)."""
    core = answer.strip()
    forms = []
    for word in (core, core.lower(), core[:1].upper() + core[1:]):
        for text in (word, " " + word):
            if text not in forms:
                forms.append(text)
    return forms


def label_scores(model, tokenizer, task, prompts: Sequence[str], record: dict, ecfg, max_length=None) -> torch.Tensor:
    """Log-score of each label after each prompt: (len(prompts), len(labels)).

    ``eval.label_scoring=exact``: the log-probability of the label's answer exactly as
    training writes it after that prompt (see ``Task.completion``).
    ``surface_forms``: the total probability of the label's surface forms
    (``surface_forms``), so a base model that would write ``Positive`` or
    `` positive`` is credited too; zero-shot baselines depend on it.
    """
    from ftexp.tasks.base import join_answer

    answers = [task.completion({**record, task.cfg.target: k}) for k in task.label_keys]
    if ecfg.label_scoring == "exact":
        return label_logprobs(model, tokenizer, prompts, answers, batch_size=ecfg.batch_size, max_length=max_length,
                              join=join_answer)
    forms, owner = [], []
    for label, answer in enumerate(answers):
        for form in surface_forms(answer):
            forms.append(form)
            owner.append(label)
    per_form = label_logprobs(model, tokenizer, prompts, forms, batch_size=ecfg.batch_size, max_length=max_length,
                              join=lambda prompt, form: form)
    owner_t = torch.tensor(owner)
    return torch.stack([torch.logsumexp(per_form[:, owner_t == label], dim=1) for label in range(len(answers))], 1)


def metric_names(cfg, task, record: dict) -> set[str]:
    """The eval/* keys ``evaluate`` will write for this config, found by scoring one
    dummy prediction with the task's own code (so no list is kept by hand)."""
    methods = ["generate", "likelihood"] if cfg.eval.method == "both" else [cfg.eval.method]
    names = {"eval/n", "eval/shots", "eval/runtime_s"}
    if "generate" in methods:
        names |= set(task.score([""], [record])[0])
    if "likelihood" in methods:
        prefix = "eval/" if len(methods) == 1 else "eval/likelihood_"
        gold = task.label_index(record)
        names |= set(task.score_indices([gold], [gold], [task.words[gold]], prefix=prefix)[0])
        names.add("eval/label_scoring")
    if len(methods) > 1:
        names |= {"eval/method_agreement", "eval/generate_runtime_s", "eval/likelihood_runtime_s"}
    return names


def check_objective(cfg, task, eval_rows) -> None:
    """Refuse an eval/ objective this run will not produce, before any training."""
    objective = str(cfg.objective)
    if objective.startswith("judge/"):
        if cfg.judge.name == "none":
            raise ConfigError(f"objective={objective}: this run has no LLM judge (judge=none), so it writes no judge/ "
                              f"metrics. Add judge=hf, or use one of the eval/ metrics, e.g. {task.objective_default}.")
        criterion = objective.split("/", 1)[1].removeprefix("reference_").removesuffix("_argmax")
        if criterion not in cfg.judge.criteria:
            raise ConfigError(f"objective={objective}: the judge rates {', '.join(cfg.judge.criteria)}; "
                              f"e.g. objective=judge/{next(iter(cfg.judge.criteria))}.")
        return
    if not objective.startswith("eval/") or not cfg.eval.enabled or len(eval_rows) == 0:
        return
    numeric = sorted(n for n in metric_names(cfg, task, dict(eval_rows[0]))
                     if n not in ("eval/label_scoring", "eval/irregular_top"))  # words, not numbers
    if objective not in numeric:
        raise ConfigError(f"objective={objective} is not a metric this run writes. Its eval metrics: "
                          f"{', '.join(numeric)} (plus train/* and model/*).")


def evaluate(cfg, model, tokenizer, task, eval_rows, shot_pool=None) -> tuple[dict, list[dict]]:
    """Score ``model`` on ``eval_rows`` with the task's metrics.

    Returns flat ``eval/*`` metrics and one prediction row per example
    (input, reference, prediction, correct/irregular or per-example scores).
    """
    records = [dict(r) for r in eval_rows]
    ecfg = cfg.eval
    prompts = build_prompts(task, records, ecfg.shots, shot_pool, ecfg.seed)
    metrics: dict = {}
    max_len = cfg.train.max_length if cfg.train.truncation == "keep_end" else None
    methods = ["generate", "likelihood"] if ecfg.method == "both" else [ecfg.method]
    rows = [{"input": p, "reference": task.reference(r)} for p, r in zip(prompts, records)]
    results = {}
    # import the metrics library up front: a one-off import is not evaluation time, and
    # with method=both it would otherwise count against whichever method runs first
    from ftexp.metrics import evaluate_library

    evaluate_library()
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
            scores = label_scores(model, tokenizer, task, prompts, records[0], ecfg, max_len)
            parsed = scores.argmax(-1).tolist()
            gold = [task.label_index(r) for r in records]
            prefix = "eval/" if len(methods) == 1 else "eval/likelihood_"
            m, per_row = task.score_indices(parsed, gold, [task.words[i] for i in parsed], prefix=prefix)
            m.pop(f"{prefix}irregular_top", None)
            for row, p, extra, logp in zip(rows, parsed, per_row, scores.tolist()):
                row["likelihood_prediction"] = task.words[p]
                row["label_logprobs"] = {w: round(v, 4) for w, v in zip(task.words, logp)}
                if len(methods) == 1:
                    row.update(prediction=task.words[p], predicted_label=task.words[p], correct=extra["correct"],
                               irregular=False)
            results["likelihood"] = [task.words[i] for i in parsed]
        m[f"eval/{method}_runtime_s" if len(methods) > 1 else "eval/runtime_s"] = time.perf_counter() - start
        metrics.update(m)
    if len(methods) > 1:
        agree = [a == b for a, b in zip(results["generate"], results["likelihood"])]
        metrics["eval/method_agreement"] = sum(agree) / max(len(agree), 1)
        metrics["eval/runtime_s"] = metrics["eval/generate_runtime_s"] + metrics["eval/likelihood_runtime_s"]
    if "likelihood" in methods:
        metrics["eval/label_scoring"] = ecfg.label_scoring
    metrics["eval/n"] = len(records)
    metrics["eval/shots"] = ecfg.shots
    return metrics, rows
