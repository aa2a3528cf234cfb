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
    assert prompt == f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\nReview: {RECORD['text']}\nIs this review positive or negative? Answer with one word. [/INST]"
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


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_after_a_chat_generation_prompt_the_answer_has_no_leading_space():
    """ChatML ends the prompt in 'assistant\\n': the model writes 'positive' there, not
    ' positive', so that is what is trained; the Llama-2 layout keeps its space."""
    cfg = compose_cfg([])
    chat = build_task(cfg.task, tokenizer=_tokenizer(CHATML))
    pair = chat.to_prompt_completion(RECORD)
    assert pair["prompt"].endswith("<|im_start|>assistant\n") and pair["completion"] == "positive"
    layout = build_task(cfg.task, tokenizer=_tokenizer())
    pair = layout.to_prompt_completion(RECORD)
    assert pair["prompt"].endswith("[/INST]") and pair["completion"] == " positive"


def test_join_answer_drops_leading_whitespace_only_after_whitespace():
    from ftexp.tasks.base import join_answer

    assert join_answer("[/INST]", " positive") == " positive"
    assert join_answer("assistant\n", " positive") == "positive"
    assert join_answer("### Response:", "\nBlue") == "\nBlue"
    assert join_answer("Answer: ", "\nBlue") == "Blue"


def test_a_bos_the_tokenizer_never_adds_stays_in_the_chat_prompt():
    """SmolLM2's GGUF tokenizer calls <|im_start|> its BOS but does not add it when
    encoding: the template's opening <|im_start|> must not be cut."""
    from tokenizers import processors

    cfg = compose_cfg([])
    tok = _tokenizer(CHATML)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.bos_token = "<|im_start|>"
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)  # adds nothing
    task = build_task(cfg.task, tokenizer=tok)
    assert task.prompt(RECORD).startswith("<|im_start|>system\n")
