"""Evaluation machinery on tiny in-process models: label likelihood against generation
on a model trained until it answers correctly, batch-size-independent greedy outputs,
multi-token label scoring, k-shot prompts, generation from a shared prompt prefix, and
the batch size halving on out-of-memory errors."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from conftest import compose_cfg
from ftexp import evaluation, tiny
from ftexp.config import EvalMethod
from ftexp.errors import ConfigError
from ftexp.tasks import build_task

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "paper", "glass", "storm", "piano", "candle", "forest"]


def _records():
    # each prompt names two things; the label is fixed by the first one
    rows = []
    for i, a in enumerate(WORDS):
        for b in WORDS[i + 1:i + 3]:
            rows.append({"text": f"{a} and the {b}", "label": i % 2})
    return rows


# A head every prompt of the shared-prefix tests starts with: an instruction and two
# solved examples, as a system prompt and k-shot examples make one.
HEAD = ("Say whether the first thing named is positive or negative. Answer with one word.\n\n"
        "[INST] paper and the glass [/INST] positive\n\n[INST] river and the stone [/INST] negative\n\n")


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama trained on the prompts until greedy decoding answers every one."""
    return _train()


@pytest.fixture(scope="module")
def trained_with_head():
    """The same, with every prompt starting with HEAD."""
    return _train(HEAD, steps=400)


