"""Tokenized-data cache, so a sweep never tokenizes the same rows twice.

Runs in a sweep share one permutation of the train split (``data.seed``) and take
prefixes of it (``train.n``). The cache stores the tokenized rows of that
permutation in order, keyed by everything that changes the tokens (tokenizer,
task templates, data source, seed). A run asking for ``n`` rows reuses the cached
prefix and tokenizes only the rows beyond it.

Rows are stored as ``input_ids`` + ``completion_mask`` (1 on completion tokens),
made as SFTTrainer makes them from prompt/completion text, with what training needs
from them ready too: ``labels`` (the ids, -100 off the completion) and ``length``.
A later run with the same rows then only reads them back (``training.sft_rows`` cuts
them to ``train.max_length``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from datasets import Dataset, concatenate_datasets, load_from_disk

from ftexp import files

log = logging.getLogger(__name__)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two id sequences share."""
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def tokenize_prompt_completion(tokenizer, prompts, completions) -> dict:
    """input_ids of prompt+completion+EOS and the mask of completion tokens.

    SFTTrainer's own tokenization of prompt/completion text, done here so the rows can
    be cached (SFTTrainer offers it only inside its dataset preparation): EOS is added
    to a completion that lacks it, and the completion starts where the tokenized prompt
    stops being a prefix of the tokenized whole (tokens may merge across the boundary).
    """
    eos = tokenizer.eos_token or ""
    full = tokenizer([p + c + (eos if not c.endswith(eos) else "") for p, c in zip(prompts, completions)])["input_ids"]
    heads = tokenizer(list(prompts))["input_ids"]
    masks = []
    for head, ids in zip(heads, full):
        k = common_prefix_length(head, ids)
        masks.append([0] * k + [1] * (len(ids) - k))
    return {"input_ids": full, "completion_mask": masks}


def with_labels(batch: dict) -> dict:
    """Add ``labels`` (-100 off the completion, as SFTTrainer builds them from the mask) and
    ``length`` (tokens per row, read by the length-grouped sampler) to tokenized rows."""
    labels = [[t if m else -100 for t, m in zip(ids, mask)]
              for ids, mask in zip(batch["input_ids"], batch["completion_mask"])]
    return {**batch, "labels": labels, "length": [len(ids) for ids in batch["input_ids"]]}


def fingerprint(tokenizer, cfg) -> str:
    """Everything that changes the tokens of the permuted train split."""
    state = {
        "format": 3,  # 2: answers joined to their prompt (no space after a chat template's newline); 3: + labels, length
        "tokenizer": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
        if hasattr(tokenizer, "backend_tokenizer") else tokenizer.name_or_path,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token],
        "task": {k: v for k, v in dict(cfg.task).items() if k != "generation"},
        "use_chat_template": cfg.model.use_chat_template,
        "data": {k: cfg.data[k] for k in ("source", "hub_config", "path", "format", "train_split", "files", "columns",
                                          "eval_fraction", "seed", "generator")},
        "arch": cfg.model.arch,
    }
    blob = json.dumps(state, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def tokenized_prefix(records: Dataset, tokenizer, cfg, cache_dir: str | None) -> tuple[Dataset, int]:
    """Tokenize ``records`` (the first rows of the seeded permutation), reusing the cache.

    Returns the tokenized dataset and how many rows had to be tokenized now.
    """
    def encode(ds):
        return ds.map(lambda b: with_labels(tokenize_prompt_completion(tokenizer, b["prompt"], b["completion"])),
                      batched=True, remove_columns=ds.column_names)

    if not cache_dir:
        return encode(records), len(records)
    root = Path(os.path.expanduser(str(cache_dir))) / "tokenized" / fingerprint(tokenizer, cfg)
    with files.locked(root.with_suffix(".lock")):  # parallel sweep workers take turns
        cached = load_from_disk(str(root)) if (root / "dataset_info.json").exists() else None
        have = len(cached) if cached is not None else 0
        n = len(records)
        if cached is not None and have >= n:
            return cached.select(range(n)), 0
        fresh = encode(records.select(range(have, n)))
        merged = fresh if cached is None else concatenate_datasets([cached, fresh])
        with files.atomic_dir(root) as tmp:
            merged.save_to_disk(str(tmp))
        log.info("tokenized %d new rows (%d reused from the cache)", n - have, have)
        return load_from_disk(str(root)), n - have
