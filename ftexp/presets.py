"""What the architectures shipped with the model presets give offline.

Each ``ftexp/model_configs/<name>.json`` holds the published ``config.json`` values of a preset's
model (conf/model/<name>.yaml names it in ``model.preset_config``; ``ftexp.architecture``
reads it). Built on the meta device they yield, with no weights and no network, the
parameter count the memory check needs and the trainable-parameter count of a LoRA
setup, through the same target discovery and peft wrapping a real run uses. The
command line prints that count and the weights' memory estimate for a composed config:

    python -m ftexp.presets experiment=samsum_falcon_7b_qlora
    python -m ftexp.presets model=llama2_7b lora=default lora.r=32 lora.include_lm_head=true
"""

from __future__ import annotations

import sys

from hydra import compose as hydra_compose, initialize_config_dir
from omegaconf import OmegaConf

from ftexp import architecture, memory, modeling
from ftexp.config import register_configs
from ftexp.errors import ConfigError


def count_trainable(model_cfg, lora_cfg) -> dict:
    """Trainable parameters of ``lora_cfg`` applied to the preset's architecture, offline.

    Quantization does not change the count (adapters are full precision, the frozen
    base is counted at its unpacked size), so the model is built unquantized.
    """
    if not model_cfg.get("preset_config"):
        raise ConfigError(
            f"model={model_cfg.name} has no model.preset_config: offline counts need an architecture file in "
            f"ftexp/model_configs/ (one of {architecture.shipped()})."
        )
    model = architecture.preset_meta_model(model_cfg.preset_config)
    base_total = architecture.parameter_count(model)
    targets: list[str] = []
    if lora_cfg.enabled:
        model = modeling.attach_adapters(model, lora_cfg, OmegaConf.create({"name": "none"}))
        targets = sorted(model.peft_config["default"].target_modules)
    trainable, total = architecture.count_parameters(model)
    return {"trainable": trainable, "total": total, "base_total": base_total,
            "trainable_pct": 100 * trainable / total, "targets": targets}


def compose(overrides: list[str]):
    """The run config ``train.py`` would compose from the repository's conf/ with ``overrides``."""
    conf = architecture.MODEL_CONFIG_DIR.parents[1] / "conf"
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
    split = memory.split_of(architecture.preset_meta_model(cfg.model.preset_config))
    dtype = architecture.load_dtype(cfg.model, cfg.quant, "cuda")
    if dtype == "auto":
        split.checkpoint_dtype = architecture.checkpoint_dtype(architecture.load_config(cfg.model.preset_config))
    print(f"weights on a GPU with quant={cfg.quant.name}: ~{memory.estimate_mb(split, cfg.quant, dtype):,.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