def _train(head: str = "", steps: int = 150):
    cfg = compose_cfg(["task=classification", "task.generation.max_new_tokens=3", "eval.batch_size=16"],
                      fast=False)
    records = _records()
    task0 = build_task(cfg.task)
    texts = [head + task0.prompt(r) + task0.completion(r) for r in records]
    tok = tiny.build_tokenizer(texts * 3, 600)
    config = tiny.build_config("llama", len(tok), tok, hidden_size=48, num_layers=2, num_heads=4,
                               intermediate_size=96)
    model = tiny.build_model(config, seed=0)
    task = build_task(cfg.task, tokenizer=tok)
    seqs, masks = [], []
    for r in records:
        p = tok(head + task.prompt(r))["input_ids"]
        c = tok(task.completion(r), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(p + c)
        masks.append([0] * len(p) + [1] * len(c))
    L = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (L - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    labels = torch.where(torch.tensor([m + [0] * (L - len(m)) for m in masks]).bool(), ids, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    model.train()
    for step in range(steps):
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    model.eval()
    return cfg, model, tok, task, records


def test_likelihood_and_generate_agree_on_a_model_that_answers_correctly(trained, tmp_path):
    cfg, model, tok, task, records = trained
    with open_dict(cfg):
        cfg.eval.method = EvalMethod.both
    metrics, rows = evaluation.evaluate(cfg, model, tok, task, records)
    assert metrics["eval/accuracy"] == 1.0 and metrics["eval/irregular"] == 0
    assert metrics["eval/likelihood_accuracy"] == 1.0
    assert metrics["eval/method_agreement"] == 1.0
    assert all(r["prediction"] == r["likelihood_prediction"] == r["reference"] for r in rows)
    assert metrics["eval/n"] == len(records) and "eval/likelihood_runtime_s" in metrics
    with open_dict(cfg):
        cfg.eval.method = EvalMethod.likelihood
    metrics, rows = evaluation.evaluate(cfg, model, tok, task, records)
    assert metrics["eval/accuracy"] == 1.0 and metrics["eval/irregular"] == 0
    assert all(r["predicted_label"] == r["reference"] and set(r["label_logprobs"]) == {"negative", "positive"}
               for r in rows)


def test_both_methods_read_one_token_labels_off_generation_with_the_same_scores(trained):
    """eval.method=both scores the labels from generation's first step: the same label log-probs
    as eval.method=likelihood alone, and no prompt is encoded a second time for them."""
    cfg, model, tok, task, records = trained
    runs = {}
    for method in (EvalMethod.likelihood, EvalMethod.generate, EvalMethod.both):
        with open_dict(cfg):
            cfg.eval.method = method
        widths = _Widths(model)
        metrics, rows = evaluation.evaluate(cfg, model, tok, task, records)
        widths.handle.remove()
        runs[method] = metrics, rows, widths.seen
    alone, both = runs[EvalMethod.likelihood], runs[EvalMethod.both]
    assert both[2] == runs[EvalMethod.generate][2]  # the prompts were encoded by generation only
    assert len(alone[2]) > 0
    for a, b in zip(alone[1], both[1]):
        assert a["label_logprobs"].keys() == b["label_logprobs"].keys()
        assert all(abs(a["label_logprobs"][w] - b["label_logprobs"][w]) <= 2e-4 for w in a["label_logprobs"])
    assert both[0]["eval/likelihood_accuracy"] == alone[0]["eval/accuracy"] == 1.0


def test_a_prompt_generation_saw_otherwise_is_encoded_again(trained):
    """``FirstStep`` answers only for the exact ids a prompt was generated from, and only for the
    tokens it recorded; any other prompt is scored by its own forward pass, to the same figures."""
    cfg, model, tok, task, records = trained
    prompts = [task.prompt(r) for r in records[:6]]
    options = [" positive", " negative"]
    plain = evaluation.label_logprobs(model, tok, prompts, options, batch_size=4)
    ids = evaluation.option_token_ids(tok, options)
    assert all(len(t) == 1 for t in ids)
    step = evaluation.FirstStep([t[0] for t in ids])
    gen = OmegaConf.merge(cfg.task.generation, {"max_new_tokens": 2})
    beams = OmegaConf.merge(gen, {"num_beams": 3})  # a prompt's rows: alike at the first step
    evaluation.generate(model, tok, prompts, beams, batch_size=4, first_step=step)
    assert len(step) == len(prompts)
    wrong = evaluation.FirstStep([t[0] for t in ids])  # then prompt 0 recorded from other ids, made-up scores
    evaluation.generate(model, tok, prompts, gen, batch_size=4, first_step=wrong)
    wrong.record([0], [[1, 2, 3]], torch.zeros(1, len(tok)))
    half = evaluation.FirstStep([ids[0][0]])  # " negative" not recorded
    evaluation.generate(model, tok, prompts, gen, batch_size=4, first_step=half)
    for first_step, encoded in ((step, 0), (wrong, 1), (half, len(prompts))):
        widths = _Widths(model)
        got = evaluation.label_logprobs(model, tok, prompts, options, batch_size=4, first_step=first_step)
        widths.handle.remove()
        assert torch.allclose(got, plain, atol=1e-5), (got - plain).abs().max()
        assert sum(rows for rows, _ in widths.seen) == encoded  # rows encoded by the scoring itself


def test_greedy_outputs_are_the_same_at_batch_size_1_and_16(trained):
    cfg, model, tok, task, records = trained
    prompts = [task.prompt(r) for r in records]
    prompts += [p.replace(" and the ", " and then the old ") for p in prompts[:10]]  # other lengths
    gen = OmegaConf.merge(cfg.task.generation, {"max_new_tokens": 6})
    one = evaluation.generate(model, tok, prompts, gen, batch_size=1)
    sixteen = evaluation.generate(model, tok, prompts, gen, batch_size=16)
    assert one == sixteen
    assert len(set(one)) > 1


def test_a_token_budget_gives_long_items_smaller_batches():
    lengths = [900, 600, 300, 300, 100, 100, 50]  # longest first, as evaluation orders them
    batches = []
    evaluation.BatchSize(4, tokens=1000).run(list(range(len(lengths))), lambda b: batches.append([lengths[i] for i in b]),
                                             "test", length=lambda i: lengths[i])
    # rows x the batch's longest item stays within 1,000 tokens; an item longer than that goes alone
    assert batches == [[900], [600], [300, 300, 100], [100, 50]]
    batches.clear()
    evaluation.BatchSize(4, tokens=None).run(list(range(len(lengths))), lambda b: batches.append(len(b)), "test",
                                             length=lambda i: lengths[i])
    assert batches == [4, 3]  # no budget: the row cap alone


class _Widths:
    """Records (rows, width) of every forward pass that encodes more than one token a row."""

    def __init__(self, model):
        self.seen = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            self.seen.append(tuple(ids.shape))


@pytest.mark.parametrize("method", ["generate", "likelihood"])
def test_a_token_budget_keeps_outputs_and_bounds_every_batch(trained, method):
    cfg, model, tok, task, records = trained
    prompts = [task.prompt(r) for r in records]
    prompts += [p.replace(" and the ", " and then the very old and heavy ") for p in prompts[:6]]  # longer ones
    gen = OmegaConf.merge(cfg.task.generation, {"max_new_tokens": 4})
    budget = 40
    widths = _Widths(model)
    try:
        if method == "generate":
            whole = evaluation.generate(model, tok, prompts, gen, batch_size=evaluation.BatchSize(32, None))
            widths.seen.clear()
            got = evaluation.generate(model, tok, prompts, gen, batch_size=evaluation.BatchSize(32, budget),
                                      share_prefix=False)
            assert got == whole
        else:
            options = [" positive", " negative"]
            whole = evaluation.label_logprobs(model, tok, prompts, options, batch_size=evaluation.BatchSize(32, None))
            widths.seen.clear()
            got = evaluation.label_logprobs(model, tok, prompts, options, share_prefix=False,
                                            batch_size=evaluation.BatchSize(32, budget))
            assert torch.allclose(got, whole, atol=1e-5)
    finally:
        widths.handle.remove()
    assert len(widths.seen) > 2  # the budget split the prompts into several batches
    assert all(rows * width <= budget or rows == 1 for rows, width in widths.seen)


def test_multi_token_options_sum_their_token_logprobs(trained):
    _, model, tok, task, records = trained
    prompts = [task.prompt(r) for r in records[:5]]
    options = [" positive", " negative", " positive negative positive"]
    ids = evaluation.option_token_ids(tok, options)
    assert len(ids[2]) > 1
    scores = evaluation.label_logprobs(model, tok, prompts, options, batch_size=4)
    for i, p in enumerate(prompts):
        for j, opt in enumerate(ids):
            full = torch.tensor([tok(p)["input_ids"] + opt])
            with torch.no_grad():
                logp = torch.log_softmax(model(full).logits[0].float(), -1)
            n_prompt = full.shape[1] - len(opt)
            expected = sum(logp[n_prompt - 1 + t, tok_id].item() for t, tok_id in enumerate(opt))
            assert scores[i, j].item() == pytest.approx(expected, abs=1e-4)
    # one-token options take the single-pass path and agree with the pair path
    two = evaluation.label_logprobs(model, tok, prompts, options[:2], batch_size=3)
    assert torch.allclose(two, scores[:, :2], atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "falcon", "gpt_neox"])
def test_shared_prompt_prefix_is_encoded_once_and_scores_stay_exact(family, caplog):
    """Prompts with a common head (system prompt, k-shot examples) reuse its cache;
    the scores equal whole-prompt scoring, with one-token and multi-token options."""
    head = "You are a careful judge of movie reviews. Answer positive or negative.\n\n"
    tails = ["Review: a fine and warm film", "Review: dull", "Review: the plot never lands, sadly",
             "Review: great cast", "Review: I left early"]
    prompts = [head + t + "\nAnswer:" for t in tails]
    tok = tiny.build_tokenizer(prompts * 4 + [" positive negative"], 400)
    config = tiny.build_config(family, len(tok), tok, hidden_size=32, num_layers=2, num_heads=4,
                               intermediate_size=64)
    model = tiny.build_model(config, seed=0)
    ids = tok(prompts)["input_ids"]
    prefix = evaluation._shared_prefix(ids)
    assert len(prefix) >= evaluation.MIN_SHARED_PREFIX
    assert evaluation._Forward(model, 0, torch.device("cpu"), prefix).cache is not None  # the cached path runs
    for options in ([" positive", " negative"], [" positive", " negative negative"]):
        shared = evaluation.label_logprobs(model, tok, prompts, options, batch_size=2)
        whole = evaluation.label_logprobs(model, tok, prompts, options, batch_size=2, share_prefix=False)
        assert torch.allclose(shared, whole, atol=1e-4), (family, options)
        one = evaluation.label_logprobs(model, tok, prompts[1:2], options, batch_size=1, share_prefix=False)
        assert torch.allclose(shared[1:2], one, atol=1e-4)  # padding changes nothing
    assert "prefix not shared" not in caplog.text  # the cache path ran, no fallback


def test_no_shared_prefix_below_the_minimum():
    assert evaluation._shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5]]) == []
    long = list(range(20))
    assert evaluation._shared_prefix([long + [7], long + [8, 9]]) == long
    assert evaluation._shared_prefix([long, long + [1]]) == long[:-1]  # every row keeps a token of its own


