"""The two recipes, each read top to bottom.

``finetune(cfg)`` is what ``train.py`` runs and tests call. Its rooms, in order:
``load_data`` -> ``evaluation.check_objective`` -> ``load_for_training`` (base model,
tokenizer, task, adapters) -> ``train`` -> ``save_trained`` -> ``evaluate_trained`` ->
``Run.record``. It supports LoRA, QLoRA (4-bit and 8-bit) and full fine-tuning of
decoder-only and encoder-decoder models, one process or a torchrun / accelerate launch
(DDP, FSDP, ZeRO-3), evaluation during training, early stopping, a sweep's pruner and
earlier epochs' results from one run (``watch_training``); a finished run is reused and a
killed one resumes.

``evaluate_only(cfg)`` is what ``evaluate.py`` runs: load_data -> check_objective -> the
trained run's or the base model -> evaluate (and judge) -> record.

Both open their run the same way (``Run``) and return the flat metrics dict written to
``metrics.json``.
"""

from __future__ import annotations

import copy
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from datasets import Dataset
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import set_seed

from ftexp import data as data_mod
from ftexp import (architecture, distributed, evaluation, files, identity, judge, memory, modeling, records, sweep,
                   tracker, training)
from ftexp.config import validate
from ftexp.errors import ConfigError
from ftexp.tasks import build_task, corpus

log = logging.getLogger(__name__)


class Run:
    """What both recipes do around their work, on the folder the config names.

    Made from a config, it validates it and resolves the folder. ``owned()`` holds
    the folder: one live run in it, never over another config's results.
    ``started()`` seeds, picks the device, writes config.yaml and opens the tracker,
    and finishes the tracker, as failed unless the body completed. ``record()``
    writes the results. Only the main process (``main``) writes files and logs to W&B.
    """

    def __init__(self, cfg: DictConfig, main: bool = True):
        validate(cfg)
        self.cfg = cfg
        self.dir = records.resolve_run_dir(cfg)
        self.main = main
        self.device = "cpu"
        self.tracker: tracker.Tracker | None = None

    @contextmanager
    def owned(self):
        with records.owned(self.dir):
            identity.check_same_experiment(self.dir, self.cfg)
            yield

    @contextmanager
    def started(self):
        set_seed(self.cfg.train.seed)
        self.device = modeling.pick_device(self.cfg.device)
        if self.main:
            records.write_config(self.cfg, self.dir)
        logger = self.cfg.logger if self.main else OmegaConf.create({"name": "none"})
        self.tracker = tracker.Tracker(logger, self.cfg, self.dir, swept=sweep.swept_values(self.cfg))
        failed = True
        try:
            yield
            failed = False
        finally:
            self.tracker.finish(failed=failed)

    def record(self, metrics: dict, rows: list[dict] | None, source: str = "") -> None:
        """Write predictions and metrics (metrics.json last: it marks the folder finished), log
        them to the tracker, and print the result row."""
        cfg = self.cfg
        if rows is not None:
            records.write_predictions(rows, self.dir)
            self.tracker.table("predictions", rows[: cfg.logger.log_predictions])
        records.write_metrics(metrics, self.dir)
        self.tracker.summary(metrics)
        row = records.result_row(metrics, cfg.objective, cfg.judge.criteria)
        print(f"[ftexp] {self.dir.name}{f' ({source})' if source else ''}: {row}", flush=True)


# ----------------------------------------------------------------------------- setup


class Data(NamedTuple):
    """A run's rows: the whole train split (``pool``: k-shot examples, held-out rows, a tiny tokenizer's
    texts), its first ``train.n`` rows in the seeded order (``train``) and ``eval.n`` eval rows (``eval``)."""
    pool: Dataset
    train: Dataset
    eval: Dataset


