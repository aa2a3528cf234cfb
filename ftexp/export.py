"""Export a trained run as a standalone transformers model, with a model card.

    python -m ftexp.export run=outputs/runs/sst2_n100                 # -> <run>/export/
    python -m ftexp.export run=<run dir> out=merged dtype=bfloat16
    python -m ftexp.export run=<run dir> push_to_hub=<user>/<repo>

A LoRA run's adapter is merged into its base model (peft's ``merge_and_unload``); a full
fine-tune's model is saved again as it is. A QLoRA or int8 run merges into the base model
loaded unquantized, in ``dtype`` (default: the base model's own), and the card says so: the
merged weights are the adapter on full-precision weights, not on the quantized ones it was
trained with. The folder holds the weights, config, generation config, tokenizer and chat
template, and ``README.md``: the model card (base model, data, metrics, the run's config and
the command that trains it again). ``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM`` load
it with nothing from ftexp.

``push_to_hub=<repo>`` uploads the folder; when that fails (offline, no token, no rights)
the folder stays and the command exits with the reason.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from ftexp import files, identity, modeling, records
from ftexp.config import QuantName, load_run_config, register_configs
from ftexp.errors import ConfigError

KEYS = {"run": "the run folder train.py wrote (required)",
        "out": "where the model goes (default: <run>/export)",
        "dtype": "float32 | bfloat16 | float16 | auto (the base model's own; default)",
        "push_to_hub": "a Hub repository id to upload the folder to (default: none)"}
DTYPES = ("auto", "float32", "bfloat16", "float16")
# group choices a run's config records by name: enough to compose its defaults again
GROUPS = ("model", "data", "task", "quant", "lora")


def parse(argv: list[str]) -> dict:
    """``key=value`` arguments, each key one of ``KEYS``."""
    args = {}
    for token in argv:
        key, eq, value = token.partition("=")
        if not eq or key not in KEYS:
            valid = "; ".join(f"{k}=<{v}>" for k, v in KEYS.items())
            raise ConfigError(f"{token!r}: not an export setting. Valid settings: {valid}.")
        args[key] = value
    if not args.get("run"):
        raise ConfigError("run=<run dir> is required: the folder train.py wrote.")
    if args.get("dtype", "auto") not in DTYPES:
        raise ConfigError(f"dtype={args['dtype']}: one of {', '.join(DTYPES)}.")
    return args


def load_merged(cfg, run: Path, dtype: str):
    """(model, tokenizer, how): the run's model as plain transformers weights on the CPU."""
    q = cfg.quant
    trained_on = None if q.name == "none" else ("4-bit " + str(q.bnb_4bit_quant_type) if q.load_in_4bit else "8-bit")
    with open_dict(cfg):
        if dtype != "auto":
            cfg.model.dtype = dtype
        q.name, q.load_in_8bit, q.load_in_4bit = QuantName.none, False, False
    model, tokenizer = modeling.load_trained(cfg, run, "cpu")
    if not cfg.lora.enabled:
        return model, tokenizer, "the fully fine-tuned weights, saved as they were trained"
    merged = model.merge_and_unload()
    how = "the LoRA adapter merged into the base model's weights (peft merge_and_unload)"
    if trained_on:
        how += (f"; the run trained the adapter on a {trained_on} base, and it is merged here into the "
                f"unquantized base loaded in {next(merged.parameters()).dtype}, so outputs can differ slightly "
                "from the run's own evaluation")
    return merged, tokenizer, how


def training_command(saved: dict) -> str:
    """``python train.py`` with the group choices and every setting that differs from their defaults."""
    choices = [f"{g}={saved[g]['name']}" for g in GROUPS if isinstance(saved.get(g), dict) and saved[g].get("name")]
    conf = Path(__file__).resolve().parents[1] / "conf"
    try:
        register_configs()
        with initialize_config_dir(config_dir=str(conf)):
            defaults = OmegaConf.to_container(compose(config_name="config", overrides=choices), resolve=True)
    except Exception:  # a group choice this checkout does not have: the choices alone
        return " ".join(["python train.py", *choices])
    known = identity.flatten(defaults)
    changed = [f"{'' if key in known else '++'}{key}={_value(new)}"
               for key, _, new in identity.config_differences(defaults, saved)
               if not key.startswith(("logger.", "output_dir", "run_name", "cache_dir", "device"))]
    return " ".join(["python train.py", *choices, *(shlex.quote(c) for c in changed)])


