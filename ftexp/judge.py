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
has a gap near 0, and is flagged. Scores are cached in ``<cache_dir>/judge/``, keyed
by the judge model, the criterion's prompt and the pair, so an identical rerun
makes no model calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ftexp import evaluation, gguf, modeling
from ftexp.config import ConfigError
from ftexp.tasks.base import chat_prompt

log = logging.getLogger(__name__)

RATINGS = ("1", "2", "3", "4", "5")
# judge/* keys that are not a criterion's score
BOOKKEEPING = ("n", "unparsed", "requests", "cache_hits", "rating_mass", "control_ok")
CONF = Path(__file__).resolve().parents[1] / "conf"


def judge_model_config(name: str):
    """(model config, quant config) of judge.model: a local folder, or a preset of conf/model."""
    from omegaconf import OmegaConf

    from ftexp.config import ModelConfig, QuantConfig

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


class Judge:
    """A local judge model and its cache. ``rate(criterion, prompt, pairs)`` -> one result per pair."""

    def __init__(self, jcfg, cache_dir: str | None, device: str):
        self.cfg = jcfg
        mcfg, qcfg = judge_model_config(str(jcfg.model))
        path = mcfg.name_or_path
        if gguf.is_gguf(mcfg):
            fallback = Path(tempfile.mkdtemp(prefix="ftexp-judge-")) / "model"
            path = str(gguf.plain_copy(mcfg, cache_dir, fallback, modeling.gguf_dtype(mcfg)))
        self.tokenizer = modeling.load_tokenizer(path, mcfg)
        self.model = modeling.load_model(path, mcfg, qcfg, device)
        self.model_id = json.dumps([mcfg.name_or_path, mcfg.get("gguf_file"), mcfg.revision, mcfg.dtype, qcfg.name])
        self.cache = ScoreCache(cache_dir)
        self.requests = 0
        self.cache_hits = 0

    def prompt(self, criterion_prompt: str, source: str, summary: str) -> str:
        text = criterion_prompt.replace("{source}", source[: self.cfg.max_source_chars]).replace("{summary}", summary)
        if getattr(self.tokenizer, "chat_template", None):
            return chat_prompt(self.tokenizer, [{"role": "user", "content": text}])
        return text + "\nScore: "

    def _key(self, criterion_prompt: str, source: str, summary: str) -> str:
        blob = json.dumps([self.model_id, criterion_prompt, source[: self.cfg.max_source_chars], summary])
        return hashlib.sha256(blob.encode()).hexdigest()

    @torch.no_grad()
    def rate(self, criterion_prompt: str, pairs: Sequence[tuple[str, str]], label: str = "") -> list[dict]:
        keys = [self._key(criterion_prompt, s, y) for s, y in pairs]
        found = {k: v for k in set(keys) if (v := self.cache.get(k)) is not None}
        todo = [i for i, k in enumerate(keys) if k not in found]
        todo = list({keys[i]: i for i in todo}.values())  # a pair asked twice is scored once
        self.cache_hits += len(keys) - len(todo)
        if todo:
            prompts = [self.prompt(criterion_prompt, *pairs[i]) for i in todo]
            step = 4 * max(1, self.cfg.batch_size)
            parts = []
            for start in range(0, len(prompts), step):  # in chunks, so progress can be told
                parts.append(evaluation.label_logprobs(self.model, self.tokenizer, prompts[start:start + step],
                                                       list(RATINGS), batch_size=self.cfg.batch_size,
                                                       join=lambda p, o: o))
                self.requests += len(parts[-1])
                log.info("judge %s: %d/%d rated; %d model calls so far, %d answers from the cache", label,
                         min(start + step, len(prompts)), len(prompts), self.requests, self.cache_hits)
            logp = torch.cat(parts)
            weights = torch.softmax(logp, dim=-1)  # renormalised over the five ratings
            values = torch.arange(1, len(RATINGS) + 1, dtype=weights.dtype)
            fresh = {}
            for row, i in enumerate(todo):
                fresh[keys[i]] = {"score": float((weights[row] * values).sum()),
                                  "argmax": int(weights[row].argmax()) + 1,
                                  "mass": float(logp[row].exp().sum()),
                                  "probs": [round(float(p), 4) for p in weights[row]]}
            self.cache.put(fresh)
            found.update(fresh)
        return [found[k] for k in keys]


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
    judge = Judge(j, cfg.cache_dir, device)
    metrics: dict = {"judge/n": n}
    refs = [first_reference(task, records[i]) for i in range(n)] if (j.references or j.control) else []
    perm = derangement(n, j.seed) if j.control else []
    if j.control and n < 2:
        raise ConfigError("judge.control needs at least 2 examples to pair each reference with another source.")
    masses = []
    for c, criterion_prompt in j.criteria.items():
        got = judge.rate(str(criterion_prompt), list(zip(sources, predictions)), f"{c} (predictions)")
        metrics[f"judge/{c}"] = float(np.mean([g["score"] for g in got]))
        metrics[f"judge/{c}_argmax"] = float(np.mean([g["argmax"] for g in got]))
        masses += [g["mass"] for g in got]
        for i, g in enumerate(got):
            rows[i].setdefault("judge", {})[c] = round(g["score"], 4)
            rows[i].setdefault("judge_argmax", {})[c] = g["argmax"]
        if refs:
            true = judge.rate(str(criterion_prompt), list(zip(sources, refs)), f"{c} (references)")
            if j.references:
                metrics[f"judge/reference_{c}"] = float(np.mean([g["score"] for g in true]))
                metrics[f"judge/reference_{c}_argmax"] = float(np.mean([g["argmax"] for g in true]))
                for i, g in enumerate(true):
                    rows[i].setdefault("judge_reference", {})[c] = round(g["score"], 4)
            if j.control:
                wrong = judge.rate(str(criterion_prompt), [(sources[perm[i]], refs[i]) for i in range(n)],
                                   f"{c} (control pairs)")
                gaps = [t["score"] - w["score"] for t, w in zip(true, wrong)]
                lo, hi = bootstrap_interval(gaps, j.seed)
                metrics[f"judge/control_gap_{c}"] = float(np.mean(gaps))
                metrics[f"judge/control_gap_{c}_lo"], metrics[f"judge/control_gap_{c}_hi"] = lo, hi
    metrics["judge/rating_mass"] = float(np.mean(masses))  # how much the judge wanted to answer 1-5
    metrics["judge/unparsed"] = 0  # the rating is read from the distribution, never parsed from text
    metrics["judge/requests"] = judge.requests
    metrics["judge/cache_hits"] = judge.cache_hits
    if j.control and "consistency" in j.criteria:
        # the validity check: a judge must rate a summary above one of another conversation
        metrics["judge/control_ok"] = int(metrics["judge/control_gap_consistency_lo"] > 0)
    return metrics
