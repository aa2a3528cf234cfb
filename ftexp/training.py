"""Trainer construction and the training loop's bookkeeping.

Decoder-only models train with TRL's SFTTrainer on prompt/completion records, so
the loss covers completion tokens only (TRL builds the mask). Encoder-decoder
models train with transformers' Seq2SeqTrainer: the prompt feeds the encoder and
the completion is the labels.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from pathlib import Path

import torch
from transformers import PrinterCallback, TrainerCallback

from ftexp import distributed

log = logging.getLogger(__name__)


class LossLog(TrainerCallback):
    """Append every logging step's record to ``train_log.jsonl`` and keep the losses.

    A run resumed from the checkpoint of step ``resume_step`` keeps the records up to
    that step (what the killed run logged after it is redone) and goes on appending.
    """

    def __init__(self, path: Path, on_log=None, resume_step: int = 0):
        self.path = path
        self.losses: list[float] = []
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
                    self.losses.append(float(row["loss"]))
        if distributed.is_main():
            path.write_text("".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        self.losses.append(float(logs["loss"]))
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.on_log_fn:
            self.on_log_fn(row)
        if state.global_step == 1 or state.global_step % (args.logging_steps * 10) == 0 or state.global_step == state.max_steps:
            log.info("step %d/%d  epoch %.2f  loss %.4f", state.global_step, state.max_steps, state.epoch or 0, logs["loss"])


def common_args(cfg, out_dir: Path, device: str, report_to: list[str]) -> dict:
    t = cfg.train
    return dict(
        output_dir=str(out_dir),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=float(t.epochs or 1.0),
        max_steps=t.max_steps if t.max_steps else -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps,
        optim=t.optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.bf16,
        fp16=t.fp16,
        activation_checkpointing=t.gradient_checkpointing,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        eval_strategy="no",
        report_to=report_to,
        run_name=cfg.run_name,
        use_cpu=device == "cpu",
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
        dataloader_pin_memory=device == "cuda",
    )


def build_sft_trainer(cfg, model, tokenizer, train_records, out_dir: Path, device: str, report_to, callbacks):
    from trl import SFTConfig, SFTTrainer

    from ftexp.cache import tokenized_prefix

    # prompt/completion rows -> input_ids + completion_mask, shared across a sweep;
    # SFTTrainer turns the mask into labels (-100 on the prompt).
    train_data, fresh = tokenized_prefix(train_records, tokenizer, cfg, cfg.cache_dir)
    log.info("train rows: %d (%d tokenized now, %d from the cache)", len(train_data), fresh, len(train_data) - fresh)
    # Truncation happens here, on ids and mask together: TRL only keeps the start of a
    # row, while keep_end (cut from the left) keeps the answer of a long prompt.
    train_data = truncate_rows(train_data, cfg.train.max_length, cfg.train.truncation)

    args = SFTConfig(
        **common_args(cfg, out_dir, device, report_to),
        completion_only_loss=True,
        max_length=cfg.train.max_length,  # rows already fit; a no-op guard
    )
    return SFTTrainer(model=model, args=args, train_dataset=train_data, processing_class=tokenizer,
                      callbacks=callbacks)


def truncate_rows(data, max_length: int, truncation: str):
    """Cut ``input_ids`` and ``completion_mask`` of rows longer than ``max_length``:
    keep_start drops the tail, keep_end drops the head."""
    cut = slice(None, max_length) if truncation == "keep_start" else slice(-max_length, None)
    if all(len(ids) <= max_length for ids in data["input_ids"]):
        return data
    return data.map(lambda row: {"input_ids": row["input_ids"][cut], "completion_mask": row["completion_mask"][cut]})


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


def build_seq2seq_trainer(cfg, model, tokenizer, train_records, out_dir: Path, device: str, report_to, callbacks):
    """transformers' Seq2SeqTrainer (TRL's SFTTrainer is decoder-only) on prompt -> completion pairs."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    args = Seq2SeqTrainingArguments(**common_args(cfg, out_dir, device, report_to), remove_unused_columns=False,
                                    label_names=["labels"])
    data = tokenize_seq2seq(train_records, tokenizer, cfg.train.max_length, cfg.train.truncation)
    # With the model, the collator also builds decoder_input_ids (labels shifted right).
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    return Seq2SeqTrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                          processing_class=tokenizer, callbacks=callbacks)