def test_k_shot_prompt_holds_exactly_k_examples_and_never_the_evaluated_one():
    cfg = compose_cfg(["task=sentiment"], fast=False)
    task = build_task(cfg.task)
    pool = [{"text": f"review number {i}", "label": i % 2} for i in range(12)]
    k = 3
    prompts = evaluation.build_prompts(task, pool, k, pool, seed=7)
    first_shots = evaluation.pick_shots(pool, k, seed=7)
    for rec, prompt in zip(pool, prompts):
        shown = [r for r in pool if f"Review: {r['text']}\n" in prompt and r is not rec]
        assert prompt.count("Review: ") == k + 1, prompt
        assert prompt.count(f"Review: {rec['text']}\n") == 1  # only as the question
        assert len(shown) == k
        if rec not in first_shots:  # the fixed shots, unless the evaluated one is among them
            assert [s["text"] for s in first_shots] == [r["text"] for r in sorted(
                shown, key=lambda r: prompt.index(f"Review: {r['text']}\n"))]
    assert evaluation.build_prompts(task, pool[:2], 0, pool) == [task.prompt(r) for r in pool[:2]]
    with pytest.raises(ConfigError, match="eval.shots=12"):
        evaluation.build_prompts(task, pool[:1], 12, pool)


def test_k_shot_prompts_fit_the_window_with_whole_shots():
    cfg = compose_cfg(["task=summarization"], fast=False)
    # shots of very different lengths: the long ones cannot fit beside a dialogue
    pool = [{"dialogue": " ".join(["word"] * (400 if i % 3 == 0 else 20)) + f" end{i}", "summary": f"sum {i}"}
            for i in range(30)]
    tok = tiny.build_tokenizer([r["dialogue"] + " " + r["summary"] for r in pool] + ["Summarize the following "
                                "conversation. Summary:"], vocab_size=300)
    task = build_task(cfg.task, tokenizer=tok)
    records = pool[:6]
    window = 300
    prompts, used = evaluation.shot_prompts(task, records, 3, pool, seed=1, max_tokens=window)
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    for rec, prompt, n, length in zip(records, prompts, used, lengths):
        if len(tok(task.prompt(rec))["input_ids"]) > window:  # the example alone is longer: no shots
            assert n == 0 and prompt == task.prompt(rec)
            continue
        assert length <= window and n == 3 == prompt.count("Summary:") - 1, (length, n)
        shown = [r for r in pool if r is not rec and f"{r['dialogue']}\n\nSummary: {r['summary']}" in prompt]
        assert len(shown) == n  # every shot whole, with its summary
    unbounded, all_k = evaluation.shot_prompts(task, records, 3, pool, seed=1)
    assert all_k == [3] * 6 and max(len(tok(p)["input_ids"]) for p in unbounded) > window  # the window did it


