"""Model and tokenizer loading: Hub ids or local directories through the Auto
classes, bitsandbytes quantization, LoRA adapters through peft, and the offline
tiny models. Small factories turn config nodes into library objects.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ftexp import tiny
from ftexp.config import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(choice: str = "auto") -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible. Use device=auto or device=cpu.")
    return choice


def _dtype(name: str):
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def quantization_config(qcfg):
    """BitsAndBytesConfig for quant=int8|nf4, or None."""
    if qcfg.name == "none":
        return None
    from transformers import BitsAndBytesConfig

    if qcfg.name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=qcfg.llm_int8_threshold)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=qcfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=qcfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=_dtype(qcfg.bnb_4bit_compute_dtype),
    )


def build_tiny(mcfg, texts, seed: int, out_dir: Path):
    """Make the tiny model + tokenizer and save them under ``out_dir`` (the run's base model)."""
    t = mcfg.tiny
    seq2seq = mcfg.arch == "seq2seq"
    tok = tiny.build_tokenizer(texts, t.vocab_size, seq2seq=seq2seq)
    if seq2seq:
        tok.padding_side = "right"
    config = tiny.build_config(t.family, len(tok), tok, hidden_size=t.hidden_size, num_layers=t.num_layers,
                               num_heads=t.num_heads, intermediate_size=t.intermediate_size,
                               max_position_embeddings=t.max_position_embeddings)
    model = tiny.build_model(config, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def load_tokenizer(path: str, mcfg):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=mcfg.revision if path == mcfg.name_or_path else None,
                                        trust_remote_code=mcfg.trust_remote_code)
    if tok.pad_token is None:  # Llama/Falcon/GPT-NeoX ship none; EOS is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, mcfg, qcfg, device: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if mcfg.arch == "seq2seq" else AutoModelForCausalLM
    kwargs = dict(trust_remote_code=mcfg.trust_remote_code)
    if path == mcfg.name_or_path and mcfg.revision:
        kwargs["revision"] = mcfg.revision
    bnb = quantization_config(qcfg)
    dtype = _dtype(mcfg.dtype)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["device_map"] = {"": 0} if device == "cuda" else {"": "cpu"}
        if qcfg.name == "nf4":
            dtype = _dtype(qcfg.bnb_4bit_compute_dtype)
        elif device == "cpu" and dtype == "auto":
            dtype = torch.float32
    if device == "cpu" and dtype in (torch.float16,):
        log.warning("float16 is slow or unsupported on CPU; loading in float32 instead")
        dtype = torch.float32
    kwargs["dtype"] = dtype
    try:
        model = auto.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ConfigError(
            f"model.name_or_path={path}: could not load ({err}). Check the id or folder; gated models such as "
            "Llama-2 need `huggingface-cli login` after accepting the licence on the Hub."
        ) from err
    if bnb is None:
        model.to(device)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.pad_token_id or model.config.eos_token_id
    return model


def find_linear_targets(model, include_lm_head: bool = False) -> list[str]:
    """Names (last path component) of every linear layer, quantized or not.

    Walks the model as loaded: torch Linear, bitsandbytes Linear8bitLt and
    Linear4bit all count. The output head is left out unless asked for.
    """
    kinds = [torch.nn.Linear]
    try:
        import bitsandbytes as bnb
        kinds += [bnb.nn.Linear8bitLt, bnb.nn.Linear4bit]
    except ImportError:  # bitsandbytes is optional for unquantized runs
        pass
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, tuple(kinds)):
            if module is head and not include_lm_head:
                continue
            names.add(name.split(".")[-1])
    if include_lm_head and head is not None:
        for name, module in model.named_modules():
            if module is head:
                names.add(name.split(".")[-1])
    return sorted(names)


def lora_config(lcfg, model, task_type: str):
    from peft import LoraConfig

    targets = lcfg.target_modules
    if isinstance(targets, str):
        if targets != "all-linear":
            raise ConfigError(f"lora.target_modules={targets!r}: give a list of module names or 'all-linear'.")
        targets = find_linear_targets(model, include_lm_head=lcfg.include_lm_head)
    else:
        targets = list(targets)
        if lcfg.include_lm_head:
            head = find_linear_targets(model, include_lm_head=True)
            targets += [t for t in head if t not in find_linear_targets(model) and t not in targets]
        present = {n.split(".")[-1] for n, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            raise ConfigError(
                f"lora.target_modules {missing} not found in {type(model).__name__}. Linear layers found: "
                f"{find_linear_targets(model, True)}. Use lora.target_modules=all-linear or pick from those."
            )
    return LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, target_modules=targets,
                      bias=lcfg.bias, modules_to_save=list(lcfg.modules_to_save) if lcfg.modules_to_save else None,
                      task_type=task_type)


def attach_adapters(model, lcfg, qcfg, gradient_checkpointing: bool = False):
    """Wrap ``model`` with LoRA adapters (or leave it whole for a full fine-tune)."""
    if not lcfg.enabled:
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if qcfg.name != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    task_type = "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"
    return get_peft_model(model, lora_config(lcfg, model, task_type))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
