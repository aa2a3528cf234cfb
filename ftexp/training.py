"""Trainer construction and the training loop's bookkeeping.

Decoder-only models train with TRL's SFTTrainer on prompt/completion records, so
the loss covers completion tokens only. The rows come prepared (``sft_rows``: labels
-100 off the completion, cut to ``train.max_length``, packed with ``train.packing``;
``ftexp.rows``), and TRL's collator pads each batch to its own longest
row; batches group rows of similar length (``train.group_by_length``), so little is
padded. The output head runs only at positions whose next token is a label
(ftexp/loss.py). Encoder-decoder models train with transformers' Seq2SeqTrainer: the prompt
feeds the encoder and the completion is the labels.

Every run reports its throughput (ftexp/throughput.py): real tokens per second, the
share of padding, FLOPs per token and MFU; and ``data/prep_s``, the seconds spent
preparing the training rows.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from transformers import DataCollatorWithFlattening, EarlyStoppingCallback, PrinterCallback, TrainerCallback

from ftexp import allocator, distributed, loss, memory, throughput
from ftexp import rows as training_rows  # "rows" names local variables here
from ftexp.errors import ConfigError
from ftexp.tasks import metric_direction

log = logging.getLogger(__name__)


class TrainingDiverged(ConfigError):
    """The loss or the gradient norm went NaN or infinite: nothing after that step can learn."""


class LossLog(TrainerCallback):
    """Append every logging step's record to ``train_log.jsonl`` and keep the losses.

    A run resumed from the checkpoint of step ``resume_step`` keeps the records up to
    that step (what the killed run logged after it is redone) and goes on appending.
    """

    def __init__(self, path: Path, on_log=None, resume_step: int = 0):
        self.path = path
        self.losses: list[float] = []
        self.steps: list[int] = []
        self.on_log_fn = on_log
        kept = []
        if resume_step and path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the kill
                    continue
                if row.get("step", 0) <= resume_step:
                    kept.append(line)
                    if "loss" in row:
                        self.losses.append(float(row["loss"]))
                        self.steps.append(int(row["step"]))
        if distributed.is_main():
            path.write_text("".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and any(k.startswith("eval_") for k in logs) and state.is_world_process_zero:
            self.write({"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs})
        if not logs or "loss" not in logs:
            return
        if state.is_world_process_zero:
            self.record(args, state, logs)
        # Checked on every rank (the logged loss and norm are the same on all of them), so under
        # torchrun all ranks stop together instead of the others waiting on rank 0. fp16's loss
        # scaler meets an infinite gradient norm on purpose (it skips that step and lowers the
        # scale), so only the loss is watched there.
        watched = ("loss",) if args.fp16 else ("loss", "grad_norm")
        bad = {k: logs[k] for k in watched if logs.get(k) is not None and not math.isfinite(float(logs[k]))}
        if bad:  # stop at once: every later step would train on NaN weights and still exit 0
            raise TrainingDiverged(
                f"training diverged at step {state.global_step} (epoch {state.epoch or 0:.2f}): "
                + ", ".join(f"{k} {v}" for k, v in bad.items())
                + f" at learning rate {logs.get('learning_rate', args.learning_rate):.3g} "
                f"(train.learning_rate={args.learning_rate:g}). Lower train.learning_rate (or warm up to it with "
                f"train.warmup_steps); the steps logged so far are in {self.path}.")

    def write(self, row: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        return read_log(self.path)

    def keep(self, rows: list[dict]) -> None:
        """Rewrite the log with ``rows`` only."""
        self.path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def metrics(self) -> dict:
        """The first and last logged loss and the mean loss per step: each logged loss is the mean of
        the steps since the one before, so it counts for that many steps."""
        if not self.losses:
            return {}
        spans = np.diff([0, *self.steps])
        return {"train/loss_first": self.losses[0], "train/loss_last": self.losses[-1],
                "train/loss_mean": float(np.dot(self.losses, spans) / max(spans.sum(), 1))}

    def record(self, args, state, logs):
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        self.losses.append(float(logs["loss"]))
        self.steps.append(int(state.global_step))
        self.write(row)
        if self.on_log_fn:
            self.on_log_fn(row)
        if state.global_step == 1 or state.global_step % (args.logging_steps * 10) == 0 or state.global_step == state.max_steps:
            log.info("step %d/%d  epoch %.2f  loss %.4f", state.global_step, state.max_steps, state.epoch or 0, logs["loss"])


def read_log(path: Path) -> list[dict]:
    """The rows of a train_log.jsonl."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def epoch_ended(state) -> int | None:
    """The epoch the step just taken ended (its last optimizer step), else None."""
    epoch = state.epoch or 0.0
    return round(epoch) if epoch > 0 and abs(epoch - round(epoch)) < 1e-9 else None