def load_data(cfg: DictConfig) -> Data:
    splits = data_mod.load_splits(cfg.data)
    return Data(pool=splits["train"],
                train=data_mod.subset(splits["train"], cfg.train.n, cfg.data.seed, key="train.n"),
                eval=data_mod.subset(splits["eval"], cfg.eval.n, cfg.eval.seed, key="eval.n"))


def load_task(cfg: DictConfig, tokenizer):
    """The run's task on the model's tokenizer, refused before any training or evaluation
    when a label word encodes to nothing."""
    task = build_task(cfg.task, tokenizer=tokenizer, use_chat_template=cfg.model.use_chat_template)
    task.check_tokenizer(tokenizer)
    return task


def watch_training(run: Run, model, tokenizer, task, pool, eval_rows, setup_metrics: dict) -> dict:
    """``training.train``'s watchers: the held-out rows scored every ``train.eval_every`` (their objective
    reported to the sweep's pruner, if it has one) and the writer of ``epoch_results``."""
    cfg, out = run.cfg, {}
    if cfg.train.eval_every is not None:
        dev = data_mod.held_out(pool, cfg.train.eval_n, cfg.data.seed, train_n=cfg.train.n, key="train.eval_n")
        out["dev_records"] = dev
        out["dev_eval"] = lambda m: evaluation.evaluate(cfg, m, tokenizer, task, dev, pool)[0]
        reporter = sweep.trial_reporter()
        if reporter is not None and distributed.world_size() > 1:
            log.warning("The sweep's pruner is not consulted under %d processes (every rank would have to stop "
                        "together): this trial runs to its end.", distributed.world_size())
            reporter = None
        if reporter is not None:
            def pruned(step, epoch, value):
                records.write_pruned(run.dir, step, epoch, cfg.objective, value,
                                     f"{reporter.pruner_name}: held-out {cfg.objective} {value:.4g} at step {step}")
                training.remove_checkpoints(run.dir, keep=cfg.train.keep_checkpoints)  # a pruned cell never resumes
            out["callbacks"] = [training.IntermediateReport(cfg.objective, reporter, pruned)]
    if cfg.epoch_results.epochs:
        writer = EpochResultWriter(run, model, tokenizer, task, pool, eval_rows, setup_metrics)
        out["epoch_results"] = (writer.pending, writer)
    return out


class EpochResultWriter:
    """Writes, at the end of epoch k of a longer run, the folder a k-epoch run would have made:
    config.yaml (train.epochs=k), train_log.jsonl up to that step, the adapter or model, predictions
    and metrics.json (last). A folder that already holds those results (a resumed run) is left as it
    is; one that holds another experiment is refused before training."""

    def __init__(self, run: Run, model, tokenizer, task, pool, eval_rows, setup_metrics: dict):
        cfg = run.cfg
        if distributed.world_size() > 1:
            raise ConfigError("epoch_results runs in one process: its evaluations at earlier epochs are not spread "
                              "over ranks. Run the cells separately under torchrun.")
        self.run, self.model, self.tokenizer, self.task = run, model, tokenizer, task
        self.pool, self.eval_rows, self.setup_metrics = pool, eval_rows, setup_metrics
        dirs = cfg.epoch_results.dirs or [run.dir / f"epochs={k}" for k in cfg.epoch_results.epochs]
        self.dirs = {int(k): Path(str(d)) for k, d in zip(cfg.epoch_results.epochs, dirs)}
        self.pending = []
        for epoch, folder in self.dirs.items():
            shorter = self.config(epoch)
            identity.check_same_experiment(folder, shorter)
            if identity.reusable_metrics(folder, shorter) is None:
                self.pending.append(epoch)

    def config(self, epoch: int) -> DictConfig:
        """The config of a run of ``epoch`` epochs that writes into its own folder."""
        cfg = copy.deepcopy(self.run.cfg)
        with open_dict(cfg):
            cfg.train.epochs = float(epoch)
            cfg.epoch_results.epochs, cfg.epoch_results.dirs = None, None
            cfg.output_dir = str(self.dirs[epoch])
            cfg.run_name = self.dirs[epoch].name
        return cfg

    def __call__(self, epoch: int, state, train_metrics: dict) -> None:
        cfg, folder = self.config(epoch), self.dirs[epoch]
        folder.mkdir(parents=True, exist_ok=True)
        records.write_config(cfg, folder)
        every, step = cfg.train.eval_every, state.global_step
        logged = training.read_log(self.run.dir / "train_log.jsonl")
        files.atomic_write(folder / "train_log.jsonl",
                             "".join(json.dumps(row) + "\n" for row in training.rows_until(logged, step, every)))
        if cfg.train.save_model:
            out = folder / ("adapter" if cfg.lora.enabled else "model")
            self.model.save_pretrained(out)
            self.tokenizer.save_pretrained(out)
        metrics = {**self.setup_metrics, **train_metrics, "train/epoch_results_of": self.run.dir.name}
        if cfg.train.eval_every is not None:
            metrics.update(training.dev_summary(cfg, state, training.rows_until(state.log_history, step, every)))
        rows = None
        if cfg.eval.enabled:
            was_training = self.model.training
            found, rows = evaluation.evaluate(cfg, self.model, self.tokenizer, self.task, self.eval_rows, self.pool)
            metrics.update(found)
            if cfg.judge.name != "none":
                metrics.update(judge.judge_predictions(cfg, self.task, [dict(r) for r in self.eval_rows], rows,
                                                       self.run.device))
            self.model.train(was_training)
        if rows is not None:
            records.write_predictions(rows, folder)
        records.write_metrics(metrics, folder)
        print(f"[ftexp] {folder.name} (epoch {epoch} of {self.run.dir.name}): "
              f"{records.result_row(metrics, cfg.objective, cfg.judge.criteria)}", flush=True)


