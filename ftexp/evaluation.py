"""Batched evaluation: generation with left padding (greedy unless the task's
generation config samples), label log-likelihood scoring for classification, and
k-shot prompts. Prompts are sorted by length before batching so a batch pads to
similar lengths, then put back in order; the prediction is only the text generated
after the prompt, cut at EOS or at the first stop string. The token prefix every
prompt shares (system prompt, template head, k-shot examples) is run through the
model once and its key/value cache reused by every batch, for generation and
likelihood alike. A batch that runs out of GPU memory is retried at half the batch
size, which the rest of the evaluation keeps. ``eval_config`` gives the config a
trained run is re-evaluated with: its own, plus evaluation settings only.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ftexp import architecture
from ftexp.rows import common_prefix_length
from ftexp.config import EvalConfig, load_run_config
from ftexp.errors import ConfigError
from ftexp.metrics import evaluate_library
from ftexp.tasks import build_task, metric
from ftexp.tasks.base import join_answer
from ftexp.tasks.classification import check_label_word

log = logging.getLogger(__name__)


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA out-of-memory error, or any error whose message says it ran out of memory."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _free_accelerator_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# eval.batch_tokens: the padded tokens one evaluation batch may hold (rows x its longest
# sequence), on top of the row cap eval.batch_size. Prompts of very different lengths (DialogSum: 132 to 1,415
# tokens) then come in several batches, each padded to near its own rows' length: 40
# DialogSum summaries on SmolLM2 went from 207 s in two 32-row batches to 57 s, with the
# same summaries; attention and the key/value cache, which grow with the padded width,
# stay small enough for the allocator to reuse rather than map and fault in afresh.
BATCH_TOKENS = EvalConfig.batch_tokens


class BatchSize:
    """The batch shape of one evaluation, shared by its generation and likelihood passes.

    ``run`` feeds consecutive batches of items to a step function: at most ``size``
    items, and, given each item's ``length``, at most ``tokens`` padded tokens (items
    come longest first, so a batch's first item sets its width). A batch that runs out
    of memory is retried at half its size and half its token budget, which stay for
    the rest of the evaluation; a batch of one that runs out of memory fails.
    """

    def __init__(self, size: int, tokens: int | None = BATCH_TOKENS):
        self.size = max(1, int(size))
        self.tokens = None if tokens is None else max(1, int(tokens))

    def run(self, items: list, step: Callable[[list], None], what: str,
            length: Callable[[object], int] | None = None) -> None:
        start = 0
        while start < len(items):
            batch = items[start:start + self._rows(items, start, length)]
            if self._try(step, batch, what):
                start += len(batch)

    def _rows(self, items: list, start: int, length) -> int:
        """Rows of the next batch: the row cap, cut to the token budget (never below one)."""
        if self.tokens is None or length is None:
            return self.size
        width = max(1, max(length(item) for item in items[start:start + self.size]))
        return max(1, min(self.size, self.tokens // width))

    def _try(self, step, batch: list, what: str) -> bool:
        try:
            step(batch)
            return True
        except Exception as err:
            if len(batch) == 1 or not is_out_of_memory(err):
                raise
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        # outside the except block, so the failed batch's tensors can be released
        _free_accelerator_memory()
        self.size = max(1, len(batch) // 2)
        if self.tokens is not None:
            self.tokens = max(1, self.tokens // 2)
        log.warning("%s: out of memory at batch size %d (%s); retrying at batch size %d for the rest of the "
                    "evaluation.", what, len(batch), reason, self.size)
        return False


def _batch_size(size) -> BatchSize:
    """A shared ``BatchSize`` as it is, or a new one for a plain number."""
    return size if isinstance(size, BatchSize) else BatchSize(size)


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


class FirstStep:
    """Log-probabilities of chosen tokens as the next token after each prompt, read off the
    first step of generation: the model's distribution at the prompt's last position, before
    any token is chosen (raw logits, before sampling or other processing).

    With ``eval.method=both``, a label of one token after a prompt has its likelihood there
    already: ``label_logprobs`` takes it from here instead of encoding the prompt again,
    wherever its context is exactly the ids generation encoded. Decoder-only models only.
    """

    def __init__(self, ids: Sequence[int]):
        self.ids = list(dict.fromkeys(int(i) for i in ids))
        self._column = {t: c for c, t in enumerate(self.ids)}
        self._context: dict[int, tuple] = {}
        self._logprobs: dict[int, torch.Tensor] = {}

    def record(self, prompts: Sequence[int], contexts: Sequence[Sequence[int]], logits: torch.Tensor) -> None:
        """``logits``: (len(prompts), vocab), the next-token logits after each prompt's ``contexts``."""
        logp = torch.log_softmax(logits.float(), -1)[:, self.ids].cpu()
        for row, (i, context) in enumerate(zip(prompts, contexts)):
            self._context[i], self._logprobs[i] = tuple(context), logp[row]

    def get(self, prompt: int, context: Sequence[int], tokens: Sequence[int]) -> torch.Tensor | None:
        """Log-probs of ``tokens`` after prompt ``prompt``, or None if it was not generated from
        exactly ``context`` or a token was not recorded."""
        if self._context.get(prompt) != tuple(context) or any(t not in self._column for t in tokens):
            return None
        return self._logprobs[prompt][[self._column[t] for t in tokens]]

    def __len__(self) -> int:
        return len(self._context)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], gcfg, *, batch_size: int | BatchSize = 16,
             max_length: int | None = None, seed: int = 0, share_prefix: bool = True,
             first_step: FirstStep | None = None) -> list[str]:
    """Generate a completion per prompt; returns only the text after the prompt.

    ``max_length`` caps the prompt at its last ``max_length`` tokens (the end of a
    prompt carries the question); None keeps it whole. With ``share_prefix``, the
    token prefix all prompts share is encoded once and each batch generates from a
    copy of its cache (decoder-only models; see ``_generate_batch``). ``first_step``
    (decoder-only models) records the next-token log-probs of its tokens after each prompt.
    """
    model.eval()
    device = _model_device(model)
    sizer = _batch_size(batch_size)
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
    capture = first_step is not None and not seq2seq
    prefix, cache = [], None
    if share_prefix and not seq2seq and _generate_takes_a_cache(model):
        prefix = _shared_prefix(encoded)
        cache = _prefix_cache(model, prefix, device, "generation")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def run(idx: list[int]) -> tuple:
        if cache is not None:
            return _generate_batch(model, [encoded[i] for i in idx], prefix, cache, pad, device, gcfg.num_beams,
                                   kwargs)
        enc = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, padding=True, return_tensors="pt").to(device)
        return model.generate(**enc, **kwargs), enc["input_ids"].shape[1]

    def step(idx: list[int]) -> None:
        if capture:
            with _first_logits(model) as first:
                out, width = run(idx)
            if first:  # (a model whose generate runs another module leaves it empty: its prompts are encoded again)
                # beam search runs num_beams rows per prompt, alike at the first step
                first_step.record(idx, [encoded[i] for i in idx], first[0][:: max(1, gcfg.num_beams)])
        else:
            out, width = run(idx)
        new = out if seq2seq else out[:, width:]
        for i, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
            outputs[i] = text

    torch.manual_seed(seed)
    try:
        sizer.run(order, step, "generation", length=lambda i: len(encoded[i]))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = old_side, old_trunc
    return outputs


