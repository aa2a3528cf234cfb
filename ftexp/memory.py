"""Weight-memory check before a model is loaded.

The estimate splits the parameters the way bitsandbytes does: the linear layers
of the transformer blocks are quantized, everything else (embeddings, norms, the
output head) stays in the load dtype.

    bits per quantized weight   nf4 + double quant  4 + 8/64 + 32/(64*256) = 4.127
                                nf4                 4 + 32/64              = 4.5
                                int8                8 (+ one fp32 scale per output row)
    bits per other weight       float32 32, bfloat16 / float16 16

With a GPU that cannot hold the weights the run is refused before anything loads;
on a CPU a shortfall is only a warning (the OS may page). The estimate and, after
loading, the measured footprint go to metrics.json as ``model/weight_memory_est_mb``
and ``model/weight_memory_mb``; the training peak is ``train/peak_memory_mb``.

That peak is the run's own, also when a sweep runs many trainings in one process:
on a GPU the CUDA allocator's peak, on a Linux CPU the kernel's resident-set
high-water mark (VmHWM), each reset when training starts.
"""

from __future__ import annotations

import logging
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ftexp import architecture
from ftexp.errors import ConfigError

log = logging.getLogger(__name__)

MB = 2**20


def quantized_bits(qcfg) -> float:
    """Bits one quantized weight takes, block statistics included (int8 row scales apart)."""
    if qcfg.name == "nf4":
        if qcfg.bnb_4bit_use_double_quant:  # absmax per 64 as 8 bits, + an fp32 scale per 256 absmax
            return 4 + 8 / 64 + 32 / (64 * 256)
        return 4 + 32 / 64  # an fp32 absmax per block of 64
    if qcfg.name == "int8":
        return 8.0
    raise ValueError(f"quant={qcfg.name} quantizes nothing")


@dataclass
class ParamSplit:
    """Where the parameters sit: ``quantizable`` of ``total`` are block linears."""

    total: int
    quantizable: int
    rows: int  # output rows of those linears (int8 keeps one fp32 scale per row)
    checkpoint_dtype: torch.dtype | None = None
    exact: bool = True  # False: only a total was known, every weight assumed quantizable


def split_of(model) -> ParamSplit:
    """Count a (meta-device) model's parameters the way bitsandbytes quantizes them."""
    head = architecture.output_head(model)
    kinds = architecture.linear_kinds()
    # Modules the model keeps in full precision are never quantized (T5's "wo"). transformers (5.25)
    # exposes that list only as these class attributes, which its own bitsandbytes integration reads;
    # ftexp reads them here alone.
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    quantizable = rows = 0
    for name, module in model.named_modules():
        if not isinstance(module, kinds) or module is head:
            continue
        if any(k in name.split(".") or name.endswith(k) for k in keep):
            continue
        quantizable += module.weight.numel()
        rows += module.weight.shape[0]
    return ParamSplit(total=architecture.parameter_count(model), quantizable=quantizable, rows=rows)