def test_surface_forms_scoring_sums_each_labels_forms(trained):
    """label_scoring=surface_forms: a label's score is the total probability of its own forms."""
    cfg, trained_model, tok, task, records = trained
    model = tiny.build_model(trained_model.config, seed=1).eval()  # untrained: every form has a real share
    prompts = [task.prompt(r) for r in records[:6]]
    cfg = OmegaConf.merge(cfg, {"eval": {"label_scoring": "surface_forms"}})
    got = evaluation.label_scores(model, tok, task, prompts, records[0], cfg.eval)
    answers = [task.completion({**records[0], task.cfg.target: k}) for k in task.label_keys]
    per_form = [evaluation.label_logprobs(model, tok, prompts, evaluation.surface_forms(a),
                                          join=lambda prompt, form: form) for a in answers]
    expected = torch.stack([torch.logsumexp(p, dim=1) for p in per_form], dim=1)
    best_form = torch.stack([p.max(dim=1).values for p in per_form], dim=1)
    assert got.shape == (len(prompts), len(answers))
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert (got - best_form).abs().max() > 1e-3  # the other forms add to the total


def test_surface_forms_cover_case_and_leading_space():
    assert evaluation.surface_forms(" positive") == ["positive", " positive", "Positive", " Positive"]
    assert evaluation.surface_forms("Yes") == ["Yes", " Yes", "yes", " yes"]


