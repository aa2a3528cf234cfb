"""The two recipes, each read top to bottom: setup -> train -> evaluate -> record.

``finetune(cfg)`` is what ``train.py`` runs and tests call; ``evaluate_only(cfg)``
is what ``evaluate.py`` runs. Both return the flat metrics dict written to
``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from omegaconf import DictConfig, OmegaConf, open_dict

from ftexp import data as data_mod
from ftexp import distributed, evaluation, gguf, judge, memory, modeling, records, training
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
        pair = task.to_prompt_completion(rec)
        texts.append(pair["prompt"] + pair["completion"])
    if cfg.task.system_prompt:
        texts.append(cfg.task.system_prompt)
    return texts


def base_model_path(cfg: DictConfig, pool: Dataset | None, run_dir: Path) -> str:
    """Where the base model loads from: the Hub id or folder as given, the plain copy
    of a GGUF checkpoint, or the tiny model built for this run (``base_model/``)."""
    if gguf.is_gguf(cfg.model):
        return str(gguf.plain_copy(cfg.model, cfg.cache_dir, run_dir / "base_model", modeling.gguf_dtype(cfg.model)))
    if cfg.model.name_or_path != "tiny":
        return cfg.model.name_or_path
    out = run_dir / "base_model"
    if not modeling.tiny_is_current(out, cfg.model, cfg.train.seed):  # missing, partial or made otherwise
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
        if metrics.get(key) is not None:  # null when nothing parsed (e.g. mcrmse)
            parts.append(f"{key.split('/')[1]} {metrics[key]:.4f}")
    if objective in metrics and not any(objective.split("/")[-1].lower() in p.lower() for p in parts):
        parts.append(f"{objective} {metrics[objective]}")
    if "judge/n" in metrics:
        crit = [k.split("/")[1] for k in metrics if k.startswith("judge/") and k.split("/")[1] not in judge.BOOKKEEPING
                and not k.split("/")[1].startswith(("reference_", "control_")) and not k.endswith(("_argmax", "_lo", "_hi"))]
        parts.append("judge " + " ".join(f"{c} {metrics[f'judge/{c}']:.2f}" for c in crit))
        if "judge/control_gap_consistency" in metrics:
            lo, hi = metrics["judge/control_gap_consistency_lo"], metrics["judge/control_gap_consistency_hi"]
            flag = "" if lo > 0 else " JUDGE CANNOT TELL A TRUE SUMMARY FROM A WRONG ONE"
            parts.append(f"consistency gap {metrics['judge/control_gap_consistency']:+.2f} [{lo:+.2f}, {hi:+.2f}]{flag}")
        lost = "".join(f", {metrics[f'judge/{k}']} {k}" for k in ("unparsed", "failed") if metrics.get(f"judge/{k}"))
        parts.append(f"judge calls {metrics['judge/requests']} (cache {metrics['judge/cache_hits']}{lost})")
    if "train/loss_first" in metrics:
        parts.append(f"loss {metrics['train/loss_first']:.3f}->{metrics['train/loss_last']:.3f}")
    if "eval/irregular" in metrics:
        top = metrics.get("eval/irregular_top") or ""
        parts.append(f"irregular {metrics['eval/irregular']}" + (f" [{top}]" if top else ""))
    total = metrics.get("train/runtime_s", 0.0) + metrics.get("eval/runtime_s", 0.0)
    parts.append(f"time {total:.1f}s (eval n={metrics.get('eval/n')})")
    return " | ".join(parts)


# ----------------------------------------------------------------------------- recipes


def record(cfg: DictConfig, out_dir: Path, tracker, metrics: dict, rows: list[dict] | None, source: str = "") -> None:
    """Write predictions and metrics (metrics.json last: it marks the folder finished), log them
    to the tracker, and print the result row."""
    if rows is not None:
        records.write_predictions(rows, out_dir)
        tracker.table("predictions", rows[: cfg.logger.log_predictions])
    records.write_metrics(metrics, out_dir)
    tracker.summary(metrics)
    print(f"[ftexp] {out_dir.name}{f' ({source})' if source else ''}: {result_row(metrics, cfg.objective)}", flush=True)


def finetune(cfg: DictConfig) -> dict:
    validate(cfg)
    run_dir = resolve_run_dir(cfg)
    if not distributed.is_main():  # torchrun / accelerate: rank 0 owns the folder and says whether to train
        verdict = distributed.agree(None)
        if verdict != "train":
            log.info("rank %d: nothing to train (%s)", distributed.rank(), verdict)
            return {}
        return _finetune(cfg, run_dir)
    told = False  # the other ranks wait for rank 0's verdict: they must get one whatever happens
    try:
        with records.owned(run_dir):  # one live run per folder
            records.check_same_experiment(run_dir, cfg)  # never write over another config's run
            done = records.reusable_metrics(run_dir, cfg)  # finished before: reuse, not redo
            distributed.agree("train" if done is None else "finished before")
            told = True
            return done if done is not None else _finetune(cfg, run_dir)
    except BaseException:
        if not told:
            distributed.agree("refused by rank 0")
        raise


def _finetune(cfg: DictConfig, run_dir: Path) -> dict:
    seed_everything(cfg.train.seed)
    device = modeling.pick_device(cfg.device)
    main = distributed.is_main()  # only rank 0 writes records, the adapter and W&B, and evaluates
    if main:
        records.write_config(cfg, run_dir)
    tracker = records.Tracker(cfg.logger if main else OmegaConf.create({"name": "none"}), cfg, run_dir)
    failed = True
    try:
        # setup: data, tokenizer, task, model, adapters
        pool, train_rows, eval_rows = load_data(cfg)
        with distributed.main_first():  # a base model rank 0 writes is read by the others after it
            base = base_model_path(cfg, pool, run_dir)
        tokenizer = modeling.load_tokenizer(base, cfg.model)
        task = build_task(cfg.task, tokenizer=tokenizer, use_chat_template=cfg.model.use_chat_template)
        check_label_words(task, tokenizer)
        evaluation.check_objective(cfg, task, eval_rows)  # before training, not after
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
        trainer = fit["trainer"]
        model = trainer.model
        out = run_dir / ("adapter" if cfg.lora.enabled else "model")
        sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
        if cfg.train.save_model:
            if sharded:  # every rank hands in its shard; the trainer writes one whole copy
                trainer.save_model(str(out))
            elif main:
                model.save_pretrained(out)
            if main:
                tokenizer.save_pretrained(out)
        if not main:
            failed = False
            return metrics
        if sharded and cfg.eval.enabled:  # rank 0 holds a shard only: evaluate the saved whole
            if not cfg.train.save_model:
                raise ConfigError("FSDP / ZeRO-3 runs are evaluated from the saved model: set train.save_model=true "
                                  "or eval.enabled=false.")
            model, tokenizer = load_trained(cfg, run_dir, device)

        # evaluate
        rows = None
        if cfg.eval.enabled:
            try:
                eval_metrics, rows = evaluation.evaluate(cfg, model, tokenizer, task, eval_rows, pool)
            except Exception:  # keep what training produced; the saved model can be evaluated again
                records.write_metrics(metrics, run_dir, name="train_metrics.json")
                again = f" Re-evaluate it with: python evaluate.py run={run_dir}" if cfg.train.save_model else ""
                log.error("evaluation failed after training; training metrics are in %s.%s",
                          run_dir / "train_metrics.json", again)
                raise
            metrics.update(eval_metrics)
            if cfg.judge.name != "none":
                try:
                    metrics.update(judge.judge_predictions(cfg, task, [dict(r) for r in eval_rows], rows, device))
                except Exception:  # keep the trained model and its evaluation; judge it again later
                    record(cfg, run_dir, tracker, metrics, rows)
                    log.error("judging failed; the run's metrics and predictions are recorded in %s. Judge them "
                              "again with: python evaluate.py run=%s judge=%s ...", run_dir, run_dir, cfg.judge.name)
                    raise

        # record
        record(cfg, run_dir, tracker, metrics, rows)
        failed = False
        return metrics
    finally:
        tracker.finish(failed=failed)


# ----------------------------------------------------------------------------- evaluate-only recipe

# What `evaluate.py run=<dir>` takes from the command line on top of the run's own
# config.yaml: evaluation settings only. Everything that shaped the trained model
# (model, data, task prompt, train, lora, quant) comes from the run.
EVAL_OVERRIDABLE = ("eval", "task.generation", "data.path", "objective", "judge")
# Settings of this invocation, never the trained run's: where results go, the
# device, the tracker.
EVAL_INVOCATION = ("output_dir", "run_name", "device", "logger", "run", "hydra", "cache_dir")


def _under(key: str, roots) -> bool:
    return any(key == root or key.startswith(root + ".") for root in roots)


def command_line_keys() -> list[str]:
    """Config keys (or groups) set on the command line of a Hydra app; [] outside one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    return [o.key_or_group for o in parsed]