@contextlib.contextmanager
def _first_logits(model):
    """Inside, the first forward pass of ``model`` (generation's first step) leaves its logits at the
    last position, unprocessed, in the yielded list: (rows, vocab). A forward hook on the model
    that ``generate`` runs (a peft model's base model), so no later step's logits are kept."""
    seen: list[torch.Tensor] = []

    def hook(module, args, output):
        if not seen:
            seen.append(output.logits[:, -1].detach())

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    handle = target.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _generate_batch(model, seqs: list[list[int]], prefix: list[int], cache, pad: int, device, num_beams: int,
                    kwargs: dict) -> tuple:
    """Generate from ``seqs`` that all start with ``prefix``, whose cache is given; returns
    what ``model.generate`` returns and the width of its input (the new tokens start there).

    Each row is the prefix, then padding, then the row's own tokens, so all rows end
    at the last column. The attention mask hides the padding, and generate counts
    positions from that mask, so every token keeps the position it has in the whole
    prompt: the same outputs as plain left padding, with the prefix run only once.
    """
    p = len(prefix)
    tails = [s[p:] for s in seqs]
    width = max(map(len, tails))
    input_ids = torch.tensor([prefix + [pad] * (width - len(t)) + t for t in tails], device=device)
    attn = torch.tensor([[1] * p + [0] * (width - len(t)) + [1] * len(t) for t in tails], device=device)
    # beam search runs num_beams rows per prompt but does not widen a given cache itself
    batch_cache = _batch_cache(cache, len(seqs) * max(1, num_beams))
    out = model.generate(input_ids=input_ids, attention_mask=attn, **{_cache_name(model): batch_cache}, **kwargs)
    return out, input_ids.shape[1]