def test_options_after_a_prompt_are_the_tokens_past_the_prompt(trained):
    """Encoded after the prompt itself, an option is exactly what prompt+answer adds."""
    _, _, tok, task, records = trained
    prompt = task.prompt(records[0])
    for opt in (" positive", "positive", "\nnegative"):
        context, (ids,) = evaluation.answer_split(tok, prompt, [opt])
        whole = tok(prompt + opt)["input_ids"]
        assert whole[len(whole) - len(ids):] == ids and whole[: len(whole) - len(ids)] == tok(prompt)["input_ids"]
        assert context == tok(prompt)["input_ids"]


def test_an_answer_that_merges_with_the_prompts_last_space_is_scored_as_written(trained):
    """A prompt ending in a space: 'Answer: ' + 'positive' encodes as 'Answer:' + ' positive', so the
    answer's token is scored after 'Answer:', exactly as training sees that text."""
    from ftexp.tasks.base import join_answer

    _, model, tok, task, records = trained
    prompts = [task.prompt(r) + " Answer: " for r in records[:4]]
    options = [" positive", " negative"]
    scores = evaluation.label_logprobs(model, tok, prompts, options, batch_size=3, join=join_answer)
    merged = 0
    for i, p in enumerate(prompts):
        head = tok(p)["input_ids"]
        for j, opt in enumerate(options):
            whole = tok(p + join_answer(p, opt))["input_ids"]
            k = next((n for n, (a, b) in enumerate(zip(head, whole)) if a != b), min(len(head), len(whole)))
            merged += k < len(head)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            expected = sum(logp[t - 1, whole[t]].item() for t in range(k, len(whole)))
            assert scores[i, j].item() == pytest.approx(expected, abs=1e-4)
    assert merged, "the tokenizer never merged the space: the case is not exercised"


# ----------------------------------------------------------------------------- generation from a shared prefix