def eval_config(cfg: DictConfig, overrides: list[str] | None = None) -> DictConfig:
    """The config an evaluation runs with.

    Without ``run``: ``cfg`` itself (a base model, zero- or k-shot). With
    ``run=<dir>``: the run's saved ``config.yaml``, type-checked against the schema,
    plus the keys in ``overrides`` (default: those given on the command line) copied
    from ``cfg`` when they are evaluation settings (eval.*, task.generation.*,
    data.path, objective); output_dir, run_name, device and logger always come from
    ``cfg``. Any other override is refused: it would describe a different run.
    """
    if not cfg.get("run"):
        return cfg
    from ftexp.config import RunConfig

    trained = Path(str(cfg.run))
    saved_path = trained / "config.yaml"
    if not saved_path.exists():
        raise ConfigError(f"run={cfg.run}: no config.yaml there. Point run= at a directory that train.py wrote.")
    try:
        out = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(saved_path))
    except Exception as err:  # a key the schema no longer has, or a wrong type
        raise ConfigError(f"run={cfg.run}: its config.yaml does not fit this version's schema ({err}).") from err
    keys = command_line_keys() if overrides is None else list(overrides)
    refused = [k for k in keys if not _under(k, EVAL_OVERRIDABLE + EVAL_INVOCATION)]
    if refused:
        raise ConfigError(
            f"run={cfg.run} is evaluated with its own model, data, task and training settings, so "
            f"{', '.join(refused)} cannot be changed. Only {', '.join(k + '.*' if k in ('eval', 'task.generation') else k for k in EVAL_OVERRIDABLE)} "
            "apply; to evaluate another model use evaluate.py without run=."
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


def load_trained(cfg: DictConfig, trained: Path, device: str):
    """(model, tokenizer) of a trained run: base model + adapter/, or model/ for a full fine-tune."""
    if cfg.lora.enabled:
        adapter = trained / "adapter"
        if not (adapter / "adapter_config.json").exists():
            raise ConfigError(f"run={trained}: no adapter/ (was it trained with train.save_model=false?).")
        if cfg.model.name_or_path == "tiny" and not (trained / "base_model" / "config.json").exists():
            raise ConfigError(f"run={trained}: the tiny base model (base_model/) is missing from the run.")
        base = str(trained / "base_model") if cfg.model.name_or_path == "tiny" else base_model_path(cfg, None, trained)
        from peft import PeftModel

        tokenizer = modeling.load_tokenizer(str(adapter), cfg.model)
        model = modeling.load_model(base, cfg.model, cfg.quant, device)
        model = PeftModel.from_pretrained(model, str(adapter))
        return model, tokenizer
    full = trained / "model"
    if not (full / "config.json").exists():
        raise ConfigError(f"run={trained}: no model/ (a full fine-tune saves one unless train.save_model=false).")
    return modeling.load_model(str(full), cfg.model, cfg.quant, device), modeling.load_tokenizer(str(full), cfg.model)


def evaluate_only(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Evaluate without training, top to bottom: setup -> evaluate -> record.

    ``run=<dir>`` re-evaluates a trained run (see ``eval_config``); without it the
    base model is evaluated zero-shot or with ``eval.shots`` examples (the tiny model
    is then untrained). Writes config.yaml, metrics.json and predictions.jsonl to its
    own directory (output_dir, else Hydra's) and returns the metrics.
    """
    cfg = eval_config(cfg, overrides)
    validate(cfg)
    out_dir = resolve_run_dir(cfg)
    trained = Path(str(cfg.run)) if cfg.get("run") else None
    if trained is not None and out_dir.resolve() == trained.resolve():
        raise ConfigError(f"output_dir={cfg.output_dir} is the run being evaluated; its files would be overwritten. "
                          "Give the evaluation a directory of its own.")
    with records.owned(out_dir):  # one live evaluation per folder, never over another config's results
        records.check_same_experiment(out_dir, cfg)
        return _evaluate_only(cfg, out_dir, trained)


def _judge_saved_predictions(cfg: DictConfig, trained: Path, out_dir: Path, eval_rows, device: str, tracker) -> dict:
    """``evaluate.py run=<dir> judge=...``: rate the run's own predictions, without generating them again."""
    rows = [json.loads(line) for line in (trained / "predictions.jsonl").read_text().splitlines() if line.strip()]
    task = build_task(cfg.task)
    evaluation.check_objective(cfg, task, eval_rows)
    saved = records.read_metrics(trained) or {}
    metrics = {k: v for k, v in saved.items() if k.startswith("eval/")}  # the run's own scores, for the row
    metrics.update(judge.judge_predictions(cfg, task, [dict(r) for r in eval_rows], rows, device))
    record(cfg, out_dir, tracker, metrics, rows, f"judged predictions of {trained}")
    return metrics


def _evaluate_only(cfg: DictConfig, out_dir: Path, trained: Path | None) -> dict:
    seed_everything(cfg.train.seed)
    device = modeling.pick_device(cfg.device)
    records.write_config(cfg, out_dir)
    tracker = records.Tracker(cfg.logger, cfg, out_dir)
    failed = True
    try:
        # setup: data, model + tokenizer (trained run or base), task
        pool, _, eval_rows = load_data(cfg)
        if trained is not None and cfg.judge.name != "none" and (trained / "predictions.jsonl").exists():
            metrics = _judge_saved_predictions(cfg, trained, out_dir, eval_rows, device, tracker)
            failed = False
            return metrics
        if trained is not None:
            model, tokenizer = load_trained(cfg, trained, device)
        else:
            base = base_model_path(cfg, pool, out_dir)
            tokenizer = modeling.load_tokenizer(base, cfg.model)
            model = modeling.load_model(base, cfg.model, cfg.quant, device)
        task = build_task(cfg.task, tokenizer=tokenizer, use_chat_template=cfg.model.use_chat_template)
        check_label_words(task, tokenizer)
        evaluation.check_objective(cfg, task, eval_rows)

        # evaluate
        metrics, rows = evaluation.evaluate(cfg, model, tokenizer, task, eval_rows, pool)
        if cfg.judge.name != "none":
            metrics.update(judge.judge_predictions(cfg, task, [dict(r) for r in eval_rows], rows, device))

        # record
        source = f"run {trained}" if trained is not None else f"base {cfg.model.name}, {cfg.eval.shots}-shot"
        record(cfg, out_dir, tracker, metrics, rows, source)
        failed = False
        return metrics
    finally:
        tracker.finish(failed=failed)