def _generate_takes_a_cache(model) -> bool:
    """Whether generate can start from a cache passed in: not when the model's generation
    config asks for a cache of another kind (static, quantized, ...) or for none."""
    gen = getattr(model, "generation_config", None)
    return not (getattr(gen, "cache_implementation", None) or getattr(gen, "use_cache", True) is False)


def _cache_name(model) -> str:
    """The name of the key/value cache argument and output: ``cache`` in recent
    transformers 5 releases, ``past_key_values`` before."""
    return "cache" if "cache" in architecture.forward_params(model) else "past_key_values"


def _prefix_cache(model, prefix: list[int], device, what: str):
    """The key/value cache of ``prefix`` run once through the model, or None when there is
    no prefix or the cache cannot be reused: a cache that cannot be copied per batch,
    one with sliding-window or recurrent layers, where padding after the prefix would
    change what the model sees, or a PEFT prompt-learning model, which puts virtual
    tokens of its own in the cache."""
    if not prefix or getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return None
    ids = torch.tensor([prefix], device=device)
    extra = {"logits_to_keep": 1} if architecture.takes_logits_to_keep(model) else {}  # only the cache is read
    try:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **extra)
        cache = getattr(out, _cache_name(model), None)
    except Exception as err:
        log.warning("%s: prompt prefix not shared (%s); encoding whole prompts.", what, err)
        return None
    if not hasattr(cache, "batch_repeat_interleave"):
        return None
    if any(getattr(cache, "is_sliding", ())) or any(getattr(cache, "is_linear", ())):
        log.info("%s: prompt prefix not shared (sliding-window or recurrent layers); encoding whole prompts.", what)
        return None
    return cache


def _batch_cache(cache, rows: int):
    """A copy of a one-row prefix cache widened to ``rows`` rows; each batch extends its own."""
    out = copy.deepcopy(cache)
    out.batch_repeat_interleave(rows)
    return out


def answer_split(tokenizer, prompt: str, answers: Sequence[str],
                 prompt_ids: list[int] | None = None) -> tuple[list[int], list[list[int]]]:
    """(context ids, each answer's ids): ``prompt + answer`` encoded whole, cut where the
    prompt's own ids stop matching. Those are exactly the tokens the model writes after
    the prompt; a prompt ending in a space that merges into the answer's first token
    leaves a context one token shorter than the prompt (as training sees that text)."""
    head = prompt_ids if prompt_ids is not None else tokenizer(prompt)["input_ids"]
    wholes = [tokenizer(prompt + a)["input_ids"] for a in answers]
    cut = min(common_prefix_length(head, w) for w in wholes)
    return head[:cut], [check_label_word(tokenizer, a, w[cut:]) for a, w in zip(answers, wholes)]


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
        ids.append(check_label_word(tokenizer, opt, tok))
    return ids


# A prompt prefix shared by every prompt (system prompt, template head, k-shot examples)
# is run once and its key/value cache reused when it is at least this many tokens.
MIN_SHARED_PREFIX = 8