class _ForwardLog:
    """Records the input_ids shape of every forward call of a model."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        self.prefixes: list[list[int]] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:  # an encoder-decoder's later steps: decoder tokens only
            ids = kwargs["decoder_input_ids"]
        self.shapes.append(tuple(ids.shape))
        if ids.shape[0] == 1:
            self.prefixes.append(ids[0].tolist())

    def tokens(self) -> int:
        return sum(b * n for b, n in self.shapes)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generation_from_a_shared_prefix_equals_whole_prompts(trained_with_head, num_beams):
    """Prompts sharing a long instruction and k-shot head: each batch generates from a
    copy of the head's cache, and the predictions are those of plain left-padded
    whole prompts, at any batch size."""
    cfg, model, tok, task, records = trained_with_head
    prompts = [HEAD + task.prompt(r) for r in records]
    prompts += [p.replace(" and the ", " and then the old ") for p in prompts[:6]]  # other lengths
    ids = tok(prompts)["input_ids"]
    prefix = evaluation._shared_prefix(ids)
    assert len(prefix) >= 16
    assert evaluation._prefix_cache(model, prefix, torch.device("cpu"), "generation") is not None  # shared path
    assert len({len(i) for i in ids}) > 1  # a batch of 5 mixes lengths: padding after the prefix
    gen = OmegaConf.merge(cfg.task.generation, {"max_new_tokens": 6, "num_beams": num_beams})
    whole = evaluation.generate(model, tok, prompts, gen, batch_size=5, share_prefix=False)
    for batch_size in (1, 5, 32):
        assert evaluation.generate(model, tok, prompts, gen, batch_size=batch_size) == whole, batch_size
    assert [task.clean_prediction(w) for w in whole[:len(records)]] == [task.reference(r) for r in records]


@pytest.mark.parametrize("family", ["llama", "falcon", "gpt_neox"])
def test_generation_from_a_shared_prefix_runs_the_prefix_once(family):
    """The common head goes through the model once; every batch then processes only
    its prompts' own tokens, and the outputs equal whole-prompt generation."""
    head = "<|im_start|>system\nYou are a careful judge of movie reviews. Answer positive or negative.<|im_end|>\n"
    tails = ["a fine and warm film", "dull", "the plot never lands, sadly", "great cast", "I left early",
             "an hour too long and not one scene that earns it"]
    prompts = [head + f"<|im_start|>user\nReview: {t}<|im_end|>\n<|im_start|>assistant\n" for t in tails]
    tok = tiny.build_tokenizer(prompts * 4, 400)
    config = tiny.build_config(family, len(tok), tok, hidden_size=32, num_layers=2, num_heads=4,
                               intermediate_size=64)
    model = tiny.build_model(config, seed=0)
    gen = OmegaConf.create({"max_new_tokens": 5, "do_sample": False, "temperature": 1.0, "top_p": 1.0,
                            "num_beams": 1, "stop": []})
    prefix = evaluation._shared_prefix(tok(prompts)["input_ids"])
    assert len(prefix) >= 16

    calls = _ForwardLog(model)
    whole = evaluation.generate(model, tok, prompts, gen, batch_size=4, share_prefix=False)
    whole_tokens = calls.tokens()
    calls.shapes.clear()
    calls.prefixes.clear()
    shared = evaluation.generate(model, tok, prompts, gen, batch_size=4)
    calls.handle.remove()

    assert shared == whole
    assert calls.prefixes == [prefix]  # the only one-row call: the prefix, once
    batches = [4, 2]
    # each batch skips the prefix for all its rows; the prefix itself runs once
    assert calls.tokens() == whole_tokens - sum(batches) * len(prefix) + len(prefix)


def test_no_prefix_sharing_for_encoder_decoder_models():
    head = "summarize the dialogue in one sentence, naming who says what:\n"
    prompts = [head + "the cat sat on the mat", head + "a dog ran in the park"]
    tok = tiny.build_tokenizer(prompts * 4, 300)
    assert len(evaluation._shared_prefix(tok(prompts)["input_ids"])) >= evaluation.MIN_SHARED_PREFIX
    config = tiny.build_config("t5", len(tok), tok, hidden_size=32, num_layers=2, num_heads=4,
                               intermediate_size=64)
    model = tiny.build_model(config, seed=0)
    gen = OmegaConf.create({"max_new_tokens": 3, "do_sample": False, "temperature": 1.0, "top_p": 1.0,
                            "num_beams": 1, "stop": []})
    calls = _ForwardLog(model)
    evaluation.generate(model, tok, prompts, gen, batch_size=2)
    calls.handle.remove()
    assert calls.shapes and not calls.prefixes  # no one-row prefix pass