def param_split(mcfg, base_path: str) -> ParamSplit | None:
    """The model's parameter split, without loading weights.

    From the preset's shipped architecture (model.preset_config), else the
    checkpoint's config.json (a local folder, or the Hub), else model.num_params
    alone. None when nothing tells the size.
    """
    config = None
    try:
        if mcfg.preset_config:
            config = architecture.load_config(mcfg.preset_config)
            model = architecture.preset_meta_model(mcfg.preset_config)
        else:
            from transformers import AutoConfig

            local = Path(base_path).is_dir()
            if local or mcfg.num_params is None:
                config = AutoConfig.from_pretrained(base_path, trust_remote_code=mcfg.trust_remote_code)
                model = architecture.meta_model(config)
            else:
                model = None
    except Exception as err:  # an unreadable config must not stop a run the loader may still manage
        log.warning("memory check: could not read the architecture of %s (%s: %s)", base_path,
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        model = None
    if model is not None:
        split = split_of(model)
        split.checkpoint_dtype = architecture.checkpoint_dtype(config)
        return split
    if mcfg.num_params:
        return ParamSplit(total=int(mcfg.num_params), quantizable=int(mcfg.num_params), rows=0, exact=False)
    return None


def estimate_mb(split: ParamSplit, qcfg, dtype) -> float:
    """Weight memory in MiB for ``split`` loaded with ``qcfg`` in ``dtype``."""
    if dtype == "auto":
        dtype = split.checkpoint_dtype or torch.float32
    other_bits = torch.finfo(dtype).bits
    if qcfg.name == "none":
        bits = split.total * other_bits
    else:
        bits = split.quantizable * quantized_bits(qcfg) + (split.total - split.quantizable) * other_bits
        if qcfg.name == "int8":
            bits += split.rows * 32
    return bits / 8 / MB


def gpu_memory_mb() -> tuple[float, float]:
    """(free, total) MiB on the current CUDA device."""
    free, total = torch.cuda.mem_get_info()
    return free / MB, total / MB


def available_ram_mb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available / MB


def _describe(mcfg, qcfg, split: ParamSplit, dtype) -> str:
    how = qcfg.name if qcfg.name != "none" else str(dtype).replace("torch.", "")
    size = f"{split.total / 1e9:.2f}B" if split.total >= 1e9 else f"{split.total / 1e6:.1f}M"
    return f"model={mcfg.name} ({size} params, {how})"


def check(mcfg, qcfg, base_path: str, device: str) -> dict:
    """Estimate the weights' memory; refuse on a GPU that cannot hold them, warn on a CPU.

    Returns ``model/*`` metrics for metrics.json (empty when the size is unknown).
    """
    split = param_split(mcfg, base_path)
    if split is None:
        log.warning("memory check skipped: set model.num_params or model.preset_config for model=%s", mcfg.name)
        return {}
    dtype = architecture.load_dtype(mcfg, qcfg, device)
    est = estimate_mb(split, qcfg, dtype)
    what = _describe(mcfg, qcfg, split, dtype)
    if device == "cuda":
        free, total = gpu_memory_mb()
        if est > free:
            smaller = ""
            if qcfg.name != "nf4":
                nf4 = OmegaConf.create({"name": "nf4", "bnb_4bit_use_double_quant": True})
                smaller = f" quant=nf4 would need ~{estimate_mb(split, nf4, torch.bfloat16):,.0f} MB."
            raise ConfigError(
                f"{what}: the weights alone need ~{est:,.0f} MB but the GPU has {free:,.0f} MB free "
                f"(of {total:,.0f} MB). Pick a smaller model or a stronger quantization, or free the GPU.{smaller}"
            )
        log.info("memory check: %s needs ~%s MB of weights; GPU has %s MB free", what, f"{est:,.0f}", f"{free:,.0f}")
    else:
        ram = available_ram_mb()
        if ram is not None and est > ram:
            log.warning("memory check: %s needs ~%s MB of weights but only %s MB of RAM is available; "
                        "loading may swap or fail.", what, f"{est:,.0f}", f"{ram:,.0f}")
        else:
            log.info("memory check: %s needs ~%s MB of weights (CPU)", what, f"{est:,.0f}")
    return {"model/num_params": split.total, "model/weight_memory_est_mb": round(est, 2)}


def measured_mb(model) -> float:
    """Memory the loaded weights (and buffers) actually take, in MiB."""
    return model.get_memory_footprint() / MB


CLEAR_REFS, STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")


def reset_peak(device: str) -> None:
    """Start measuring this process's peak memory afresh (see ``peak_mb``)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        CLEAR_REFS.write_text("5")  # Linux: VmHWM restarts from the current resident set
    except OSError:
        log.warning("train/peak_memory_mb: this system cannot reset the peak resident memory, so it is the "
                    "process's peak so far (in a sweep run in one process, the largest run's).")


def peak_mb(device: str) -> float:
    """Peak memory since ``reset_peak``, in MiB: the tensors the CUDA allocator held on a GPU,
    the resident set (VmHWM) on a Linux CPU, else the process's lifetime peak (ru_maxrss)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / MB
    try:
        hwm = next(line for line in STATUS.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) / 1024  # kB
    except (OSError, StopIteration):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / MB if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB elsewhere