@torch.no_grad()
def label_logprobs(model, tokenizer, prompts: Sequence[str], options: Sequence[str], *,
                   batch_size: int | BatchSize = 32,
                   max_length: int | None = None, share_prefix: bool = True,
                   join: Callable[[str, str], str] | None = None,
                   first_step: FirstStep | None = None) -> torch.Tensor:
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
    with explicit position ids and only the logits that are read are computed. One-token
    options after a prompt that ``first_step`` saw generated from the same ids are read
    from it, and that prompt is not encoded again.
    """
    model.eval()
    device = _model_device(model)
    sizer = _batch_size(batch_size)
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
                                     sizer, device)
        else:
            known = None
            if first_step is not None and all(len(ids) == 1 for ids in option_ids):
                first = [ids[0] for ids in option_ids]
                known = [first_step.get(i, ids, first) for i, ids in zip(members, group_ids)]
            part = _causal_logprobs(model, group_ids, option_ids, pad, sizer, device, share_prefix, known)
        scores[members] = part
    return scores


def _causal_logprobs(model, prompt_ids, option_ids, pad, sizer: BatchSize, device, share_prefix,
                     known: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """``known``: for one-token options, each prompt's options' log-probs where already known (else None)."""
    scores = torch.zeros(len(prompt_ids), len(option_ids))

    def new_forward() -> _Forward:  # encodes the shared prefix: only when some prompt is left to encode
        return _Forward(model, pad, device, _shared_prefix(prompt_ids) if share_prefix else [])

    if all(len(ids) == 1 for ids in option_ids):
        first = torch.tensor([ids[0] for ids in option_ids])
        rest = list(range(len(prompt_ids)))
        if known is not None:
            for i, logp in enumerate(known):
                if logp is not None:
                    scores[i] = logp
            rest = [i for i, logp in enumerate(known) if logp is None]
        if not rest:
            return scores
        forward = new_forward()
        order = sorted(rest, key=lambda i: -len(prompt_ids[i]))

        def step(idx):
            logp = forward([prompt_ids[i] for i in idx], 1)[:, -1].cpu()
            scores[idx] = logp[:, first]

        sizer.run(order, step, "likelihood", length=lambda i: len(prompt_ids[i]))
        return scores

    forward = new_forward()
    pairs = [(i, j) for i in range(len(prompt_ids)) for j in range(len(option_ids))]
    pairs.sort(key=lambda ij: -(len(prompt_ids[ij[0]]) + len(option_ids[ij[1]])))

    def pair_step(chunk):
        width = max(len(option_ids[j]) for _, j in chunk)
        # position p predicts token p+1: the option's n tokens are read at the n
        # positions before the last one
        logp = forward([prompt_ids[i] + option_ids[j] for i, j in chunk], width + 1).cpu()
        for row, (i, j) in enumerate(chunk):
            n = len(option_ids[j])
            positions = torch.arange(width - n, width)
            scores[i, j] = logp[row, positions, torch.tensor(option_ids[j])].sum()

    sizer.run(pairs, pair_step, "likelihood", length=lambda ij: len(prompt_ids[ij[0]]) + len(option_ids[ij[1]]))
    return scores


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
        self.keep = architecture.takes_logits_to_keep(model)
        self.cache = _prefix_cache(model, prefix, device, "likelihood")
        self.prefix = prefix if self.cache is not None else []

    def __call__(self, seqs: list[list[int]], last: int) -> torch.Tensor:
        p = len(self.prefix)
        tails = [s[p:] for s in seqs]
        width = max(map(len, tails))
        input_ids = torch.tensor([[self.pad] * (width - len(t)) + t for t in tails], device=self.device)
        attn = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in tails], device=self.device)
        position_ids = p + (attn.cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": last} if self.keep else {}
        if self.cache is not None:
            attn = torch.cat([torch.ones(len(tails), p, dtype=attn.dtype, device=self.device), attn], dim=1)
            extra.update({_cache_name(self.model): _batch_cache(self.cache, len(tails)), "use_cache": True})
        logits = self.model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, **extra).logits
        return torch.log_softmax(logits[:, -last:].float(), -1)


def _seq2seq_logprobs(model, prompt_ids, option_ids, scores, pad, sizer: BatchSize, device):
    pairs = [(i, j) for i in range(len(prompt_ids)) for j in range(len(option_ids))]
    pairs.sort(key=lambda ij: -len(prompt_ids[ij[0]]))

    def step(chunk):
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

    sizer.run(pairs, step, "likelihood", length=lambda ij: len(prompt_ids[ij[0]]))
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

    def pick(self, k: int, exclude: Callable[[dict], bool] = lambda row: False,
             fits: Callable[[list[dict]], bool] | None = None) -> list[dict]:
        """The first k usable rows of the permutation. With ``fits``, a row is taken only
        when the prompt with it still fits (``fits(shots)``); one that does not is passed
        over for the next, so a prompt may end up with fewer than k shots, never a cut one."""
        if k <= 0:
            return []
        if self.pool is None or len(self.order) == 0:
            raise ConfigError(f"eval.shots={k} needs a train split to draw the examples from; none was loaded.")
        shots, usable = [], 0
        if fits is not None and not fits([]):
            return []  # the example alone fills the window
        for pos in range(len(self.order)):
            row = self._row(pos)
            if exclude(row):
                continue
            usable += 1
            if fits is None or fits([*shots, row]):
                shots.append(row)
            if len(shots) == k:
                return shots
        if fits is None or usable < k:
            raise ConfigError(f"eval.shots={k} but the train split has only {usable} usable rows. "
                              f"Use eval.shots<={usable}.")
        return shots


def pick_shots(pool, k: int, seed: int, exclude: Callable[[dict], bool] = lambda row: False) -> list[dict]:
    """k fixed solved examples from the train split (see ``ShotPicker``)."""
    return ShotPicker(pool, seed).pick(k, exclude)


def build_prompts(task, records: Sequence[dict], shots: int, shot_pool=None, seed: int = 0,
                  max_tokens: int | None = None) -> list[str]:
    """The prompt for each record: zero-shot, or k solved train examples before it (``shot_prompts``)."""
    return shot_prompts(task, records, shots, shot_pool, seed, max_tokens)[0]


def shot_prompts(task, records: Sequence[dict], shots: int, shot_pool=None, seed: int = 0,
                 max_tokens: int | None = None) -> tuple[list[str], list[int]]:
    """Each record's prompt with up to k solved train examples before it, and how many each holds.

    ``max_tokens`` is the window a prompt must fit (in the task's tokenizer): a shot that
    would push a prompt past it is passed over for a later, shorter one of the same fixed
    order, so every prompt is whole - no shot cut in half - and holds at most k shots.
    """
    if shots <= 0:
        return [task.prompt(rec) for rec in records], [0] * len(records)
    picker = ShotPicker(shot_pool, seed)

    def length(rec, chosen) -> int:
        return len(task.tokenizer(task.prompt(rec, chosen), add_special_tokens=True)["input_ids"])

    window = max_tokens is not None and task.tokenizer is not None
    prompts, used = [], []
    for rec in records:
        own = task.user_text(rec)
        fits = (lambda chosen, rec=rec: length(rec, chosen) <= max_tokens) if window else None
        chosen = picker.pick(shots, lambda row: task.user_text(row) == own, fits)
        prompts.append(task.prompt(rec, chosen))
        used.append(len(chosen))
    return prompts, used


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


def label_scores(model, tokenizer, task, prompts: Sequence[str], record: dict, ecfg, max_length=None,
                 batch_size: int | BatchSize | None = None, first_step: FirstStep | None = None) -> torch.Tensor:
    """Log-score of each label after each prompt: (len(prompts), len(labels)).

    ``eval.label_scoring=exact``: the log-probability of the label's answer exactly as
    training writes it after that prompt (see ``Task.completion``).
    ``surface_forms``: the total probability of the label's surface forms
    (``surface_forms``), so a base model that would write ``Positive`` or
    `` positive`` is credited too; zero-shot baselines depend on it.
    ``first_step``: one-token options already read off generation (``FirstStep``).
    """
    options, join, owner = _scored_options(task, record, ecfg)
    sizer = BatchSize(ecfg.batch_size, ecfg.batch_tokens) if batch_size is None else _batch_size(batch_size)
    scores = label_logprobs(model, tokenizer, prompts, options, batch_size=sizer, max_length=max_length, join=join,
                            first_step=first_step)
    if owner is None:
        return scores
    owner_t = torch.tensor(owner)
    labels = range(len(task.label_keys))
    return torch.stack([torch.logsumexp(scores[:, owner_t == label], dim=1) for label in labels], 1)


def _scored_options(task, record: dict, ecfg) -> tuple[list[str], Callable[[str, str], str], list[int] | None]:
    """(the texts ``label_scores`` scores after each prompt, how each continues a prompt, which
    label each text belongs to: None when they are the labels' answers themselves, one each)."""
    answers = [task.completion({**record, task.cfg.target: k}) for k in task.label_keys]
    if ecfg.label_scoring == "exact":
        return answers, join_answer, None
    forms, owner = [], []
    for label, answer in enumerate(answers):
        for form in surface_forms(answer):
            forms.append(form)
            owner.append(label)
    return forms, (lambda prompt, form: form), owner


def first_tokens(tokenizer, task, prompts: Sequence[str], record: dict, ecfg, sample: int = 8) -> list[int]:
    """The tokens the one-token options of ``label_scores`` are, after the first ``sample`` prompts:
    what a ``FirstStep`` records. Prompts of one task end alike, so these cover the rest; a prompt
    whose options encode otherwise is scored by its own forward pass."""
    options, join, _ = _scored_options(task, record, ecfg)
    found: set[int] = set()
    for prompt in prompts[:sample]:
        _, answer_ids = answer_split(tokenizer, prompt, [join(prompt, o) for o in options])
        found.update(ids[0] for ids in answer_ids if len(ids) == 1)
    return sorted(found)


def written_metrics(cfg, task, record: dict) -> set[str]:
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


def check_objective(cfg, eval_rows) -> None:
    """Refuse an objective this run will not write, before any model loads: a name its task kind
    does not declare (the message lists those), a judge criterion without that judge, or an eval
    metric its eval methods do not write for its task's label words."""
    objective = str(cfg.objective)
    metric(objective, str(cfg.task.kind))
    task = build_task(cfg.task)
    if objective.startswith("judge/"):
        if cfg.judge.name == "none":
            raise ConfigError(f"objective={objective}: this run has no LLM judge (judge=none), so it writes no judge/ "
                              f"metrics. Add judge=hf, or use one of the eval/ metrics, e.g. {task.metrics[0].name}.")
        criterion = objective.split("/", 1)[1].removeprefix("reference_").removesuffix("_argmax")
        if criterion not in cfg.judge.criteria:
            raise ConfigError(f"objective={objective}: the judge rates {', '.join(cfg.judge.criteria)}; "
                              f"e.g. objective=judge/{next(iter(cfg.judge.criteria))}.")
        return
    if not objective.startswith("eval/") or not cfg.eval.enabled or len(eval_rows) == 0:
        return
    numeric = sorted(n for n in written_metrics(cfg, task, dict(eval_rows[0]))
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
    max_len = cfg.train.max_length if cfg.train.truncation == "keep_end" else None
    # k-shot prompts fill the train.max_length window with whole shots; generation's own tokens need room too
    window = int(cfg.train.max_length)
    room = window if ecfg.method == "likelihood" else window - int(task.cfg.generation.max_new_tokens)
    prompts, used = shot_prompts(task, records, ecfg.shots, shot_pool, ecfg.seed, room if room > 0 else window)
    metrics: dict = {}
    if ecfg.shots > 0:
        metrics["eval/shots_mean"] = sum(used) / max(len(used), 1)
        short = sum(u < ecfg.shots for u in used)
        if short:
            log.warning("eval.shots=%d: %d of %d prompts hold fewer shots (mean %.2f), as more would not fit in "
                        "train.max_length=%s tokens with the answer's max_new_tokens.", ecfg.shots, short, len(used),
                        metrics["eval/shots_mean"], window)
    methods = ["generate", "likelihood"] if ecfg.method == "both" else [ecfg.method]
    rows = [{"input": p, "reference": task.reference(r)} for p, r in zip(prompts, records)]
    results = {}
    # one batch size for the whole evaluation: halved on out-of-memory, it stays halved
    sizer = BatchSize(ecfg.batch_size, ecfg.batch_tokens)
    # load the metrics library up front: a one-off import is not evaluation time, and
    # with method=both it would otherwise count against whichever method runs first
    evaluate_library()
    # with both methods, one-token labels are read off generation's first step (the same forward pass)
    first_step = None
    if len(methods) > 1 and not getattr(model.config, "is_encoder_decoder", False):
        tokens = first_tokens(tokenizer, task, prompts, records[0], ecfg)
        first_step = FirstStep(tokens) if tokens else None  # no one-token label: nothing to read
    for method in methods:
        start = time.perf_counter()
        if method == "generate":
            raw = generate(model, tokenizer, prompts, task.cfg.generation, batch_size=sizer,
                           max_length=max_len, seed=ecfg.seed, first_step=first_step)
            preds = [task.clean_prediction(t) for t in raw]
            m, per_row = task.score(preds, records)
            for row, pred, extra in zip(rows, preds, per_row):
                row.setdefault("prediction", pred)
                for k, v in extra.items():
                    row.setdefault(k, v)
            results["generate"] = [r.get("predicted_label") for r in per_row]
        else:
            scores = label_scores(model, tokenizer, task, prompts, records[0], ecfg, max_len, batch_size=sizer,
                                  first_step=first_step)
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
        metrics["eval/label_scoring"] = str(ecfg.label_scoring)
    metrics["eval/n"] = len(records)
    metrics["eval/shots"] = ecfg.shots
    return metrics, rows


# ----------------------------------------------------------------------------- re-evaluating a trained run

# What `evaluate.py run=<dir>` takes from the command line on top of the run's own
# config.yaml: evaluation settings only. Everything that shaped the trained model
# (model, data, task prompt, train, lora, quant) comes from the run.
EVAL_OVERRIDABLE = ("eval", "task.generation", "data.path", "objective", "judge")
# Settings of this invocation, never the trained run's: where results go, the
# device, the tracker.
EVAL_INVOCATION = ("output_dir", "run_name", "device", "logger", "run", "hydra", "cache_dir")


def _under(key: str, roots) -> bool:
    return any(key == root or key.startswith(root + ".") for root in roots)


def eval_config(cfg: DictConfig, overrides: list[str] | None = None) -> DictConfig:
    """The config an evaluation runs with.

    Without ``run``: ``cfg`` itself (a base model, zero- or k-shot). With
    ``run=<dir>``: the run's saved ``config.yaml``, type-checked against the schema,
    plus the keys in ``overrides`` (the entry script passes those given on its command line) copied
    from ``cfg`` when they are evaluation settings (eval.*, task.generation.*,
    data.path, objective); output_dir, run_name, device and logger always come from
    ``cfg``. Any other override is refused: it would describe a different run.
    """
    if not cfg.get("run"):
        return cfg
    trained = Path(str(cfg.run))
    out = load_run_config(trained)
    keys = list(overrides or ())
    refused = [k for k in keys if not _under(k, EVAL_OVERRIDABLE + EVAL_INVOCATION)]
    if refused:
        allowed = ", ".join(k + ".*" if k in ("eval", "task.generation") else k for k in EVAL_OVERRIDABLE)
        raise ConfigError(
            f"run={cfg.run} is evaluated with its own model, data, task and training settings, so "
            f"{', '.join(refused)} cannot be changed. Only {allowed} apply; to evaluate another model use "
            "evaluate.py without run=."
        )
    with open_dict(out):
        for key in keys:
            if _under(key, EVAL_OVERRIDABLE):
                OmegaConf.update(out, key, OmegaConf.select(cfg, key), merge=False)
        for key in ("output_dir", "run_name", "device", "cache_dir"):
            out[key] = cfg.get(key)
        out.logger = cfg.logger
        out.run = str(trained)
    return out