# ----------------------------------------------------------------------------- out-of-memory back-off

class _MemoryLimit:
    """Makes a model raise an out-of-memory error for batches of more than ``rows`` rows."""

    def __init__(self, model, rows: int, error=lambda: torch.cuda.OutOfMemoryError("CUDA out of memory.")):
        self.rows, self.error, self.refused = rows, error, 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids.shape[0] > self.rows:
            self.refused += 1
            raise self.error()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_generation_halves_the_batch_on_out_of_memory_and_keeps_the_outputs(trained_with_head, caplog):
    cfg, model, tok, task, records = trained_with_head
    prompts = [HEAD + task.prompt(r) for r in records]
    gen = OmegaConf.merge(cfg.task.generation, {"max_new_tokens": 4})
    expected = evaluation.generate(model, tok, prompts, gen, batch_size=16)
    size = evaluation.BatchSize(16)
    with _MemoryLimit(model, 3) as limit, caplog.at_level("WARNING", logger="ftexp.evaluation"):
        got = evaluation.generate(model, tok, prompts, gen, batch_size=size)
    assert got == expected
    assert size.size == 2 and limit.refused == 3  # 16 -> 8 -> 4 -> 2, then it fits
    assert "out of memory at batch size 16" in caplog.text and "retrying at batch size 2" in caplog.text


def test_likelihood_halves_the_batch_on_out_of_memory_and_keeps_the_scores(trained, caplog):
    _, model, tok, task, records = trained
    prompts = [task.prompt(r) for r in records]
    for options in ([" positive", " negative"], [" positive", " negative positive"]):  # both scoring paths
        expected = evaluation.label_logprobs(model, tok, prompts, options, batch_size=8)
        size = evaluation.BatchSize(8)
        # a message that says "out of memory" counts as well as the CUDA error type
        with _MemoryLimit(model, 2, lambda: RuntimeError("HIP out of memory. Tried to allocate 1 GiB")):
            got = evaluation.label_logprobs(model, tok, prompts, options, batch_size=size)
        assert torch.allclose(got, expected, atol=1e-5)
        assert size.size == 2
    assert "likelihood: out of memory at batch size 8" in caplog.text


def test_out_of_memory_at_batch_size_1_fails_and_other_errors_are_not_retried(trained):
    cfg, model, tok, task, records = trained
    prompts = [task.prompt(r) for r in records[:4]]
    with _MemoryLimit(model, 0) as limit, pytest.raises(torch.cuda.OutOfMemoryError):
        evaluation.generate(model, tok, prompts, cfg.task.generation, batch_size=4)
    assert limit.refused == 3  # at 4, 2, then 1 row
    with _MemoryLimit(model, 0, lambda: ValueError("bad input")) as limit, pytest.raises(ValueError):
        evaluation.label_logprobs(model, tok, prompts, [" positive", " negative"], batch_size=4)
    assert limit.refused == 1


def test_a_halved_batch_size_holds_for_the_rest_of_the_evaluation(trained, caplog):
    cfg, model, tok, task, records = trained
    with open_dict(cfg):
        cfg.eval.method = EvalMethod.both
    expected, _ = evaluation.evaluate(cfg, model, tok, task, records)
    with _MemoryLimit(model, 4), caplog.at_level("WARNING", logger="ftexp.evaluation"):
        metrics, _ = evaluation.evaluate(cfg, model, tok, task, records)
    assert metrics["eval/accuracy"] == expected["eval/accuracy"] == 1.0
    assert metrics["eval/likelihood_accuracy"] == 1.0
    assert "generation: out of memory at batch size 16" in caplog.text
    assert "likelihood: out of memory" not in caplog.text  # it started at the generation's smaller size