# ----------------------------------------------------------------------------- fine-tune recipe


def finetune(cfg: DictConfig) -> dict:
    run = Run(cfg, main=distributed.is_main())
    if not run.main:  # torchrun / accelerate: rank 0 owns the folder and says whether to train
        verdict = distributed.agree(None)
        if verdict != "train":
            log.info("rank %d: nothing to train (%s)", distributed.rank(), verdict)
            return {}
        return _finetune(run)
    told = False  # the other ranks wait for rank 0's verdict: they must get one whatever happens
    try:
        with run.owned():
            done = identity.reusable_metrics(run.dir, cfg)  # finished before: reuse, not redo
            distributed.agree("train" if done is None else "finished before")
            told = True
            return done if done is not None else _finetune(run)
    except BaseException:
        if not told:
            distributed.agree("refused by rank 0")
        raise


def _finetune(run: Run) -> dict:
    """The recipe's rooms, in order: data -> model -> train -> save -> evaluate -> record."""
    cfg = run.cfg
    data = load_data(cfg)
    evaluation.check_objective(cfg, data.eval)  # the one check, before the folder gets config.yaml or a model loads
    with run.started():
        model, tokenizer, task, metrics = load_for_training(run, data)
        trainer = train(run, model, tokenizer, task, data, metrics)
        model, tokenizer = save_trained(run, trainer, tokenizer)
        if not run.main:  # other ranks of a torchrun neither evaluate nor record
            return metrics
        rows = evaluate_trained(run, model, tokenizer, task, data, metrics)
        run.record(metrics, rows)
        return metrics