def head_has_adapter(model) -> bool:
    """True when the output head (lm_head) carries a LoRA adapter (lora.include_lm_head)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return isinstance(head, BaseTunerLayer)


def completion_labels(rows, max_length: int, truncation: str):
    """Rows of input_ids + completion_mask (ftexp.cache) -> input_ids, attention_mask, labels.

    What TRL's SFTTrainer does with the same rows: labels are -100 off the
    completion, sequences are cut to ``max_length`` from the end (keep_start) or
    the start (keep_end), and rows left with no label are dropped.
    """
    def encode(row):
        ids = row["input_ids"]
        labels = [t if m else -100 for t, m in zip(ids, row["completion_mask"])]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    rows = truncate_rows(rows, max_length, truncation)
    data = rows.map(encode, remove_columns=rows.column_names)
    return data.filter(lambda row: any(label != -100 for label in row["labels"]))


def pad_right(pad_id: int):
    """Collator: right-pad input_ids with ``pad_id``, attention with 0, labels with -100."""

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for r in rows:
            gap = width - len(r["input_ids"])
            batch["input_ids"].append(list(r["input_ids"]) + [pad_id] * gap)
            batch["attention_mask"].append(list(r["attention_mask"]) + [0] * gap)
            batch["labels"].append(list(r["labels"]) + [-100] * gap)
        return {k: torch.tensor(v) for k, v in batch.items()}

    return collate


def build_head_adapter_trainer(cfg, model, tokenizer, train_records, out_dir: Path, device: str, report_to,
                               callbacks):
    """Decoder-only training when lm_head carries a LoRA adapter (the CommonLit study's setup).

    TRL's SFTTrainer refuses such a model: its loss reads log-probabilities straight
    from ``lm_head.weight``, so an adapter there would never train. transformers'
    Trainer computes the loss through the model's own head instead, on the same
    tokenized rows and with the same completion-only labels as SFTTrainer.
    """
    from transformers import Trainer, TrainingArguments

    from ftexp.cache import tokenized_prefix

    args = TrainingArguments(**common_args(cfg, out_dir, device, report_to), remove_unused_columns=False,
                             label_names=["labels"])
    rows, _ = tokenized_prefix(train_records, tokenizer, cfg, cfg.cache_dir)  # the rows SFTTrainer would get
    data = completion_labels(rows, cfg.train.max_length, cfg.train.truncation)
    return Trainer(model=model, args=args, train_dataset=data, data_collator=pad_right(tokenizer.pad_token_id),
                   processing_class=tokenizer, callbacks=callbacks)


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


CHECKPOINTS = "checkpoints"


def last_checkpoint(folder: Path) -> tuple[Path | None, int]:
    """The newest complete checkpoint in ``folder`` and its step, or (None, 0).

    The trainer writes trainer_state.json last, so a checkpoint a kill cut short
    (weights but no state) is passed over for the one before it.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = []
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if folder.is_dir() else ():
        step = path.name.rsplit("-", 1)[-1]
        if step.isdigit() and (path / "trainer_state.json").exists():
            found.append((int(step), path))
    if not found:
        return None, 0
    step, path = max(found)
    return path, step


def train(cfg, model, tokenizer, train_records, run_dir: Path, device: str, report_to=(), on_log=None) -> dict:
    """Fit ``model`` on prompt/completion ``train_records``; return train/* metrics.

    Resumes from the newest complete checkpoint in ``<run_dir>/checkpoints`` when a
    killed run left one (optimizer, scheduler, RNG and data position included).
    """
    scratch = run_dir / CHECKPOINTS  # the trainer's output_dir: checkpoints only
    resume, resume_step = last_checkpoint(scratch)
    tokens_before = 0
    if resume is None and cfg.train.save_steps and not cfg.output_dir:
        log.info("checkpoints every %d steps in %s; after a kill, resume with output_dir=%s",
                 cfg.train.save_steps, scratch, run_dir)
    if resume is not None:
        tokens_before = int(json.loads((resume / "trainer_state.json").read_text()).get("num_input_tokens_seen") or 0)
        log.info("resuming from %s (step %d): weights, optimizer, scheduler, RNG and data position restored",
                 resume, resume_step)
    loss_log = LossLog(run_dir / "train_log.jsonl", on_log, resume_step)
    if cfg.model.arch == "seq2seq":
        build = build_seq2seq_trainer
    elif head_has_adapter(model):
        build = build_head_adapter_trainer
    else:
        build = build_sft_trainer
    trainer = build(cfg, model, tokenizer, train_records, scratch, device, list(report_to), [loss_log])
    trainer.remove_callback(PrinterCallback)  # LossLog reports progress instead of raw dicts
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    runtime = time.perf_counter() - start
    distributed.barrier()  # every rank is done with the checkpoints before rank 0 removes them
    if distributed.is_main() and scratch.is_dir() and (not cfg.train.keep_checkpoints or not any(scratch.iterdir())):
        gone = scratch.with_name(scratch.name + ".removing")  # a kill mid-removal leaves no half checkpoint
        shutil.rmtree(gone, ignore_errors=True)
        scratch.rename(gone)
        shutil.rmtree(gone)
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)

    losses = loss_log.losses or [float(result.training_loss)]
    metrics = {
        "train/loss_first": losses[0],
        "train/loss_last": losses[-1],
        "train/loss_mean": float(result.training_loss),
        "train/steps": int(trainer.state.global_step),
        "train/samples": len(train_records),
        "train/runtime_s": runtime,
        "train/tokens": tokens,
        "train/tokens_per_s": (tokens - tokens_before) / runtime if runtime > 0 else 0.0,  # all ranks, since start or resume
        "train/peak_memory_mb": peak_memory_mb(device),
        "train/resumed_from_step": resume_step,
        # train.batch_size is per process; a step sees world_size x batch_size x grad_accum rows
        "train/world_size": distributed.world_size(),
        "train/global_batch_size": distributed.world_size() * cfg.train.batch_size * cfg.train.grad_accum,
    }
    return {"metrics": metrics, "trainer": trainer}