class EpochEndsLogged(TrainerCallback):
    """Log the last step of every epoch and of the run, besides every ``logging_steps``: the train log
    then has each epoch's loss, ``train/loss_last`` is the loss where training ended, and the first k
    epochs of a longer run log exactly what a k-epoch run logs (``EpochResults``)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps or epoch_ended(state) is not None:
            control.should_log = True


@contextlib.contextmanager
def rng_untouched():
    """Run a block without moving any random number generator training reads (torch's on every
    device, numpy's, Python's): evaluation in the middle of a run then leaves the rest of the run
    (dropout masks, sampling) exactly as it would have been without it."""
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def dev_key(objective: str) -> str:
    """The log key of ``objective`` (eval/accuracy) scored on the held-out rows: eval_dev_accuracy."""
    return "eval_dev_" + str(objective).split("/", 1)[1]


class DevEvaluation:
    """Trainer mixin: ``evaluate()`` scores held-out rows with the task's own metric.

    The Trainer calls ``evaluate`` on its own schedule (``eval_strategy`` / ``eval_steps``, from
    ``train.eval_every``); here it runs ``dev_eval(model)`` (ftexp's generation or label likelihood,
    returning ``eval/*`` metrics) instead of the Trainer's loss loop, logs the numbers as
    ``eval_dev_<name>`` (train_log.jsonl; ``eval/dev_<name>`` in W&B, apart from the final
    evaluation's ``eval/<name>``) and hands them to the callbacks' ``on_evaluate``, which
    is where transformers' EarlyStoppingCallback and the sweep's pruning report read them. Its
    seconds are kept apart (``eval_seconds``) so training throughput leaves them out.
    """

    dev_eval = None
    eval_seconds = 0.0

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        if self.dev_eval is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        start = time.perf_counter()
        was_training = self.model.training
        with rng_untouched():
            found = self.dev_eval(self.model)
        self.model.train(was_training)
        took = time.perf_counter() - start
        self.eval_seconds += took
        metrics = {f"{metric_key_prefix}_dev_{k.split('/', 1)[1]}": float(v) for k, v in found.items()
                   if k.startswith("eval/") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics[f"{metric_key_prefix}_runtime"] = took
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


@functools.cache
def with_dev_evaluation(trainer_class: type) -> type:
    """``trainer_class`` with ``DevEvaluation``'s evaluate."""
    return type(trainer_class.__name__, (DevEvaluation, trainer_class), {})


def trainer_class(base: type) -> type:
    """A decoder-only trainer: ``base`` with the completion loss (ftexp/loss.py) and ``DevEvaluation``."""
    return loss.with_completion_loss(with_dev_evaluation(base))


class IntermediateReport(TrainerCallback):
    """Hand each evaluation's objective to a sweep's trial (``report(value, step) -> prune?``) and stop
    a trial its pruner gives up on: ``on_pruned(step, epoch, value)`` records it, then it raises."""

    def __init__(self, objective: str, reporter, on_pruned):
        self.key = dev_key(objective)
        self.reporter, self.on_pruned = reporter, on_pruned

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or self.key not in metrics:
            return
        value = float(metrics[self.key])
        if self.reporter.report(value, state.global_step):
            self.on_pruned(state.global_step, round(state.epoch or 0.0, 4), value)
            raise self.reporter.pruned(state.global_step, value)


class EpochResults(TrainerCallback):
    """At the end of each epoch in ``epochs``, ``write(epoch, state)`` writes the results a run of
    that many epochs would have made.

    The end of an epoch is its last optimizer step (``on_step_end``, state.epoch a whole number),
    which is logged (``EpochEndsLogged``) and, with evaluation during training, evaluated (a run
    that ends there evaluates at its last step). The results are written once that step's log row
    and evaluation are in the train log, as the shorter run would have had both, and before a checkpoint
    of that step is saved, so a run resumed from it finds them written. ``write`` runs without moving
    any random number generator (``rng_untouched``); its seconds are kept in ``seconds``.
    """

    def __init__(self, epochs, write):
        self.pending, self.write, self.seconds = sorted(epochs), write, 0.0
        self.due: int | None = None
        self.after = "log"  # the event after which the due epoch is written: "log" or "evaluate"
        self.save_after = False  # a checkpoint of the due step, held back until the results are written

    def on_step_end(self, args, state, control, **kwargs):
        passed = [k for k in self.pending if (state.epoch or 0.0) - k > 1e-9]
        if passed:  # resumed from a checkpoint beyond them: they can no longer be written
            log.warning("epoch_results: the results of epoch(s) %s cannot be written, the run resumed past them; "
                        "a run of that many epochs gives them.", passed)
            self.pending = [k for k in self.pending if k not in passed]
        epoch = epoch_ended(state)
        if epoch in self.pending:
            self.due = epoch
            if args.eval_strategy == "steps":  # a run that ends here evaluates at its last step: so does this one
                control.should_evaluate = True
            self.after = "log" if args.eval_strategy == "no" else "evaluate"
            if self.after == "evaluate" and control.should_save:
                # with eval_every=epoch the evaluation comes after this step's checkpoint: a kill in between
                # would resume past the epoch without its results, so the checkpoint waits for them
                control.should_save, self.save_after = False, True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.after == "log" and logs and "loss" in logs:
            self._write(state, control)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.after == "evaluate":
            self._write(state, control)

    def _write(self, state, control) -> None:
        if self.due is None:
            return
        epoch, self.due = self.due, None
        self.pending.remove(epoch)
        start = time.perf_counter()
        with rng_untouched():
            self.write(epoch, state)
        self.seconds += time.perf_counter() - start
        if self.save_after:
            control.should_save, self.save_after = True, False


def evaluation_args(cfg) -> dict:
    """The Trainer's evaluation schedule from ``train.eval_every``, and with early stopping the metric
    it watches (the objective, in its own direction) and the best checkpoint restored at the end:
    checkpoints are then saved at every evaluation, as ``load_best_model_at_end`` requires."""
    t = cfg.train
    if t.eval_every is None:
        return {"eval_strategy": "no"}
    steps = {} if t.eval_every == "epoch" else {"eval_steps": int(t.eval_every)}
    args = {"eval_strategy": "epoch" if t.eval_every == "epoch" else "steps", **steps}
    if t.early_stopping.patience is not None:
        args.update(metric_for_best_model=dev_key(cfg.objective)[len("eval_"):],
                    restore_callback_states_from_checkpoint=True,  # a resumed run keeps its patience count
                    greater_is_better=metric_direction(str(cfg.objective), str(cfg.task.kind)) == "maximize",
                    load_best_model_at_end=True, save_strategy=args["eval_strategy"], save_steps=steps.get(
                        "eval_steps", 500), save_total_limit=max(int(t.save_total_limit), 2))
    return args


# A CPU's matmuls run near their peak on a few hundred rows, and the activations of a whole batch
# (16 SST-2 rows with SmolLM2: ~4 GB, faulted in afresh at the first step) cost more than the
# passes saved. 4-row micro-batches: the preset n=100 run's MFU 0.47 -> 0.57, peak 5.2 -> 2.3 GB.
CPU_MICRO_BATCH = 4


def micro_batch_size(t, device: str) -> int:
    """Rows per forward/backward pass: ``train.micro_batch_size``, else the whole batch on a GPU and
    the largest divisor of the batch up to ``CPU_MICRO_BATCH`` on a CPU."""
    if t.get("micro_batch_size") is not None:
        return int(t.micro_batch_size)
    if device != "cpu":
        return int(t.batch_size)
    return max(d for d in range(1, min(CPU_MICRO_BATCH, t.batch_size) + 1) if t.batch_size % d == 0)


# train.* settings that TrainingArguments takes under the same name
SAME_NAMED = ("learning_rate", "warmup_steps", "weight_decay", "max_grad_norm", "seed", "bf16", "fp16",
              "logging_steps", "save_total_limit")


def common_args(cfg, out_dir: Path, device: str, report_to: list[str]) -> dict:
    t = cfg.train
    micro = micro_batch_size(t, device)
    return dict(
        output_dir=str(out_dir),
        # train.batch_size rows a step as micro-batches: the length-grouped sampler groups in units
        # of per-device batch x accumulation, so a step trains the same rows whatever the split
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=t.grad_accum * (t.batch_size // micro),
        num_train_epochs=float(t.epochs or 1.0),
        max_steps=t.max_steps if t.max_steps else -1,
        lr_scheduler_type=t.scheduler,
        optim=t.optimizer,
        data_seed=t.seed,
        activation_checkpointing=t.gradient_checkpointing,
        logging_first_step=True,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        report_to=report_to,
        run_name=cfg.run_name,
        use_cpu=device == "cpu",
        train_sampling_strategy=sampling_strategy(t),
        include_num_input_tokens_seen="no",  # throughput.TokenCounter is the run's one count
        disable_tqdm=True,
        dataloader_pin_memory=device == "cuda",
        **{key: t[key] for key in SAME_NAMED},
    ) | evaluation_args(cfg)


def sampling_strategy(t) -> str:
    """Batches of rows of similar length (train.group_by_length), so that padding each batch to
    its longest row pads little. Packed and padding-free batches hold no padding: plain shuffling.

    transformers' LengthGroupedSampler shuffles, then sorts within megabatches of
    min(50, rows // (4 x batch_size)) batches: an epoch of fewer than 8 batches is not grouped.
    """
    if t.group_by_length and not (t.get("packing") or t.get("padding_free")):
        return "group_by_length"
    return "random"


def _took(timings: dict | None, start: float) -> None:
    if timings is not None:
        timings["data/prep_s"] = time.perf_counter() - start


def sft_rows(cfg, tokenizer, train_records):
    """Trainer-ready rows for decoder-only training.

    What SFTTrainer's own dataset preparation makes of prompt/completion rows, done by ftexp
    (``ftexp.rows``, which keeps the labels too): labels are -100 off the completion, rows are
    cut to ``train.max_length`` (keep_start drops the tail, keep_end the head) and rows
    left without a label are dropped. With ``train.packing`` the rows are then packed
    best-fit-decreasing into rows of at most ``train.max_length`` tokens (TRL's
    ``pack_dataset``, strategy "bfd"); ``seq_lengths`` keeps each packed row's boundaries.
    """
    rows = training_rows.tokenize(train_records, tokenizer)
    t = cfg.train
    rows = truncate_rows(rows, t.max_length, t.truncation)
    if len(rows) == 0:
        raise ConfigError(f"train.max_length={t.max_length} with train.truncation={t.truncation} cuts the answer off "
                          "every training row: nothing is left to learn. Raise train.max_length, or use "
                          "train.truncation=keep_end to cut prompts from the left.")
    if t.get("packing"):
        from trl import pack_dataset

        return pack_dataset(rows.select_columns(["input_ids", "labels"]), t.max_length, "bfd")
    return rows.select_columns(["input_ids", "labels", "length"])


def build_sft_trainer(cfg, model, tokenizer, train_records, out_dir: Path, device: str, report_to, callbacks,
                      timings: dict | None = None, eval_data=None):
    """TRL's SFTTrainer on the prepared rows; ``timings["data/prep_s"]`` gets the preparation's seconds."""
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    train_data = sft_rows(cfg, tokenizer, train_records)
    _took(timings, start)
    log.info("train rows: %d", len(train_data))
    t = cfg.train
    args = SFTConfig(
        **common_args(cfg, out_dir, device, report_to),
        completion_only_loss=True,
        # the rows come prepared (sft_rows): TRL's own preparation would do the same work again
        dataset_kwargs={"skip_prepare_dataset": True},
        # keep "length" for the length-grouped sampler; TRL's collator reads only input_ids, labels, seq_lengths
        remove_unused_columns=False,
        packing=t.packing,
        packing_strategy="bfd",
        padding_free=t.padding_free,
        # rows are cut already; TRL refuses a max_length it does not apply (padding-free without packing)
        max_length=None if t.padding_free and not t.packing else t.max_length,
    )
    trainer = trainer_class(SFTTrainer)(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
                                        processing_class=tokenizer, callbacks=callbacks)
    trainer.head_positions_only = loss.runs_on(model, device, head_adapter=False)
    return trainer


def truncate_rows(data, max_length: int, truncation: str):
    """Cut rows longer than ``max_length`` (keep_start drops the tail, keep_end the head, as TRL's
    truncation_mode does), ids, masks and labels together, then drop the rows left without a label."""
    if max(data["length"], default=0) > max_length:
        cut = slice(None, max_length) if truncation == "keep_start" else slice(-max_length, None)
        columns = [c for c in ("input_ids", "completion_mask", "labels") if c in data.column_names]

        def shorten(batch):
            out = {c: [row[cut] for row in batch[c]] for c in columns}
            return {**out, "length": [len(ids) for ids in out["input_ids"]]}

        data = data.map(shorten, batched=True)
    return with_a_label(data)


def with_a_label(data):
    """``data`` without its rows that have no label (SFTTrainer drops them: they teach nothing).
    Read as one Arrow column, so a cached dataset is checked in milliseconds."""
    import numpy as np
    import pyarrow.compute as pc

    labels = data.with_format("arrow")["labels"].combine_chunks()
    rows = np.asarray(pc.list_parent_indices(labels))
    learned = np.asarray(pc.list_flatten(labels)) != -100
    keep = np.zeros(len(data), dtype=bool)
    keep[rows[learned]] = True
    return data if keep.all() else data.select(np.flatnonzero(keep))


def tokenize_seq2seq(records, tokenizer, max_length: int, truncation: str):
    """Encoder-decoder features: the prompt is the encoder input, the completion the labels.

    Only the completion is learned: ``labels`` hold the completion's tokens (the
    tokenizer closes them with EOS) and nothing of the prompt; the collator pads
    them with -100. ``truncation=keep_end`` cuts long prompts from the left, so the
    instruction at the end of a prompt survives; labels are cut from the right.
    """
    saved = tokenizer.truncation_side

    def encode(batch):
        try:
            tokenizer.truncation_side = "left" if truncation == "keep_end" else "right"
            enc = tokenizer(batch["prompt"], truncation=True, max_length=max_length)
            tokenizer.truncation_side = "right"
            targets = [c.strip() for c in batch["completion"]]  # the decoder needs no separating space
            enc["labels"] = tokenizer(text_target=targets, truncation=True, max_length=max_length)["input_ids"]
        finally:
            tokenizer.truncation_side = saved
        return enc

    return records.map(encode, batched=True, remove_columns=records.column_names)


def build_seq2seq_trainer(cfg, model, tokenizer, train_records, out_dir: Path, device: str, report_to, callbacks,
                          timings: dict | None = None, eval_data=None):
    """transformers' Seq2SeqTrainer (TRL's SFTTrainer is decoder-only) on prompt -> completion pairs."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    args = Seq2SeqTrainingArguments(**common_args(cfg, out_dir, device, report_to), remove_unused_columns=False,
                                    label_names=["labels"])
    start = time.perf_counter()
    data = tokenize_seq2seq(train_records, tokenizer, cfg.train.max_length, cfg.train.truncation)
    _took(timings, start)
    # With the model, the collator also builds decoder_input_ids (labels shifted right).
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    return with_dev_evaluation(Seq2SeqTrainer)(model=model, args=args, train_dataset=data, eval_dataset=eval_data,
                                               data_collator=collator, processing_class=tokenizer, callbacks=callbacks)


def head_has_adapter(model) -> bool:
    """True when the output head (lm_head) carries a LoRA adapter (lora.include_lm_head)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return isinstance(head, BaseTunerLayer)


def completion_collator(pad_token_id: int, padding_free: bool = False):
    """Batches of prepared rows (``sft_rows``: input_ids and labels, -100 off the completion) for
    transformers' Trainer: right-padded with ``pad_token_id``, labels with -100, and an attention
    mask; or, ``padding_free``, laid end to end with position ids (transformers'
    ``DataCollatorWithFlattening``). The other columns (length, completion_mask) are left out."""
    if padding_free:
        flatten = DataCollatorWithFlattening(return_position_ids=True)
        return lambda rows: flatten([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])

    def collate(rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        pad = [width - len(r["input_ids"]) for r in rows]
        return {
            "input_ids": torch.tensor([list(r["input_ids"]) + [pad_token_id] * k for r, k in zip(rows, pad)]),
            "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * k for r, k in zip(rows, pad)]),
            "labels": torch.tensor([list(r["labels"]) + [-100] * k for r, k in zip(rows, pad)]),
        }

    return collate


def build_head_adapter_trainer(cfg, model, tokenizer, train_records, out_dir: Path, device: str, report_to,
                               callbacks, timings: dict | None = None, eval_data=None):
    """Decoder-only training when lm_head carries a LoRA adapter (the CommonLit study's setup).

    TRL's SFTTrainer refuses such a model: its loss reads log-probabilities straight
    from ``lm_head.weight``, so an adapter there would never train. transformers'
    Trainer computes the loss through the model's own head instead (at labelled
    positions only, ftexp.loss), on the same prepared rows (``sft_rows``) with
    ``completion_collator``.
    """
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(**common_args(cfg, out_dir, device, report_to), remove_unused_columns=False,
                             label_names=["labels"])
    start = time.perf_counter()
    data = sft_rows(cfg, tokenizer, train_records)  # the rows SFTTrainer gets
    _took(timings, start)
    collator = completion_collator(tokenizer.pad_token_id, padding_free=bool(cfg.train.packing or cfg.train.padding_free))
    trainer = trainer_class(Trainer)(model=model, args=args, train_dataset=data, eval_dataset=eval_data,
                                     data_collator=collator, processing_class=tokenizer, callbacks=callbacks)
    trainer.head_positions_only = loss.runs_on(model, device, head_adapter=True)
    return trainer


CHECKPOINTS = "checkpoints"


def unreadable_files(checkpoint: Path) -> list[str]:
    """The files of ``checkpoint`` that would not load, read cheaply: a safetensors file whose header does
    not parse, a torch file (a zip archive) whose directory is missing, a JSON file that does not parse.
    A write cut short, a full disk or an emptied file shows in all three."""
    from safetensors import safe_open

    bad = []
    for path in sorted(checkpoint.rglob("*")):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    handle.keys()
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:
                    archive.namelist()
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as err:  # noqa: BLE001 - any failure to read means it would not load
            bad.append(f"{path.relative_to(checkpoint)} ({type(err).__name__})")
    return bad


def last_checkpoint(folder: Path) -> tuple[Path | None, int]:
    """The newest checkpoint in ``folder`` that is complete and loads, and its step, or (None, 0).

    The trainer writes trainer_state.json last, so a checkpoint a kill cut short (weights but no state)
    is passed over for the one before it; so is one whose files do not load (``unreadable_files``), with
    a warning naming it. If checkpoints exist and none loads, the run is refused and every file kept.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = []
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if folder.is_dir() else ():
        step = path.name.rsplit("-", 1)[-1]
        if step.isdigit() and (path / "trainer_state.json").exists():
            found.append((int(step), path))
    skipped = []
    for step, path in sorted(found, reverse=True):
        bad = unreadable_files(path)
        if not bad:
            return path, step
        log.warning("checkpoint %s does not load (%s): passed over for an older one", path, ", ".join(bad))
        skipped.append(f"{path.name}: {', '.join(bad)}")
    if skipped:
        raise ConfigError(f"No checkpoint in {folder} loads ({'; '.join(skipped)}), so this run cannot resume. "
                          f"Every file is kept. Move {folder} aside to train from the start, or restore a "
                          "checkpoint from a copy.")
    return None, 0


def train(cfg, model, tokenizer, train_records, run_dir: Path, device: str, report_to=(), on_log=None,
          dev_eval=None, dev_records=None, callbacks=(), epoch_results=None) -> dict:
    """Fit ``model`` on prompt/completion ``train_records``; return train/* metrics.

    Resumes from the newest complete checkpoint in ``<run_dir>/checkpoints`` when a
    killed run left one (optimizer, scheduler, RNG and data position included).
    ``dev_eval(model) -> eval/* metrics`` scores ``dev_records`` on ``train.eval_every``'s
    schedule (``DevEvaluation``); ``callbacks`` see those evaluations. ``epoch_results`` =
    (epochs, write): ``write(epoch, state, train_metrics)`` at the end of each of those epochs.
    """
    memory.reset_peak(device)  # train/peak_memory_mb: from here, this run's own (also in a one-process sweep)
    allocator.note(device)
    scratch = run_dir / CHECKPOINTS  # the trainer's output_dir: checkpoints only
    resume, resume_step = last_checkpoint(scratch)
    if resume is None and cfg.train.save_steps and not cfg.output_dir:
        log.info("checkpoints every %d steps in %s; after a kill, resume with output_dir=%s",
                 cfg.train.save_steps, scratch, run_dir)
    if resume is not None:
        log.info("resuming from %s (step %d): weights, optimizer, scheduler, RNG and data position restored",
                 resume, resume_step)
    loss_log = LossLog(run_dir / "train_log.jsonl", on_log, resume_step)
    if cfg.model.get("attn_implementation"):
        model.set_attn_implementation(str(cfg.model.attn_implementation))
    if cfg.model.arch == "seq2seq":
        build = build_seq2seq_trainer
    elif head_has_adapter(model):
        build = build_head_adapter_trainer
    else:
        build = build_sft_trainer
    counter = throughput.TokenCounter()  # the batches actually trained, this session
    hooks = [loss_log, EpochEndsLogged(), counter, *callbacks]
    if cfg.train.early_stopping.patience is not None:
        hooks.append(EarlyStoppingCallback(int(cfg.train.early_stopping.patience),
                                           float(cfg.train.early_stopping.threshold)))
    timings: dict = {}
    trainer = build(cfg, model, tokenizer, train_records, scratch, device, list(report_to), hooks, timings,
                    eval_data=dev_records if dev_eval is not None else None)
    trainer.dev_eval = dev_eval
    trainer.remove_callback(PrinterCallback)  # LossLog reports progress instead of raw dicts
    per_token = throughput.flops_per_token(model, frozen_base=bool(cfg.lora.enabled))  # before any sharding
    ceiling = throughput.Ceiling(cfg, device, model)  # train/mfu's peak: on a CPU measured now and as metrics are read
    start = time.perf_counter()
    epochs_cb = None

    def so_far(state) -> dict:
        """train/* metrics of the training done up to now (evaluations' time left out)."""
        seconds = time.perf_counter() - start - trainer.eval_seconds - (epochs_cb.seconds if epochs_cb else 0.0)
        real, padded = counter.totals()  # all ranks
        return {
            **loss_log.metrics(),
            "train/steps": int(state.global_step),
            "train/samples": len(train_records),
            "train/runtime_s": seconds,
            # real (non-padding) tokens of all ranks, a resumed run's before it included
            "train/tokens": counter.before + real,
            # tokens/s, padding, FLOPs per token, MFU: this session's (since start or resume), all ranks
            **throughput.metrics(ceiling, per_token, real, padded, seconds, distributed.world_size()),
            "data/prep_s": timings.get("data/prep_s", 0.0),
            "train/resumed_from_step": resume_step,
            # train.batch_size is per process; a step sees world_size x batch_size x grad_accum rows
            "train/world_size": distributed.world_size(),
            "train/global_batch_size": distributed.world_size() * cfg.train.batch_size * cfg.train.grad_accum,
            "train/micro_batch_size": micro_batch_size(cfg.train, device),
            "train/peak_memory_mb": memory.peak_mb(device),
        }

    if epoch_results is not None:
        epochs, write = epoch_results
        epochs_cb = EpochResults(epochs, lambda epoch, state: write(epoch, state, so_far(state)))
        trainer.add_callback(epochs_cb)
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        metrics = so_far(trainer.state)
    finally:
        counter.remove()
    distributed.barrier()  # every rank is done with the checkpoints before rank 0 removes them
    if distributed.is_main():
        remove_checkpoints(run_dir, keep=cfg.train.keep_checkpoints)
    if epochs_cb is not None and isinstance(cfg.train.eval_every, int):
        # the evaluations made only for the earlier epochs' results are theirs, not this run's
        loss_log.keep(rows_until(loss_log.rows(), trainer.state.global_step, cfg.train.eval_every))
        history = rows_until(trainer.state.log_history, trainer.state.global_step, cfg.train.eval_every)
    else:
        history = None
    if not loss_log.losses:
        metrics.update({"train/loss_first": float(result.training_loss), "train/loss_last": float(
            result.training_loss), "train/loss_mean": float(result.training_loss)})
    if dev_eval is not None:
        metrics.update(dev_summary(cfg, trainer.state, history))
    return {"metrics": metrics, "trainer": trainer}


def remove_checkpoints(run_dir: Path, keep: bool = False) -> None:
    """Delete the run's checkpoints (kept with ``keep``, unless there are none); a kill mid-removal leaves no
    half checkpoint behind, the folder being renamed first."""
    scratch = Path(run_dir) / CHECKPOINTS
    if scratch.is_dir() and (not keep or not any(scratch.iterdir())):
        gone = scratch.with_name(scratch.name + ".removing")
        shutil.rmtree(gone, ignore_errors=True)
        scratch.rename(gone)
        shutil.rmtree(gone)


def rows_until(rows: list[dict], step: int, eval_every) -> list[dict]:
    """The train log ``rows`` (or the Trainer's log history) a run ending at ``step`` would have written:
    those up to it, less the evaluations a longer run made at the end of an earlier epoch that is
    kept as a result of its own (``EpochResults``), where a run ending at ``step`` did not evaluate."""
    def kept(row: dict) -> bool:
        if row.get("step", 0) > step:
            return False
        evaluated = any(k.startswith("eval_") for k in row)
        return not (evaluated and isinstance(eval_every, int) and row["step"] % eval_every and row["step"] != step)
    return [row for row in rows if kept(row)]


def dev_summary(cfg, state, history: list[dict] | None = None) -> dict:
    """What the evaluations during training found (in ``history``, else the state's log history): how many,
    the best objective and its step, and, with early stopping, whether it stopped the run early."""
    key = dev_key(cfg.objective)
    seen = [(row["step"], row[key]) for row in (state.log_history if history is None else history) if key in row]
    out = {"train/dev_evaluations": len(seen), "train/dev_n": int(cfg.train.eval_n)}
    if seen:
        pick = max if metric_direction(str(cfg.objective), str(cfg.task.kind)) == "maximize" else min
        step, value = pick(seen, key=lambda sv: sv[1])
        name = key[len("eval_dev_"):]
        out.update({f"train/dev_best_{name}": float(value), "train/dev_best_step": int(step),
                    f"train/dev_last_{name}": float(seen[-1][1])})
    if cfg.train.early_stopping.patience is not None:
        out["train/early_stopped"] = int(state.global_step < state.max_steps)
        out["train/stopped_at_step"] = int(state.global_step)
    return out