def _value(v) -> str:
    """A value as a Hydra override writes it: null, true/false, [lists] and {dicts} as JSON does."""
    return json.dumps(v) if v is None or isinstance(v, (bool, list, dict)) else str(v)


def model_card(cfg, saved: dict, metrics: dict, how: str, run: Path, out: Path):
    from huggingface_hub import ModelCard, ModelCardData

    base = str(cfg.model.name_or_path)
    base = base if not base.startswith(("pypi:", ".", "/", "~")) else f"{base} ({cfg.model.get('gguf_file') or ''})"
    data = ModelCardData(
        library_name="transformers",
        base_model=str(cfg.model.name_or_path) if "/" in base and not base.startswith(("/", ".")) else None,
        tags=["ftexp", "lora" if cfg.lora.enabled else "full-fine-tune", str(cfg.task.kind)],
        model_name=run.name,
    )
    shown = {k: v for k, v in sorted(metrics.items()) if k.startswith(("eval/", "judge/", "train/loss"))
             and isinstance(v, (int, float))}
    rows = "\n".join(f"| `{k}` | {v:.4g} |" for k, v in shown.items())
    config_yaml = yaml.safe_dump({k: v for k, v in saved.items() if k not in ("logger", "hydra")}, sort_keys=False)
    n_eval = metrics.get("eval/n")
    length = f"{cfg.train.max_steps} steps" if cfg.train.max_steps else f"{cfg.train.epochs:g} epochs"
    text = f"""---
{data.to_yaml()}
---

# {run.name}

Fine-tuned with ftexp from **{base}** (preset `{cfg.model.name}`) on **{cfg.data.name}**
({cfg.train.n if cfg.train.n is not None else 'all'} training rows, {length}, task `{cfg.task.name}`), from the
run `{run.name}`.

These weights are {how}.

## Results

Measured by the run on {n_eval if n_eval is not None else 'its'} evaluation rows (`{cfg.objective}` is the run's objective):

| metric | value |
|---|---|
{rows}

## Train it again

```bash
{training_command(saved)}
```

## Use it

```python
from transformers import AutoModelFor{'Seq2SeqLM' if cfg.model.arch == 'seq2seq' else 'CausalLM'}, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{out}")
model = AutoModelFor{'Seq2SeqLM' if cfg.model.arch == 'seq2seq' else 'CausalLM'}.from_pretrained("{out}")
```

## The run's config

```yaml
{config_yaml}```
"""
    return ModelCard(text)


def export(args: dict) -> Path:
    run = Path(args["run"]).expanduser()
    cfg = load_run_config(run)
    out = Path(args.get("out") or run / "export").expanduser()
    if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents and out.name in (
            "adapter", "model", "base_model", "checkpoints"):
        raise ConfigError(f"out={out}: that is the run's own folder; export into a folder of its own.")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    metrics = records.read_metrics(run) or {}
    model, tokenizer, how = load_merged(cfg, run, args.get("dtype", "auto"))
    with files.atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model_card(cfg, saved, metrics, how, run, out).save(tmp / "README.md")
    print(f"[ftexp] exported {run} to {out}: {how}", flush=True)
    if args.get("push_to_hub"):
        push(out, args["push_to_hub"])
    return out


def push(out: Path, repo: str) -> None:
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=repo)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"push_to_hub={repo}: the upload failed ({type(err).__name__}: {reason}). The exported "
                          f"folder is kept at {out}; upload it later with: huggingface-cli upload {repo} {out}") from err
    print(f"[ftexp] uploaded {out} to https://huggingface.co/{repo}", flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        export(parse(sys.argv[1:] if argv is None else argv))
    except ConfigError as err:
        print(f"ftexp: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
