"""Classification prompts and parsing: the SST-2 study's Llama-2 layout, the
tokenizer's own chat template when it has one, and first-word label mapping."""

from __future__ import annotations

from conftest import compose_cfg
from ftexp import tiny
from ftexp.tasks import build_task

RECORD = {"text": "a gorgeous , witty film .", "label": 1}


def _tokenizer(template: str | None = None):
    tok = tiny.build_tokenizer(["a gorgeous , witty film . positive negative"] * 4, 300)
    if template:
        tok.chat_template = template
    return tok


def test_llama2_layout_with_the_study_system_prompt():
    cfg = compose_cfg(["data=sst2"])
    task = build_task(cfg.task, tokenizer=_tokenizer())
    prompt, completion = task.prompt(RECORD), task.completion(RECORD)
    system = cfg.task.system_prompt
    assert prompt == f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\nReview: {RECORD['text']}\nIs this review positive or negative? [/INST]"
    assert completion == " positive"  # BOS and EOS come from the tokenizer / trainer


def test_a_tokenizer_chat_template_replaces_the_layout():
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    cfg = compose_cfg([])
    task = build_task(cfg.task, tokenizer=_tokenizer(template))
    prompt = task.prompt(RECORD)
    assert prompt.startswith(f"<|system|>{cfg.task.system_prompt}\n<|user|>Review: {RECORD['text']}")
    assert prompt.endswith("<|assistant|>") and "[INST]" not in prompt
    off = build_task(cfg.task, tokenizer=_tokenizer(template), use_chat_template=False)
    assert off.prompt(RECORD).startswith("[INST] <<SYS>>")


def test_first_word_maps_to_a_label_and_anything_else_is_irregular():
    cfg = compose_cfg([])
    task = build_task(cfg.task)
    records = [{"text": "x", "label": y} for y in (1, 0, 1, 0, 1)]
    preds = ["Positive.", " negative, clearly", "neutral", "", "positive!"]
    metrics, rows = task.score(preds, records)
    assert [r["irregular"] for r in rows] == [False, False, True, True, False]
    assert [r["correct"] for r in rows] == [True, True, False, False, True]
    assert metrics["eval/accuracy"] == 3 / 5 and metrics["eval/irregular"] == 2
    assert "neutral (1)" in metrics["eval/irregular_top"]