def load_for_training(run: Run, data: Data) -> tuple:
    """(model with its adapters, tokenizer, task, the setup's metrics): the base model (built, converted
    or as given), refused when the device is too small for its weights, then LoRA / QLoRA adapters."""
    cfg = run.cfg
    with distributed.main_first():  # a base model rank 0 writes is read by the others after it
        base = modeling.base_model_path(cfg, run.dir, lambda: corpus(cfg, data.pool))
    tokenizer = modeling.load_tokenizer(base, cfg.model)
    task = load_task(cfg, tokenizer)
    metrics = memory.check(cfg.model, cfg.quant, base, run.device)  # refuses a GPU too small
    model = modeling.load_model(base, cfg.model, cfg.quant, run.device)
    metrics["model/weight_memory_mb"] = memory.measured_mb(model)
    # Seeded again: loading may draw random numbers (a GGUF file is dequantized into a randomly initialised
    # model, but not when it is read from the cache), and the adapters' initial weights must not depend on it.
    set_seed(cfg.train.seed)
    model = modeling.attach_adapters(model, cfg.lora, cfg.quant, cfg.train.gradient_checkpointing)
    trainable, total = architecture.count_parameters(model)
    log.info("trainable params: %s || all params: %s || trainable%%: %.4f", f"{trainable:,}", f"{total:,}",
             100 * trainable / total)
    metrics.update({"train/trainable_params": trainable, "train/total_params": total,
                    "train/trainable_pct": 100 * trainable / total})
    return model, tokenizer, task, metrics


def train(run: Run, model, tokenizer, task, data: Data, metrics: dict):
    """Fit the model on the train rows (``training.train``), watched by evaluations on held-out rows and,
    where asked, writing earlier epochs' results; adds the train/* metrics and returns the trainer."""
    cfg = run.cfg
    watchers = watch_training(run, model, tokenizer, task, data.pool, data.eval, metrics)
    fit = training.train(cfg, model, tokenizer, task.to_records(data.train), run.dir, run.device,
                         run.tracker.report_to, **watchers)
    metrics.update(fit["metrics"])
    return fit["trainer"]


def save_trained(run: Run, trainer, tokenizer) -> tuple:
    """Save the adapter (or the fine-tuned model) with its tokenizer into the run's folder; return the
    (model, tokenizer) to evaluate: the trained one, or under FSDP / ZeRO-3 the saved whole reloaded."""
    cfg, model = run.cfg, trainer.model
    out = run.dir / ("adapter" if cfg.lora.enabled else "model")
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if cfg.train.save_model:
        if sharded:  # every rank hands in its shard; the trainer writes one whole copy
            trainer.save_model(str(out))
        elif run.main:
            model.save_pretrained(out)
        if run.main:
            tokenizer.save_pretrained(out)
            run.tracker.artifact(out, "adapter" if cfg.lora.enabled else "model")
    if run.main and sharded and cfg.eval.enabled:  # rank 0 holds a shard only: evaluate the saved whole
        if not cfg.train.save_model:
            raise ConfigError("FSDP / ZeRO-3 runs are evaluated from the saved model: set train.save_model=true "
                              "or eval.enabled=false.")
        return modeling.load_trained(cfg, run.dir, run.device)
    return model, tokenizer


def evaluate_trained(run: Run, model, tokenizer, task, data: Data, metrics: dict) -> list[dict] | None:
    """Score the trained model on the eval rows (and judge its outputs, with a judge); adds the eval/*
    and judge/* metrics and returns the prediction rows. A failure keeps what was made before it:
    the training metrics (train_metrics.json), or the evaluation (recorded before judging fails)."""
    cfg = run.cfg
    if not cfg.eval.enabled:
        return None
    memory.reset_peak(run.device)  # eval/peak_memory_mb: this phase's own
    try:
        # training is over: the weights may change; under mixed precision the trainer's autocast stays on the forward
        with modeling.merged_adapter(model, cfg.eval.merge_adapter, autocast=cfg.train.bf16 or cfg.train.fp16):
            found, rows = evaluation.evaluate(cfg, model, tokenizer, task, data.eval, data.pool)
        found["eval/peak_memory_mb"] = memory.peak_mb(run.device)
    except Exception:  # keep what training produced; the saved model can be evaluated again
        records.write_metrics(metrics, run.dir, name="train_metrics.json")
        again = f" Re-evaluate it with: python evaluate.py run={run.dir}" if cfg.train.save_model else ""
        log.error("evaluation failed after training; training metrics are in %s.%s",
                  run.dir / "train_metrics.json", again)
        raise
    metrics.update(found)
    if cfg.judge.name != "none":
        try:
            metrics.update(judge.judge_predictions(cfg, task, [dict(r) for r in data.eval], rows, run.device))
        except Exception:  # keep the trained model and its evaluation; judge it again later
            run.record(metrics, rows)
            log.error("judging failed; the run's metrics and predictions are recorded in %s. Judge them "
                      "again with: python evaluate.py run=%s judge=%s ...", run.dir, run.dir, cfg.judge.name)
            raise
    return rows


