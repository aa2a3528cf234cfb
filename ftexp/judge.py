"""LLM-as-judge: summaries rated 1-5 per criterion by a local causal LM, G-Eval style.

For each criterion (``judge.criteria``: a prompt with ``{source}`` and ``{summary}``)
the judge model sees the prompt through its chat template, and the score is the
expectation of the rating under its next-token distribution over the tokens 1..5,
renormalised over those five (G-Eval's probability-weighted sum, exact from one
forward pass instead of estimated from sampled replies). The most likely rating is
recorded beside it, and the probability mass the five ratings held.

``judge.references`` rates the reference summaries too, so model and human can be
compared. ``judge.control`` rates each reference against a *different* source (a
seeded derangement): a judge that cannot tell a true pair from a mismatched one
has a gap near 0, and is flagged. With the control on, each criterion gets a verdict,
``judge/valid_<criterion>``: valid when the gap's bootstrap 95% interval lies above 0
and the references rate at least as high as the zero-shot summaries
(``judge.baseline``, a zero-shot run's folder; else this run's own predictions).
The result line and the sweep report show it. Scores are cached in ``<cache_dir>/judge/``, keyed
by the judge model, the criterion's prompt and the pair, so an identical rerun
makes no model calls.

Two backends share that cache and the metrics:

- ``judge=hf``: a local causal LM (``judge.model``: a preset or a folder, loaded by
  the training code, so quantization and GGUF work); the ratings' probabilities
  are read exactly from one forward pass.
- ``judge=openai``: any OpenAI-compatible chat-completions server (``judge.base_url``
  and ``judge.model``: vLLM, llama.cpp, Ollama, ``transformers serve``, the hosted
  API). With ``logprobs`` the score is the expectation over the ratings found in
  ``top_logprobs`` at the rating token; a server that returns none has its reply
  parsed: the first integer, if it is 1-5. Anything else counts as unparsed and is
  never guessed. Requests run ``judge.concurrency`` at a time, with a timeout, and
  429 / 5xx answers and dropped connections are retried with exponential backoff,
  honouring ``Retry-After``. The API key is read from the environment variable named
  by ``judge.api_key_env`` and is never written anywhere.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import httpx
import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from ftexp import architecture, evaluation, gguf, modeling
from ftexp.config import ModelConfig, QuantConfig
from ftexp.errors import ConfigError
from ftexp.tasks.base import chat_prompt

log = logging.getLogger(__name__)

RATINGS = ("1", "2", "3", "4", "5")
CONF = Path(__file__).resolve().parents[1] / "conf"


def judge_model_config(name: str):
    """(model config, quant config) of judge.model: a local folder, or a preset of conf/model."""
    folder = Path(os.path.expanduser(name))
    if folder.is_dir():
        mcfg = OmegaConf.structured(ModelConfig(name=folder.name, name_or_path=str(folder), dtype="float32"))
        return mcfg, OmegaConf.structured(QuantConfig())
    if not (CONF / "model" / f"{name}.yaml").exists():
        presets = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
        raise ConfigError(f"judge.model={name}: neither a local model folder nor a model preset. Presets: {presets}.")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside train.py / evaluate.py
        cfg = compose(config_name="config", overrides=[f"model={name}"])
    else:
        with initialize_config_dir(config_dir=str(CONF)):
            cfg = compose(config_name="config", overrides=[f"model={name}"])
    if cfg.model.name_or_path == "tiny":
        raise ConfigError(f"judge.model={name} is a random-weight model: it cannot judge. Use a pretrained one, "
                          "e.g. judge.model=smollm2_135m_gguf.")
    return cfg.model, cfg.quant


class ScoreCache:
    """Judged pairs by key, in SQLite under ``<cache_dir>/judge/``; in memory without a cache_dir."""

    def __init__(self, cache_dir: str | None):
        self.memory: dict[str, dict] = {}
        self.db = None
        if cache_dir:
            folder = Path(os.path.expanduser(str(cache_dir))) / "judge"
            folder.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(folder / "scores.sqlite", timeout=60)
            self.db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value TEXT)")

    def get(self, key: str) -> dict | None:
        if key in self.memory:
            return self.memory[key]
        if self.db is not None:
            row = self.db.execute("SELECT value FROM scores WHERE key = ?", (key,)).fetchone()
            if row:
                return json.loads(row[0])
        return None

    def put(self, items: dict[str, dict]) -> None:
        self.memory.update(items)
        if self.db is not None:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?)",
                                    [(k, json.dumps(v)) for k, v in items.items()])


class JudgeError(RuntimeError):
    """The judge could not run: a server that refuses or never answers, a bad key, an unknown model."""


class Judge:
    """A judge model and its score cache. ``rate(criterion, prompt, pairs)`` -> one result per pair.

    A result is a dict with ``score`` (the expected rating, or None when the reply held
    no rating), ``argmax`` and, per backend, ``probs``, ``mass`` and the raw ``reply``.
    Subclasses implement ``score(texts)``: a result per filled-in prompt, or None for a
    request that failed for good (not cached, so a rerun asks again).
    """

    model_id: str  # what the cache keys on besides the prompt and the pair
    parallel: int  # prompts rated per step (batch or concurrent requests)

    def __init__(self, jcfg, cache_dir: str | None):
        self.cfg = jcfg
        self.cache = ScoreCache(cache_dir)
        self.requests = 0  # model calls actually made (forward passes of one prompt, or HTTP requests)
        self.cache_hits = 0
        self.failed = 0

    def fill(self, criterion_prompt: str, source: str, summary: str) -> str:
        return criterion_prompt.replace("{source}", source[: self.cfg.max_source_chars]).replace("{summary}", summary)

    def score(self, texts: list[str]) -> list[dict | None]:
        raise NotImplementedError

    def reread(self, cached: dict) -> dict:
        """A cached result as this version reads it (a parsed reply is parsed again)."""
        return rating_from_reply(cached["reply"], None) if "reply" in cached and "probs" not in cached else cached

    def _key(self, criterion_prompt: str, source: str, summary: str) -> str:
        blob = json.dumps([self.model_id, criterion_prompt, source[: self.cfg.max_source_chars], summary])
        return hashlib.sha256(blob.encode()).hexdigest()

    def rate(self, criterion_prompt: str, pairs: Sequence[tuple[str, str]], label: str = "") -> list[dict | None]:
        keys = [self._key(criterion_prompt, s, y) for s, y in pairs]
        found = {k: self.reread(v) for k in set(keys) if (v := self.cache.get(k)) is not None}
        todo = [i for i, k in enumerate(keys) if k not in found]
        todo = list({keys[i]: i for i in todo}.values())  # a pair asked twice is scored once
        self.cache_hits += len(keys) - len(todo)
        step = 4 * max(1, self.parallel)
        with tqdm(total=len(todo), desc=f"judge {label}", unit="rating", disable=None, leave=False) as bar:
            for start in range(0, len(todo), step):  # in chunks: cached as they come, progress told
                chunk = todo[start:start + step]
                got = self.score([self.fill(criterion_prompt, *pairs[i]) for i in chunk])
                self.cache.put({keys[i]: g for i, g in zip(chunk, got) if g is not None})
                found.update({keys[i]: g for i, g in zip(chunk, got) if g is not None})
                bar.update(len(chunk))
                bar.set_postfix(requests=self.requests, cached=self.cache_hits, failed=self.failed)
                log.info("judge %s: %d/%d rated; %d model calls so far, %d answers from the cache, %d failed",
                         label, min(start + step, len(todo)), len(todo), self.requests, self.cache_hits, self.failed)
        return [found.get(k) for k in keys]


class LocalJudge(Judge):
    """``judge=hf``: the ratings' probabilities read from a local model's next-token distribution."""

    def __init__(self, jcfg, cache_dir: str | None, device: str):
        super().__init__(jcfg, cache_dir)
        mcfg, qcfg = judge_model_config(str(jcfg.model))
        path = mcfg.name_or_path
        if gguf.is_gguf(mcfg):
            fallback = Path(tempfile.mkdtemp(prefix="ftexp-judge-")) / "model"
            path = str(gguf.plain_copy(mcfg, cache_dir, fallback, architecture.gguf_dtype(mcfg)))
        self.tokenizer = modeling.load_tokenizer(path, mcfg)
        self.model = modeling.load_model(path, mcfg, qcfg, device)
        self.model_id = json.dumps([mcfg.name_or_path, mcfg.get("gguf_file"), mcfg.revision, mcfg.dtype, qcfg.name])
        self.parallel = jcfg.batch_size

    def prompt(self, criterion_prompt: str, source: str, summary: str) -> str:
        return self.template(self.fill(criterion_prompt, source, summary))

    def template(self, text: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return chat_prompt(self.tokenizer, [{"role": "user", "content": text}])
        return text + "\nScore: "

    @torch.no_grad()
    def score(self, texts: list[str]) -> list[dict | None]:
        logp = evaluation.label_logprobs(self.model, self.tokenizer, [self.template(t) for t in texts],
                                         list(RATINGS), batch_size=self.cfg.batch_size, join=lambda p, o: o)
        self.requests += len(texts)
        weights = torch.softmax(logp, dim=-1)  # renormalised over the five ratings
        values = torch.arange(1, len(RATINGS) + 1, dtype=weights.dtype)
        return [{"score": float((weights[row] * values).sum()), "argmax": int(weights[row].argmax()) + 1,
                 "mass": float(logp[row].exp().sum()), "probs": [round(float(p), 4) for p in weights[row]]}
                for row in range(len(texts))]


NUMBER = re.compile(r"(?<![\w.])\d+(?!\w|\.\d)")  # 4, "4/5", "4." - not "Person1", "v2", "3.5"
LIST_ITEM = re.compile(r"[.)]\s+[A-Za-z]")  # what follows the number of "1. Read ..." / "2) Check ..."


def is_list_marker(reply: str, number: re.Match) -> bool:
    """Does ``number`` open a line as the number of a list item ("1. Read ..."), or go on a
    list that an earlier line opened (its item cut off by the reply's length limit)?"""
    line_start = reply.rfind("\n", 0, number.start()) + 1
    if reply[line_start:number.start()].strip():
        return False
    return bool(LIST_ITEM.match(reply, number.end())) or any(
        LIST_ITEM.match(reply, m.end()) for m in NUMBER.finditer(reply, 0, line_start)
        if not reply[reply.rfind("\n", 0, m.start()) + 1:m.start()].strip())


def rating_from_reply(reply: str, tokens: list[dict] | None) -> dict:
    """The rating in a chat reply: its first number, if it is 1-5 (else ``score`` None,
    unparsed). A digit inside a word ("#Person1#") or a list marker ("1. Read the ...")
    is not a number the judge gave. With the reply's per-token ``logprobs`` the score is
    the expectation over the ratings listed in ``top_logprobs`` where that number was
    generated."""
    found = next((m for m in NUMBER.finditer(reply) if not is_list_marker(reply, m)), None)
    if found is None or found.group() not in RATINGS:
        return {"score": None, "argmax": None, "reply": reply}
    rating = int(found.group())
    for position in tokens or []:
        if str(position.get("token", "")).strip() != found.group():
            continue
        best: dict[str, float] = {}
        for alt in position.get("top_logprobs") or []:
            r = str(alt.get("token", "")).strip()
            if r in RATINGS and alt.get("logprob") is not None:
                best[r] = max(best.get(r, -float("inf")), float(alt["logprob"]))
        if best:
            logp = torch.tensor([best.get(r, -float("inf")) for r in RATINGS], dtype=torch.float64)
            weights = torch.softmax(logp, dim=-1)
            return {"score": float((weights * torch.arange(1, 6, dtype=torch.float64)).sum()),
                    "argmax": int(weights.argmax()) + 1, "mass": float(logp.exp().sum()),
                    "probs": [round(float(p), 4) for p in weights], "reply": reply}
        break
    return {"score": float(rating), "argmax": rating, "reply": reply}


def retry_after(response: httpx.Response) -> float | None:
    """Seconds asked for by a ``Retry-After`` header (seconds or an HTTP date), if any."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else None


class ServerJudge(Judge):
    """``judge=openai``: ratings from an OpenAI-compatible ``/chat/completions`` endpoint."""

    MAX_WAIT_S = 120.0  # the longest single wait between tries, whatever Retry-After asks

    def __init__(self, jcfg, cache_dir: str | None):
        super().__init__(jcfg, cache_dir)
        self.url = str(jcfg.base_url).rstrip("/") + "/chat/completions"
        self.model_id = json.dumps(["openai", str(jcfg.base_url).rstrip("/"), str(jcfg.model)])
        self.parallel = jcfg.concurrency
        self._key_value = os.environ.get(str(jcfg.api_key_env), "") if jcfg.api_key_env else ""
        headers = {"Authorization": f"Bearer {self._key_value}"} if self._key_value else {}
        if not self._key_value:
            log.info("judge: no API key in $%s; requests go without one", jcfg.api_key_env)
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(float(jcfg.timeout_s)))
        self.answered = 0
        self._lock = threading.Lock()

    def _safe(self, text: str) -> str:
        """A message with the key, should a server echo it, masked."""
        return text.replace(self._key_value, "***") if self._key_value else text

    def body(self, text: str) -> dict:
        body = {"model": str(self.cfg.model), "messages": [{"role": "user", "content": text}],
                "max_tokens": int(self.cfg.max_tokens), "temperature": 0}
        if self.cfg.logprobs:
            body.update(logprobs=True, top_logprobs=int(self.cfg.top_logprobs))
        return body

    def ask(self, text: str) -> dict | None:
        """One rating; None when the server kept failing (retryable errors, all tries spent)."""
        problem, unreachable = "", False
        for attempt in range(int(self.cfg.max_retries) + 1):
            wait = None
            with self._lock:
                self.requests += 1
            try:
                response = self.client.post(self.url, json=self.body(text))
            except httpx.TransportError as e:  # timeouts, refused or dropped connections
                problem, unreachable = f"{type(e).__name__}: {e}", isinstance(e, httpx.ConnectError)
            else:
                unreachable = False
                if response.status_code == 429 or response.status_code >= 500:
                    problem = f"HTTP {response.status_code}"
                    wait = retry_after(response)
                elif response.status_code >= 400:
                    hint = (f" Check the key in ${self.cfg.api_key_env}." if response.status_code in (401, 403)
                            else " Check judge.model and judge.base_url.")
                    raise JudgeError(self._safe(f"the judge server at {self.url} answered HTTP {response.status_code}: "
                                                f"{response.text[:300]}.{hint}"))
                else:
                    try:
                        choice = response.json()["choices"][0]
                        reply = choice["message"].get("content") or ""
                        tokens = (choice.get("logprobs") or {}).get("content")
                    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                        problem = f"a reply that is not a chat completion: {response.text[:200]!r}"
                    else:
                        with self._lock:
                            self.answered += 1
                        return rating_from_reply(reply, tokens)
            if attempt < self.cfg.max_retries:
                backoff = min(self.MAX_WAIT_S, float(self.cfg.backoff_s) * 2 ** attempt) * (0.5 + random.random() / 2)
                delay = min(self.MAX_WAIT_S, wait if wait is not None else backoff)
                log.warning("judge: %s from %s; try %d of %d again in %.1f s", self._safe(problem), self.url,
                            attempt + 2, self.cfg.max_retries + 1, delay)
                time.sleep(delay)
        with self._lock:
            self.failed += 1
            never = self.answered == 0
        if never and unreachable:  # no server there: stop now rather than wait out every request
            raise JudgeError(self._safe(f"the judge server at {self.url} did not answer ({problem}) after "
                                        f"{self.cfg.max_retries + 1} tries. Is it running? Check judge.base_url."))
        log.error("judge: giving up on one rating after %d tries (%s); it is left out", self.cfg.max_retries + 1,
                  self._safe(problem))
        return None

    def score(self, texts: list[str]) -> list[dict | None]:
        with ThreadPoolExecutor(max_workers=max(1, int(self.cfg.concurrency))) as pool:
            return list(pool.map(self.ask, texts))


def make_judge(jcfg, cache_dir: str | None, device: str) -> Judge:
    return ServerJudge(jcfg, cache_dir) if jcfg.name == "openai" else LocalJudge(jcfg, cache_dir, device)


def derangement(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n) that moves every index (n >= 2)."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if n < 2 or not (perm == np.arange(n)).any():
            return perm.tolist()


def bootstrap_interval(values: Sequence[float], seed: int, rounds: int = 2000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(rounds, len(x)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def first_reference(task, record: dict) -> str:
    refs = task.references(record) if hasattr(task, "references") else [task.reference(record)]
    refs = [r for r in (refs if isinstance(refs, list) else [refs]) if str(r).strip()]
    if not refs:
        raise ConfigError("judge.references / judge.control need a reference summary, and an example has none.")
    return str(refs[0])


def judge_predictions(cfg, task, records: Sequence[dict], rows: list[dict], device: str) -> dict:
    """Rate the predictions in ``rows`` (and, when asked, the references and the control
    pairs); add per-example scores to ``rows``; return the judge/* metrics."""
    j = cfg.judge
    n = len(rows) if j.max_examples is None else min(len(rows), j.max_examples)
    if len(records) < n:
        raise ConfigError(f"the judge needs the source of each prediction: {len(rows)} predictions but {len(records)} "
                          "eval rows. Judge the run with the data it was evaluated on.")
    field = j.source_field
    if field not in records[0]:
        raise ConfigError(f"judge.source_field={field}: the data has no such field. Fields: {sorted(records[0])}.")
    sources = [str(records[i][field]) for i in range(n)]
    predictions = [str(rows[i].get("prediction", "")) for i in range(n)]
    judge = make_judge(j, cfg.cache_dir, device)
    metrics: dict = {"judge/n": n}
    refs = [first_reference(task, records[i]) for i in range(n)] if (j.references or j.control) else []
    perm = derangement(n, j.seed) if j.control else []
    if j.control and n < 2:
        raise ConfigError("judge.control needs at least 2 examples to pair each reference with another source.")
    tally = {"unparsed": 0, "masses": []}

    def summarise(got: list[dict | None], key: str) -> None:
        """judge/<key> and judge/<key>_argmax: means over the ratings the judge gave."""
        rated = [g for g in got if g is not None and g["score"] is not None]
        tally["unparsed"] += sum(1 for g in got if g is not None and g["score"] is None)
        tally["masses"] += [g["mass"] for g in rated if "mass" in g]
        metrics[f"judge/{key}"] = float(np.mean([g["score"] for g in rated])) if rated else float("nan")
        metrics[f"judge/{key}_argmax"] = float(np.mean([g["argmax"] for g in rated])) if rated else float("nan")

    def keep(rows_key: str, c: str, got: list[dict | None]) -> None:
        for i, g in enumerate(got):
            rows[i].setdefault(rows_key, {})[c] = None if g is None or g["score"] is None else round(g["score"], 4)
            if rows_key == "judge":
                rows[i].setdefault("judge_argmax", {})[c] = None if g is None else g["argmax"]
            if g is not None and "reply" in g:  # what the server said, parsed or not
                rows[i].setdefault(f"{rows_key}_reply", {})[c] = g["reply"]

    baseline = baseline_predictions(j.baseline, rows[:n]) if j.baseline else None
    for c, criterion_prompt in j.criteria.items():
        got = judge.rate(str(criterion_prompt), list(zip(sources, predictions)), f"{c} (predictions)")
        summarise(got, c)
        keep("judge", c, got)
        if baseline is not None:
            summarise(judge.rate(str(criterion_prompt), list(zip(sources, baseline)), f"{c} (baseline)"), f"baseline_{c}")
        if refs:
            true = judge.rate(str(criterion_prompt), list(zip(sources, refs)), f"{c} (references)")
            if j.references:
                summarise(true, f"reference_{c}")
                keep("judge_reference", c, true)
            if j.control:
                wrong = judge.rate(str(criterion_prompt), [(sources[perm[i]], refs[i]) for i in range(n)],
                                   f"{c} (control pairs)")
                tally["unparsed"] += sum(1 for w in wrong if w is not None and w["score"] is None)
                gaps = [t["score"] - w["score"] for t, w in zip(true, wrong)
                        if t is not None and w is not None and t["score"] is not None and w["score"] is not None]
                lo, hi = bootstrap_interval(gaps, j.seed) if gaps else (float("nan"), float("nan"))
                metrics[f"judge/control_gap_{c}"] = float(np.mean(gaps)) if gaps else float("nan")
                metrics[f"judge/control_gap_{c}_lo"], metrics[f"judge/control_gap_{c}_hi"] = lo, hi
                # the verdict: true pairs above mismatched ones, and references not below the zero-shot summaries
                rated_refs = [t["score"] for t in true if t is not None and t["score"] is not None]
                floor = metrics[f"judge/baseline_{c}" if baseline is not None else f"judge/{c}"]
                metrics[f"judge/valid_{c}"] = int(judge_is_valid(lo, float(np.mean(rated_refs)) if rated_refs
                                                                 else float("nan"), floor))
    if tally["masses"]:  # how much the judge wanted to answer 1-5 (when its probabilities are known)
        metrics["judge/rating_mass"] = float(np.mean(tally["masses"]))
    metrics["judge/unparsed"] = tally["unparsed"]  # replies with no rating 1-5 in them (never guessed)
    metrics["judge/failed"] = judge.failed  # ratings whose requests failed for good (a rerun asks again)
    metrics["judge/requests"] = judge.requests
    metrics["judge/cache_hits"] = judge.cache_hits
    if j.control and "consistency" in j.criteria:
        # the validity check: a judge must rate a summary above one of another conversation
        metrics["judge/control_ok"] = int(bool(metrics["judge/control_gap_consistency_lo"] > 0))
    if j.control:  # what the references were held against: the zero-shot run's summaries, or these predictions
        metrics["judge/valid_against"] = str(j.baseline) if baseline is not None else "predictions"
    return metrics


def judge_is_valid(control_gap_lo: float, reference: float, zero_shot: float) -> bool:
    """A judge is valid for a criterion when it rates a reference with its own conversation above
    the same reference with another one (the 95% interval of the gap lies above 0), and rates
    the references at least as high as a zero-shot model's summaries. NaN (nothing rated) fails."""
    return bool(control_gap_lo > 0 and reference >= zero_shot)


def baseline_predictions(run_dir: str, rows: Sequence[dict]) -> list[str]:
    """``judge.baseline``: the predictions of another run (the zero-shot one) on the same examples,
    in the same order; rated beside this run's so the verdict can hold the references against them."""
    path = Path(run_dir) / "predictions.jsonl"  # its presence is checked by config.check_judge_baseline
    theirs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(theirs) < len(rows):
        raise ConfigError(f"judge.baseline={run_dir} holds {len(theirs)} predictions, and {len(rows)} are judged. "
                          "Evaluate the baseline with the same eval.n, or lower judge.max_examples.")
    for i, (mine, other) in enumerate(zip(rows, theirs)):
        if "references" in mine and "references" in other and mine["references"] != other["references"]:
            raise ConfigError(f"judge.baseline={run_dir}: its example {i} is another example than this run's "
                              "(different references). Evaluate the baseline with the same data, eval.n and "
                              "eval.seed as this run.")
    return [str(r.get("prediction", "")) for r in theirs[:len(rows)]]
