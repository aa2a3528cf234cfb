"""Training rows from prompt/completion text, as SFTTrainer's own preparation makes them.

Each row is ``input_ids`` + ``completion_mask`` (1 on completion tokens), with what
training needs from them ready too: ``labels`` (the ids, -100 off the completion) and
``length`` (read by the length-grouped sampler). ``training.sft_rows`` cuts them to
``train.max_length`` and packs them where asked.

ftexp prepares the rows itself rather than leaving it to SFTTrainer because the trainer
that adapts the output head (``training.build_head_adapter_trainer``) and the loss read
``labels``, and because it is the faster of the two on SmolLM2's SST-2 rows: 0.36 s against
TRL's 0.56 s for 1,000 rows, 18.5 s against 30.3 s for all 67,349.

Rows used to be kept on disk, so that a sweep's trials tokenized each row once. On those
SST-2 trials that saved 0.3 s of a 1,000-row trial, which took 515 s end to end (LoRA, one
epoch, both evaluation methods on 872 sentences), and 18 s of a 67,349-row one (about 7 hours
at that trial's 174 tokens/s): under 0.1% of a trial, so every run tokenizes its rows afresh.
"""

from __future__ import annotations

from datasets import Dataset


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two id sequences share."""
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def tokenize_prompt_completion(tokenizer, prompts, completions) -> dict:
    """input_ids of prompt+completion+EOS and the mask of completion tokens.

    SFTTrainer's own tokenization of prompt/completion text, done here so that every
    trainer gets the same rows (SFTTrainer offers it only inside its dataset preparation): EOS is added
    to a completion that lacks it, and the completion starts where the tokenized prompt
    stops being a prefix of the tokenized whole (tokens may merge across the boundary).
    """
    eos = tokenizer.eos_token or ""
    full = tokenizer([p + c + (eos if not c.endswith(eos) else "") for p, c in zip(prompts, completions)])["input_ids"]
    heads = tokenizer(list(prompts))["input_ids"]
    masks = []
    for head, ids in zip(heads, full):
        k = common_prefix_length(head, ids)
        masks.append([0] * k + [1] * (len(ids) - k))
    return {"input_ids": full, "completion_mask": masks}


def with_labels(batch: dict) -> dict:
    """Add ``labels`` (-100 off the completion, as SFTTrainer builds them from the mask) and
    ``length`` (tokens per row, read by the length-grouped sampler) to tokenized rows."""
    labels = [[t if m else -100 for t, m in zip(ids, mask)]
              for ids, mask in zip(batch["input_ids"], batch["completion_mask"])]
    return {**batch, "labels": labels, "length": [len(ids) for ids in batch["input_ids"]]}


def tokenize(records: Dataset, tokenizer) -> Dataset:
    """Prompt/completion ``records`` as training rows: ``input_ids``, ``completion_mask``,
    ``labels`` and ``length`` (``tokenize_prompt_completion`` and ``with_labels``)."""
    return records.map(lambda b: with_labels(tokenize_prompt_completion(tokenizer, b["prompt"], b["completion"])),
                       batched=True, remove_columns=records.column_names)
