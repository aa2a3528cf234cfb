"""What every task kind shares: turning a record into prompt/completion text, the
k-shot prompt, and the chat-template-or-layout wrapping.

A task kind subclasses ``Task`` and supplies ``target_text`` (the trained answer)
and ``score`` (predictions -> flat metrics + one row per example).
"""

from __future__ import annotations

import functools
import string
from typing import Any, Sequence


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


class Task:
    kind = "base"
    objective_default = "eval/accuracy"

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

    def clean_prediction(self, text: str) -> str:
        """Cut the generated text at the first stop string."""
        for stop in self.cfg.generation.stop or ():
            if stop and stop in text:
                text = text[: text.index(stop)]
        return text.strip()
