"""Facts about model architectures, known without loading any weights.

Which modules are linear layers (bitsandbytes' 8- and 4-bit ones included), which
module is the output head, the dtype weights load in, and the architectures shipped
with the model presets (``ftexp/model_configs/<name>.json``, the published
``config.json`` values) built on the meta device: shapes only, no memory, no
network. Loading, the memory check and the preset counts all build on this module;
it builds on none of them.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from ftexp.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"


# ----------------------------------------------------------------------------- dtypes


def parse_dtype(name: str, key: str = "model.dtype"):
    """The torch dtype called ``name``, or "auto"; ``key`` is the setting an error names."""
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise ConfigError(f"{key}={name!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_dtype(mcfg, qcfg, device: str):
    """The dtype weights are loaded in (what is not quantized stays in it).

    nf4 computes in ``quant.bnb_4bit_compute_dtype``; int8 on a CPU keeps the rest
    in float32; float16 on a CPU becomes float32. "auto" = the checkpoint's dtype.
    """
    dtype = parse_dtype(mcfg.dtype)
    if qcfg.name == "nf4":
        dtype = parse_dtype(qcfg.bnb_4bit_compute_dtype, "quant.bnb_4bit_compute_dtype")
    elif qcfg.name == "int8" and device == "cpu" and dtype == "auto":
        dtype = torch.float32
    if device == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    return dtype


def gguf_dtype(mcfg):
    """The dtype a GGUF checkpoint is dequantized to: model.dtype, float32 for auto."""
    dtype = parse_dtype(mcfg.dtype)
    return torch.float32 if dtype == "auto" else dtype


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype a transformers config says its weights are stored in, when it is one of ``DTYPES``."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in DTYPES.values() else None


# ----------------------------------------------------------------------------- modules


def linear_kinds() -> tuple[type, ...]:
    """Module classes that count as linear layers: torch's and bitsandbytes' 8/4-bit ones."""
    kinds = [torch.nn.Linear]
    try:
        import bitsandbytes as bnb
        kinds += [bnb.nn.Linear8bitLt, bnb.nn.Linear4bit]
    except ImportError:  # bitsandbytes is optional for unquantized runs
        pass
    return tuple(kinds)


def output_head(model):
    """The module that projects to the vocabulary (lm_head, embed_out, ...), or None."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def output_head_name(model) -> str | None:
    """Last path component of the output head's name, if the model has one."""
    head = output_head(model)
    if head is None:
        return None
    return next((name.split(".")[-1] for name, module in model.named_modules() if module is head), None)


def forward_params(model) -> set[str]:
    """The keyword arguments the model's own forward takes (under a PEFT wrapper too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return set(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):
        return set()


def takes_logits_to_keep(model) -> bool:
    """Whether the forward can run its output head on chosen positions only (``logits_to_keep``)."""
    return "logits_to_keep" in forward_params(model)


def parameter_count(model) -> int:
    """Parameters of ``model``, each shared (tied) tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters, 4-bit weights at their unpacked size: peft's count for an
    adapted model, transformers' otherwise."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    return model.num_parameters(only_trainable=True), model.num_parameters()


# ----------------------------------------------------------------------------- shipped architectures


def shipped() -> list[str]:
    """Names of the architecture files shipped with the presets."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def preset_path(name: str) -> Path:
    """``name`` may be a shipped file (with or without .json) or a path to a config.json."""
    for path in (Path(name), MODEL_CONFIG_DIR / name, MODEL_CONFIG_DIR / f"{name}.json"):
        if path.is_file():
            return path
    raise ConfigError(f"model.preset_config={name!r}: no such file. Shipped architectures: {shipped()}.")


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
            head, embed = output_head(model), model.get_input_embeddings()
            if head is not None and embed is not None and head.weight is embed.weight:
                head.weight = torch.nn.Parameter(torch.empty_like(head.weight))
    return model


def preset_meta_model(name: str):
    """Meta-device model of a shipped architecture, tied or untied as its config.json says."""
    return meta_model(load_config(name), tie_word_embeddings=_read(name).get("tie_word_embeddings"))