# ----------------------------------------------------------------------------- evaluate-only recipe


def evaluate_only(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Evaluate without training, top to bottom: setup -> evaluate -> record.

    ``run=<dir>`` re-evaluates a trained run (see ``evaluation.eval_config``), with the
    evaluation settings named in ``overrides`` (evaluate.py passes its command line's); without
    it the base model is evaluated zero-shot or with ``eval.shots`` examples (the tiny
    model is then untrained). Writes config.yaml, metrics.json and predictions.jsonl
    to its own directory (output_dir, else Hydra's) and returns the metrics.
    """
    run = Run(evaluation.eval_config(cfg, overrides))
    cfg = run.cfg
    trained = Path(str(cfg.run)) if cfg.get("run") else None
    if trained is not None and run.dir.resolve() == trained.resolve():
        raise ConfigError(f"output_dir={cfg.output_dir} is the run being evaluated; its files would be overwritten. "
                          "Give the evaluation a directory of its own.")
    with run.owned():
        pool, _, eval_rows = load_data(cfg)
        evaluation.check_objective(cfg, eval_rows)  # the one check, before the folder gets config.yaml
        with run.started():
            return _evaluate(run, trained, pool, eval_rows)


def _evaluate(run: Run, trained: Path | None, pool, eval_rows) -> dict:
    """evaluate_only's body: the model + tokenizer (trained run or base), task -> evaluate -> record."""
    cfg = run.cfg
    if trained is not None and cfg.judge.name != "none" and (trained / "predictions.jsonl").exists():
        return _judge_saved_predictions(run, trained, eval_rows)
    if trained is not None:
        model, tokenizer = modeling.load_trained(cfg, trained, run.device)
    else:
        base = modeling.base_model_path(cfg, run.dir, lambda: corpus(cfg, pool))
        tokenizer = modeling.load_tokenizer(base, cfg.model)
        model = modeling.load_model(base, cfg.model, cfg.quant, run.device)
    task = load_task(cfg, tokenizer)

    # evaluate
    memory.reset_peak(run.device)
    with modeling.merged_adapter(model, cfg.eval.merge_adapter):
        metrics, rows = evaluation.evaluate(cfg, model, tokenizer, task, eval_rows, pool)
    metrics["eval/peak_memory_mb"] = memory.peak_mb(run.device)
    if cfg.judge.name != "none":
        metrics.update(judge.judge_predictions(cfg, task, [dict(r) for r in eval_rows], rows, run.device))

    # record
    source = f"run {trained}" if trained is not None else f"base {cfg.model.name}, {cfg.eval.shots}-shot"
    run.record(metrics, rows, source)
    return metrics


def _judge_saved_predictions(run: Run, trained: Path, eval_rows) -> dict:
    """``evaluate.py run=<dir> judge=...``: rate the run's own predictions, without generating them again."""
    cfg = run.cfg
    rows = [json.loads(line) for line in (trained / "predictions.jsonl").read_text().splitlines() if line.strip()]
    task = build_task(cfg.task)
    saved = records.read_metrics(trained) or {}
    metrics = {k: v for k, v in saved.items() if k.startswith("eval/")}  # the run's own scores, for the row
    metrics.update(judge.judge_predictions(cfg, task, [dict(r) for r in eval_rows], rows, run.device))
    run.record(metrics, rows, f"judged predictions of {trained}")
    return metrics
