"""Every study's experiment preset runs end to end on the CPU: 2 training steps plus
evaluation, with the model swapped for the offline tiny twin of the same family
(quantization kept, computing in float32) and the data swapped for the real files
beside the repository or small synthetic tables of the same layout."""

from __future__ import annotations

import json
import random

import pytest

from conftest import CONF, SHARED_DATA, compose_cfg
from ftexp import recipes

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
TWINS = {"llama": "tiny", "falcon": "tiny_falcon", "t5": "tiny_t5", "gpt_neox": "tiny_gpt_neox"}

# A twin small enough for seconds per run; 64 is bitsandbytes' block size.
SHRINK = [
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=128",
    "model.tiny.num_heads=4",
    "model.tiny.vocab_size=1000",
    "model.tiny.tokenizer_max_texts=300",
    "train.max_steps=2",
    "train.batch_size=2",
    "train.grad_accum=1",
    "train.logging_steps=1",
    "train.warmup_steps=0",
    "train.fp16=false",
    "train.bf16=false",
    "train.n=8",
    "eval.n=4",
    "eval.batch_size=4",
    "task.generation.max_new_tokens=12",
    "cache_dir=null",
]

WORDS = ("the cat sat on a mat while Anna and Tom talked about lunch plans work trains weather "
         "music films books tomorrow meeting office coffee late early").split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_samsum(folder):
    """SAMSum's own layout: train.json / test.json lists of {id, dialogue, summary}."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 24), ("test", 8)):
        rows = [{"id": f"{split}{i}",
                 "dialogue": "\r\n".join(f"{rng.choice(['Anna', 'Tom'])}: {_sentence(rng, 8)}" for _ in range(4)),
                 "summary": _sentence(rng, 10)} for i in range(n)]
        (folder / f"{split}.json").write_text(json.dumps(rows))
    return folder


def write_commonlit(folder):
    """The Kaggle competition's two CSVs: prompts and scored student summaries."""
    import pandas as pd

    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    prompts = pd.DataFrame([{"prompt_id": f"p{i}", "prompt_question": _sentence(rng, 8),
                             "prompt_title": _sentence(rng, 3), "prompt_text": " ".join(_sentence(rng, 12) for _ in range(4))}
                            for i in range(3)])
    summaries = pd.DataFrame([{"student_id": f"s{i}", "prompt_id": f"p{i % 3}", "text": _sentence(rng, 20),
                               "content": round(rng.uniform(-2, 3), 3), "wording": round(rng.uniform(-2, 3), 3)}
                              for i in range(40)])
    prompts.to_csv(folder / "prompts_train.csv", index=False)
    summaries.to_csv(folder / "summaries_train.csv", index=False)
    return folder


def data_override(name: str, tmp_path) -> list[str]:
    shared = {"sst2": SHARED_DATA / "SST-2", "dialogsum": SHARED_DATA / "dialogsum",
              "lamini_docs": SHARED_DATA / "lamini_docs" / "lamini_docs.jsonl"}
    if name in shared:
        if not shared[name].exists():
            pytest.skip(f"real {name} files (shared/data beside the repository) are not present")
        return [f"data.path={shared[name]}"]
    if name == "samsum":
        return [f"data.path={write_samsum(tmp_path / 'samsum')}"]
    if name == "commonlit":
        return [f"data.path={write_commonlit(tmp_path / 'commonlit')}"]
    raise AssertionError(f"no test data for data={name}: add it here")


def twin_cfg(experiment: str, tmp_path):
    preset = compose_cfg([f"experiment={experiment}"], fast=False)
    overrides = [f"experiment={experiment}", f"model={TWINS[preset.model.family]}", *SHRINK,
                 *data_override(preset.data.name, tmp_path)]
    if preset.quant.name == "nf4":
        overrides.append("quant.bnb_4bit_compute_dtype=float32")
    if preset.judge.name == "openai":  # its server is the user's to name (tests/test_judge_server.py)
        overrides.append("judge=none")
    return preset, compose_cfg(overrides, tmp_path / "run", fast=False)


def test_every_study_has_a_preset():
    assert set(EXPERIMENTS) >= {"sst2_llama2_13b_qlora", "commonlit_llama2_7b_int8", "dialogsum_flan_t5_lora",
                                "dialogsum_flan_t5_full", "samsum_falcon_7b_qlora", "lamini_docs_pythia_70m"}


def test_twin_keeps_what_the_preset_sets_but_the_model(tmp_path):
    preset, cfg = twin_cfg("commonlit_llama2_7b_int8", tmp_path)
    assert cfg.model.name == "tiny" and cfg.model.family == preset.model.family
    assert cfg.quant == preset.quant and cfg.lora == preset.lora
    assert cfg.task.template == preset.task.template
    assert cfg.train.learning_rate == preset.train.learning_rate and cfg.train.optimizer == "paged_adamw_8bit"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_on_its_tiny_twin(experiment, tmp_path):
    preset, cfg = twin_cfg(experiment, tmp_path)
    metrics = recipes.finetune(cfg)
    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text()).keys() == metrics.keys()
    assert (run / "predictions.jsonl").exists() and (run / "train_log.jsonl").exists()
    assert metrics["train/steps"] == 2 and metrics["eval/n"] == 4
    assert cfg.objective in metrics  # the sweeper's metric exists (it may be null for garbage output)
    assert metrics["train/trainable_params"] > 0 and 0 < metrics["train/trainable_pct"] <= 100
    assert (metrics["train/trainable_pct"] == 100) == (not preset.lora.enabled)
    # quantization really applied: the loaded weights take what the estimate says
    assert metrics["model/weight_memory_mb"] == pytest.approx(metrics["model/weight_memory_est_mb"], rel=0.05)
    assert (run / ("adapter" if preset.lora.enabled else "model")).is_dir()
