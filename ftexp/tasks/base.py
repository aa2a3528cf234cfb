"""What every task kind shares: turning a record into prompt/completion text, the
k-shot prompt, and the chat-template-or-layout wrapping.

A task kind subclasses ``Task`` and supplies ``target_text`` (the trained answer)
and ``score`` (predictions -> flat metrics + one row per example).
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass
from typing import Any, Sequence

from datasets import Dataset


class _Fields(dict):
    def __missing__(self, key):  # a template field the record does not have
        raise KeyError(key)


def fill(template: str, record: dict, where: str) -> str:
    try:
        return string.Formatter().vformat(template, (), _Fields(record))
    except KeyError as err:
        fields = sorted(k for k in record if not k.startswith("_"))
        raise KeyError(
            f"{where} uses the field {{{err.args[0]}}}, which the data does not have. Fields found: {fields}. "
            "Map it with data.columns.<field>=<column> or change the template."
        ) from None


def join_answer(prompt: str, answer: str) -> str:
    """``answer`` as it continues ``prompt``: no leading whitespace after a prompt
    that ends in whitespace (a newline or space is never written twice)."""
    return answer.lstrip() if prompt[-1:].isspace() else answer


@functools.lru_cache(maxsize=16)
def adds_bos(tokenizer) -> bool:
    """Whether encoding a text puts BOS in front of it. SmolLM2's GGUF tokenizer names
    <|im_start|> its BOS but never adds it: a chat template's own must then stay."""
    ids = tokenizer("x")["input_ids"]
    return len(ids) > len(tokenizer("x", add_special_tokens=False)["input_ids"]) and ids[0] == tokenizer.bos_token_id


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """``messages`` through the tokenizer's chat template, up to the assistant's turn; a BOS
    the template writes is dropped when encoding adds it again."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        text = text[len(bos):]
    return text


@dataclass(frozen=True)
class Metric:
    """A metrics.json key a run writes, which way is better, and how it is printed.
    A name ending in ``*`` stands for a family (``eval/rmse_*``: one per scored field)."""

    name: str
    direction: str = "maximize"  # maximize | minimize
    fmt: str = ".3f"

    def matches(self, key: str) -> bool:
        return key == self.name or (self.name.endswith("*") and key.startswith(self.name[:-1]))


# What every run writes, whatever its task (training, the model, evaluation's bookkeeping)
RUN_METRICS = (
    Metric("train/loss_first", "minimize"), Metric("train/loss_last", "minimize"), Metric("train/loss_mean", "minimize"),
    Metric("train/runtime_s", "minimize", ".0f"), Metric("train/peak_memory_mb", "minimize", ".0f"),
    Metric("train/tokens_per_s", "maximize", ".0f"), Metric("train/steps", "maximize", "d"),
    Metric("train/trainable_params", "minimize", ",d"), Metric("model/weight_memory_mb", "minimize", ".0f"),
    Metric("eval/runtime_s", "minimize", ".1f"), Metric("eval/n", "maximize", "d"),
    Metric("eval/peak_memory_mb", "minimize", ".0f"),
)
# What an LLM judge writes (ftexp/judge.py): ratings 1-5 per criterion, higher is better,
# and these judge/* keys that count or check rather than rate
JUDGE_BOOKKEEPING = ("n", "unparsed", "failed", "requests", "cache_hits", "rating_mass", "control_ok",
                    "valid_against")
JUDGE_METRICS = (
    Metric("judge/unparsed", "minimize", "d"), Metric("judge/failed", "minimize", "d"),
    Metric("judge/requests", "minimize", "d"), Metric("judge/cache_hits", "maximize", "d"),
    Metric("judge/*", "maximize", ".2f"),
)


class Task:
    kind = "base"
    # Declared by each task kind, its default objective first. eval/likelihood_<name> and
    # eval/generate_<name> (eval.method=both) are <name> scored another way.
    metrics: tuple[Metric, ...] = ()

    def __init__(self, tcfg, *, tokenizer=None, use_chat_template: bool | None = None):
        self.cfg = tcfg
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = has_template if use_chat_template is None else (use_chat_template and has_template)

    # -- pieces a kind defines ------------------------------------------------
    def target_text(self, record: dict) -> str:
        """The answer the model is trained to produce (no leading space, no EOS)."""
        return str(record[self.cfg.target])

    def reference(self, record: dict) -> Any:
        return self.target_text(record)

    def score(self, predictions: Sequence[str], records: Sequence[dict]) -> tuple[dict, list[dict]]:
        raise NotImplementedError

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a tokenizer this task cannot be trained or scored with; any will do unless a kind says."""

    # -- text building ----------------------------------------------------------
    def user_text(self, record: dict, shots: Sequence[dict] = ()) -> str:
        question = fill(self.cfg.template, record, "task.template")
        if not shots:
            return question
        solved = [self.shot_text(s) for s in shots]
        return "\n\n".join([*solved, question])

    def shot_text(self, record: dict) -> str:
        if self.cfg.shot_template:
            return fill(self.cfg.shot_template, {**record, "target": self.target_text(record)}, "task.shot_template")
        question = fill(self.cfg.template, record, "task.template")
        return question + self.completion(record, after=question)

    def prompt(self, record: dict, shots: Sequence[dict] = ()) -> str:
        """The full prompt string the model sees, before any completion."""
        user = self.user_text(record, shots)
        system = self.cfg.system_prompt
        if self.use_chat_template:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
            return chat_prompt(self.tokenizer, messages)
        if system and self.cfg.prompt_layout_system:
            return fill(self.cfg.prompt_layout_system, {"system": system, "user": user}, "task.prompt_layout_system")
        return fill(self.cfg.prompt_layout, {"user": user, "system": system or ""}, "task.prompt_layout")

    def completion(self, record: dict, after: str | None = None) -> str:
        """The trained answer, as it follows the text ``after`` (the prompt), when given.

        task.completion_template may open with a space (`` {target}``): right for a
        prompt that ends in a word or bracket, as Llama-2's ``[/INST] answer``. A
        prompt that already ends in whitespace, as a chat template's generation
        prompt (``<|im_start|>assistant\n``), is followed by the answer's first
        word itself: that is the token the model writes there, so it is the one to
        train and to score.
        """
        text = fill(self.cfg.completion_template, {**record, "target": self.target_text(record)},
                    "task.completion_template")
        return join_answer(after, text) if after is not None else text

    def to_prompt_completion(self, record: dict) -> dict:
        prompt = self.prompt(record)
        return {"prompt": prompt, "completion": self.completion(record, after=prompt)}

    def to_records(self, rows) -> Dataset:
        """The prompt/completion records training reads, one per row of ``rows``."""
        return Dataset.from_list([self.to_prompt_completion(dict(r)) for r in rows])

    def clean_prediction(self, text: str) -> str:
        """Cut the generated text at the first stop string."""
        for stop in self.cfg.generation.stop or ():
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text.strip()
