"""Architecture configs shipped with the model presets, and what they give offline.

Each ``<name>.json`` here holds the published ``config.json`` values of a preset's
model (conf/model/<name>.yaml names it in ``model.preset_config``). Built on the
meta device they yield, with no weights and no network, the parameter count the
memory check needs and the trainable-parameter count of a LoRA setup, through the
same target discovery and peft wrapping a real run uses. The command line prints
that count and the weights' memory estimate for a composed config:

    python -m ftexp.presets experiment=samsum_falcon_7b_qlora
    python -m ftexp.presets model=llama2_7b lora=default lora.r=32 lora.include_lm_head=true
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

from ftexp.config import ConfigError

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent


def preset_path(name: str) -> Path:
    """``name`` may be a file here (with or without .json) or a path to a config.json."""
    candidates = [Path(name), PRESET_DIR / name, PRESET_DIR / f"{name}.json"]
    for path in candidates:
        if path.is_file():
            return path
    shipped = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
    raise ConfigError(f"model.preset_config={name!r}: no such file. Shipped architectures: {shipped}.")


def _read(name: str) -> dict:
    raw = json.loads(preset_path(name).read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}  # "_source" etc. are notes


def load_config(name: str):
    """A transformers config from a shipped architecture file (or any config.json)."""
    from transformers import AutoConfig

    raw = _read(name)
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise ConfigError(f"model.preset_config={name!r} has no model_type; it is not a transformers config.json.")
    raw.pop("architectures", None)
    return AutoConfig.for_model(model_type, **raw)


def meta_model(config, tie_word_embeddings: bool | None = None):
    """The model of ``config`` on the meta device: shapes only, no memory, no weights.

    transformers 5 always ties T5's output head to its embeddings when it builds
    from a config, while a checkpoint with its own lm_head (flan-t5) loads untied;
    ``tie_word_embeddings=False`` unties the head so the count matches the checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
        if tie_word_embeddings is False:
            head, embed = model.get_output_embeddings(), model.get_input_embeddings()
            if head is not None and embed is not None and head.weight is embed.weight:
                head.weight = torch.nn.Parameter(torch.empty_like(head.weight))
    return model


def preset_meta_model(name: str):
    """Meta-device model of a shipped architecture, tied or untied as its config.json says."""
    return meta_model(load_config(name), tie_word_embeddings=_read(name).get("tie_word_embeddings"))


def unique_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def count_trainable(model_cfg, lora_cfg) -> dict:
    """Trainable parameters of ``lora_cfg`` applied to the preset's architecture, offline.

    Quantization does not change the count (adapters are full precision, the frozen
    base is counted at its unpacked size), so the model is built unquantized.
    """
    from ftexp import modeling

    if not model_cfg.get("preset_config"):
        raise ConfigError(
            f"model={model_cfg.name} has no model.preset_config: offline counts need an architecture file in "
            f"ftexp/presets/ (one of {sorted(p.stem for p in PRESET_DIR.glob('*.json'))})."
        )
    model = preset_meta_model(model_cfg.preset_config)
    base_total = unique_parameters(model)
    targets: list[str] = []
    if lora_cfg.enabled:
        from omegaconf import OmegaConf

        none = OmegaConf.create({"name": "none"})
        model = modeling.attach_adapters(model, lora_cfg, none)
        targets = sorted(model.peft_config["default"].target_modules)
    trainable, total = modeling.count_parameters(model)
    return {"trainable": trainable, "total": total, "base_total": base_total,
            "trainable_pct": 100 * trainable / total, "targets": targets}


def compose(overrides: list[str]):
    """The run config ``train.py`` would compose from the repository's conf/ with ``overrides``."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from ftexp.config import register_configs

    conf = PRESET_DIR.parents[1] / "conf"
    if not conf.is_dir():
        raise ConfigError(f"no conf/ folder at {conf}: run from a source checkout of ftexp.")
    register_configs()
    with initialize_config_dir(config_dir=str(conf)):
        return hydra_compose(config_name="config", overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg = compose(argv)
        counts = count_trainable(cfg.model, cfg.lora)
    except ConfigError as err:
        print(f"ftexp: error: {err}", file=sys.stderr)
        return 2
    adapter = (f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} on {', '.join(counts['targets'])}"
               if cfg.lora.enabled else "full fine-tune")
    print(f"{cfg.model.name} ({cfg.model.preset_config}), {adapter}")
    print(f"trainable params: {counts['trainable']:,} || all params: {counts['total']:,} "
          f"|| trainable%: {counts['trainable_pct']:.4f}")
    from ftexp import memory, modeling

    split = memory.split_of(preset_meta_model(cfg.model.preset_config))
    dtype = modeling.load_dtype(cfg.model, cfg.quant, "cuda")
    if dtype == "auto":
        split.checkpoint_dtype = memory.checkpoint_dtype(load_config(cfg.model.preset_config))
    print(f"weights on a GPU with quant={cfg.quant.name}: ~{memory.estimate_mb(split, cfg.quant, dtype):,.0f} MB")
    return 0

