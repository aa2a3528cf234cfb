"""The two recipes, each read top to bottom: setup -> train -> evaluate -> record.

``finetune(cfg)`` is what ``train.py`` runs and tests call; ``evaluate_only(cfg)``
is what ``evaluate.py`` runs. Both return the flat metrics dict written to
``metrics.json``.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from omegaconf import DictConfig, OmegaConf, open_dict

from ftexp import data as data_mod
from ftexp import evaluation, memory, modeling, records, training
from ftexp.config import ConfigError, validate
from ftexp.tasks import build_task

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- setup helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_run_dir(cfg: DictConfig) -> Path:
    if cfg.output_dir:
        path = Path(cfg.output_dir)
    else:
        from hydra.core.hydra_config import HydraConfig

        path = Path(HydraConfig.get().runtime.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_data(cfg: DictConfig) -> tuple[Dataset, Dataset, Dataset]:
    """(full train split, train subset of train.n rows, eval subset of eval.n rows)."""
    splits = data_mod.load_splits(cfg.data)
    train = data_mod.subset(splits["train"], cfg.train.n, cfg.data.seed, key="train.n")
    evaluation_rows = data_mod.subset(splits["eval"], cfg.eval.n, cfg.eval.seed, key="eval.n")
    return splits["train"], train, evaluation_rows


def tiny_corpus(cfg: DictConfig, pool: Dataset) -> list[str]:
    """Texts the tiny tokenizer is trained on: the formatted train split (labels included)."""
    task = build_task(cfg.task)
    rows = pool.select(range(min(len(pool), cfg.model.tiny.tokenizer_max_texts)))
    texts = []
    for rec in rows:
        texts.append(task.prompt(rec) + task.completion(rec))
    if cfg.task.system_prompt:
        texts.append(cfg.task.system_prompt)
    return texts


def base_model_path(cfg: DictConfig, pool: Dataset, run_dir: Path) -> str:
    if cfg.model.name_or_path != "tiny":
        return cfg.model.name_or_path
    out = run_dir / "base_model"
    if not (out / "config.json").exists():
        modeling.build_tiny(cfg.model, tiny_corpus(cfg, pool), cfg.train.seed, out)
    return str(out)


def check_label_words(task, tokenizer) -> None:
    if task.kind != "classification":
        return
    for key, word in task.labels.items():
        ids = tokenizer(task.completion({task.cfg.target: key}), add_special_tokens=False)["input_ids"]
        unk = tokenizer.unk_token_id
        if not ids or (unk is not None and all(i == unk for i in ids)):
            raise ConfigError(
                f"task.labels: the word {word!r} for label {key} tokenizes to nothing with this tokenizer, so it "
                "can be neither trained nor predicted. Pick a word made of ordinary characters."
            )


def to_records(task, rows: Dataset) -> Dataset:
    return Dataset.from_list([task.to_prompt_completion(dict(r)) for r in rows])


def result_row(metrics: dict, objective: str) -> str:
    parts = []
    if "eval/accuracy" in metrics:
        parts.append(f"accuracy {metrics['eval/accuracy']:.3f}  F1 {metrics.get('eval/f1', float('nan')):.3f}")
    for key in ("eval/rouge1", "eval/rougeL", "eval/exact_match", "eval/mcrmse"):
        if key in metrics:
            parts.append(f"{key.split('/')[1]} {metrics[key]:.4f}")
    if objective in metrics and not any(objective.split("/")[-1] in p for p in parts):
        parts.append(f"{objective} {metrics[objective]}")
    if "train/loss_first" in metrics:
        parts.append(f"loss {metrics['train/loss_first']:.3f}->{metrics['train/loss_last']:.3f}")
    if "eval/irregular" in metrics:
        top = metrics.get("eval/irregular_top") or ""
        parts.append(f"irregular {metrics['eval/irregular']}" + (f" [{top}]" if top else ""))
    total = metrics.get("train/runtime_s", 0.0) + metrics.get("eval/runtime_s", 0.0)
    parts.append(f"time {total:.1f}s (eval n={metrics.get('eval/n')})")
    return " | ".join(parts)


# ----------------------------------------------------------------------------- recipes


def finetune(cfg: DictConfig) -> dict:
    validate(cfg)
    run_dir = resolve_run_dir(cfg)
    seed_everything(cfg.train.seed)
    device = modeling.pick_device(cfg.device)
    records.write_config(cfg, run_dir)
    tracker = records.Tracker(cfg.logger, cfg, run_dir)
    failed = True
    try:
        # setup: data, tokenizer, task, model, adapters
        pool, train_rows, eval_rows = load_data(cfg)
        base = base_model_path(cfg, pool, run_dir)
        tokenizer = modeling.load_tokenizer(base, cfg.model)
        task = build_task(cfg.task, tokenizer=tokenizer, use_chat_template=cfg.model.use_chat_template)
        check_label_words(task, tokenizer)
        train_records = to_records(task, train_rows)
        weights = memory.check(cfg.model, cfg.quant, base, device)  # refuses a GPU too small
        model = modeling.load_model(base, cfg.model, cfg.quant, device)
        weights["model/weight_memory_mb"] = memory.measured_mb(model)
        model = modeling.attach_adapters(model, cfg.lora, cfg.quant, cfg.train.gradient_checkpointing)
        trainable, total = modeling.count_parameters(model)
        log.info("trainable params: %s || all params: %s || trainable%%: %.4f", f"{trainable:,}", f"{total:,}",
                 100 * trainable / total)
        metrics = {"train/trainable_params": trainable, "train/total_params": total,
                   "train/trainable_pct": 100 * trainable / total, **weights}

        # train
        fit = training.train(
            cfg, model, tokenizer, train_records, run_dir, device, tracker.report_to)
        metrics.update(fit["metrics"])
        model = fit["trainer"].model
        if cfg.train.save_model:
            out = run_dir / ("adapter" if cfg.lora.enabled else "model")
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)

        # evaluate
        if cfg.eval.enabled:
            eval_metrics, rows = evaluation.evaluate(cfg, model, tokenizer, task, eval_rows, pool)
            metrics.update(eval_metrics)
            records.write_predictions(rows, run_dir)
            tracker.table("predictions", rows[: cfg.logger.log_predictions])

        # record
        records.write_metrics(metrics, run_dir)
        tracker.summary(metrics)
        print(f"[ftexp] {run_dir.name}: {result_row(metrics, cfg.objective)}", flush=True)
        failed = False
        return metrics
    finally:
        tracker.finish(failed=failed)
