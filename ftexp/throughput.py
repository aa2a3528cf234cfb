"""Training throughput: real tokens, padding, FLOPs per token and model FLOPs utilization (MFU).

What training writes to metrics.json (see ``training.train``):

    train/tokens_per_s     real (non-padding) tokens trained per second, all processes together
    train/padding_ratio    padded tokens / real tokens over the batches actually trained
    train/flops_per_token  training FLOPs per token (``flops_per_token``)
    train/peak_flops       the peak FLOP/s of one device that MFU is measured against
    train/mfu              achieved FLOP/s / (peak FLOP/s x devices)

The peak of a GPU comes from a table of dense (no sparsity) vendor figures, chosen by
the device name and the precision the matmuls run in; the peak of a CPU is measured
with a short matmul in the run itself, when training starts and when its metrics are read
(``Ceiling``). ``train.peak_flops`` overrides both.
"""

from __future__ import annotations

import logging
import math
import platform
import re
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from ftexp import architecture

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- counting tokens


class TokenCounter(TrainerCallback):
    """Count the real and the padded tokens of every batch the model trains on.

    A forward pre-hook on the model sees exactly the batches that are trained (not the
    ones a data loader fetched ahead). Counts stay on the batch's device until read, so
    counting adds no device-to-host sync to a training step.

    It is the run's one token count. The Trainer's own (``include_num_input_tokens_seen``)
    stays off: it has no padding figure, counts an encoder-decoder's encoder tokens alone
    (the attention mask of ``input_ids``), and syncs the device on every micro-batch
    (``.item()``). As a Trainer callback, the count goes into the Trainer's
    ``state.num_input_tokens_seen`` whenever a checkpoint is due and at the end, so a resumed
    run goes on from its checkpoint's figure (``before``).
    """

    def __init__(self, model=None):
        self._sums: dict = {}  # device -> tensor([real, padded])
        self._handle = None
        self.before = 0  # real tokens trained before this session (a resumed run's checkpoint)
        if model is not None:
            self.watch(model)

    def watch(self, model) -> None:
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = int(state.num_input_tokens_seen or 0)  # restored from the checkpoint when resuming
        if self._handle is None and model is not None:
            self.watch(model)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:  # set by the Trainer's flow callback, which runs first; every rank agrees
            state.num_input_tokens_seen = self.before + self.totals()[0]

    on_epoch_end = on_step_end  # save_strategy="epoch" (evaluation every epoch) saves at an epoch's end

    def on_train_end(self, args, state, control, **kwargs):
        state.num_input_tokens_seen = self.before + self.totals()[0]

    def _count(self, module, args, kwargs):
        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            real = mask.sum()
            padded = mask.numel() - real
        elif ids is not None:  # padding-free batch: rows laid end to end, no padding
            real = torch.tensor(ids.numel(), device=ids.device)
            padded = torch.zeros((), dtype=real.dtype, device=ids.device)
        else:
            return
        labels = kwargs.get("labels")
        if kwargs.get("decoder_input_ids") is not None and labels is not None:
            # encoder-decoder: the decoder's tokens are the labels; -100 marks its padding
            answer = (labels != -100).sum()
            real = real + answer
            padded = padded + (labels.numel() - answer)
        counts = torch.stack([real.to(torch.int64), padded.to(torch.int64)])
        key = counts.device
        self._sums[key] = self._sums[key] + counts if key in self._sums else counts

    def totals(self) -> tuple[int, int]:
        """(real, padded) tokens counted so far, summed over every process of a launch."""
        total = torch.zeros(2, dtype=torch.int64)
        for counts in self._sums.values():
            total += counts.cpu()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            total = total.to(device)
            dist.all_reduce(total)
            total = total.cpu()
        return int(total[0]), int(total[1])

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


# --------------------------------------------------------------------------- FLOPs per token


def multiplying_params(model) -> int:
    """Parameters that take part in a matmul for every token: all of them (``count_parameters``,
    4-bit weights at their unpacked size) but the input embedding, which is a table lookup,
    unless the output head shares its weights."""
    _, total = architecture.count_parameters(model)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(embed, "weight", None)
    if weight is None:
        return total
    tied = getattr(head, "weight", None) is not None and head.weight.data_ptr() == weight.data_ptr()
    return total if tied else total - weight.numel()


def flops_per_token(model, frozen_base: bool) -> float:
    """Training FLOPs per token, the usual dense-transformer estimate.

    A token costs 2N FLOPs forward (one multiply-add per weight it meets), 2N backward to
    carry the gradient through the activations, and 2N more for the weight gradients:
    6N for full fine-tuning. With a frozen base (LoRA, QLoRA) the weight gradients are
    the adapters' only, which are negligible: 4N. N counts the weights a token is
    multiplied by (``multiplying_params``); an encoder-decoder sends each token through
    one of its two stacks, about N/2. Attention's own sequence-length term and the
    recomputation of gradient checkpointing are left out, as MFU conventionally does.
    """
    n = multiplying_params(model)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        n = n / 2
    return float((4 if frozen_base else 6) * n)


# --------------------------------------------------------------------------- peak FLOP/s


# Dense peak FLOP/s of one GPU (vendor data sheets, no sparsity), matched in order against
# torch.cuda.get_device_name(): (pattern, 16-bit tensor-core peak, fp32 peak). The fp32 peak is
# the plain (non-tensor-core) one: PyTorch does not use TF32 for matmuls unless asked to.
GPU_PEAKS = (
    (r"H200", 989e12, 67e12),
    (r"H100.*PCIe", 756e12, 51e12),
    (r"H100.*NVL", 835e12, 60e12),
    (r"H100", 989e12, 67e12),  # SXM
    (r"A100", 312e12, 19.5e12),  # SXM and PCIe
    (r"A10G", 70e12, 31.2e12),  # AWS's A10G (the A10 is faster)
    (r"\bL4\b", 121e12, 30.3e12),
    (r"\bT4\b", 65e12, 8.1e12),  # fp16 (T4 has no bf16 units)
    (r"V100", 125e12, 15.7e12),  # SXM2 (PCIe: 112 / 14)
    (r"RTX 4090", 165.2e12, 82.6e12),  # fp16 / bf16 with fp32 accumulation, as PyTorch runs them
)

SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def gpu_peak_flops(name: str, dtype: torch.dtype) -> float | None:
    """The table's peak for GPU ``name`` at ``dtype``; None when the GPU is not in the table."""
    for pattern, half, single in GPU_PEAKS:
        if re.search(pattern, name, re.IGNORECASE):
            return half if dtype in SIXTEEN_BIT else single
    return None


def matmul_dtype(cfg, model) -> torch.dtype:
    """The dtype the run's matmuls run in: mixed precision, else nf4's compute dtype, else
    the dtype the (unquantized) weights were loaded in."""
    if cfg.train.bf16:
        return torch.bfloat16
    if cfg.train.fp16:
        return torch.float16
    if cfg.quant.name == "nf4":
        return architecture.parse_dtype(cfg.quant.bnb_4bit_compute_dtype, "quant.bnb_4bit_compute_dtype")
    dtype = getattr(model, "dtype", torch.float32)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


CPUINFO = Path("/proc/cpuinfo")


def cpu_name() -> str:
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def matmul_flops(dtype: torch.dtype = torch.float32, size: int | None = None, repeats: int = 8) -> float:
    """FLOP/s of a square matmul on the CPU with torch's current threads, best of ``repeats``.

    ``size`` None: the largest multiple of 64 up to 1,024 whose matmul takes about 15 ms at the rate
    a 256 x 256 probe shows, so a reading takes about 0.15 s whatever the dtype (float16, which most
    CPUs emulate at about 1 GFLOP/s, would take 19 s at 1,024). On a 2-core EPYC at float32 that is
    1,024, which reads as high as 2,048 (191 to 195 against 164 to 185 GFLOP/s) in a quarter of the
    time. The operands come from a generator of their own: a reading moves no random state of the run.
    """
    gen = torch.Generator().manual_seed(0)

    def best_of(n: int, k: int) -> float:
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)
        torch.mm(a, b)  # warm-up: first-call allocation and kernel selection
        best = math.inf
        for _ in range(k):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        return 2 * n**3 / best

    if size is None:
        rate = best_of(256, 1)
        size = int(min(1024, max(64, (rate * 0.015 / 2) ** (1 / 3))) // 64 * 64)
    return best_of(size, repeats)


class Ceiling:
    """The peak FLOP/s of one device that a training run's MFU is measured against.

    ``train.peak_flops`` when set; else a GPU's data-sheet figure (``GPU_PEAKS``); else, on a CPU,
    a matmul measured in the run itself (``matmul_flops``): when training starts and again each
    time the metrics are read (at its end, and at each epoch whose results are written), the
    highest reading counting. A shared machine's speed moves by a third within an hour, so a
    figure measured in another run would make the MFU of this one too high or too low
    (docs/performance.md)."""

    def __init__(self, cfg, device: str, model):
        self.dtype = matmul_dtype(cfg, model)
        self.override = float(cfg.train.peak_flops) if cfg.train.get("peak_flops") else None
        self.gpu = torch.cuda.get_device_name() if device == "cuda" and self.override is None else None
        self.readings: list[float] = []
        self.measure()

    def measure(self) -> None:
        """One more reading of the CPU's matmul rate (nothing to measure for an override or a GPU)."""
        if self.override is None and self.gpu is None:
            self.readings.append(matmul_flops(self.dtype))

    def peak(self) -> tuple[float | None, str]:
        """Peak FLOP/s and where the figure comes from, after one more reading on a CPU. None for a
        GPU that is not in ``GPU_PEAKS`` (set train.peak_flops to get an MFU)."""
        if self.override is not None:
            return self.override, "train.peak_flops"
        if self.gpu is not None:
            value = gpu_peak_flops(self.gpu, self.dtype)
            if value is None:
                log.warning("train/mfu: no peak FLOP/s known for %s; set train.peak_flops=<FLOP/s of one GPU at %s> "
                            "to get it.", self.gpu, self.dtype)
            return value, f"{self.gpu}, {self.dtype}"
        self.measure()
        return max(self.readings), (f"{cpu_name()}, {torch.get_num_threads()} threads, {self.dtype}, measured in this "
                                    f"run: best of {len(self.readings)} readings")


def metrics(ceiling: Ceiling, per_token: float, real: int, padded: int, seconds: float, processes: int) -> dict:
    """The ``train/*`` throughput metrics of ``real`` + ``padded`` tokens trained in ``seconds`` by
    ``processes`` devices, at ``per_token`` FLOPs per token (``flops_per_token``)."""
    out = {
        "train/tokens_per_s": real / seconds if seconds > 0 else 0.0,
        "train/padding_ratio": padded / real if real else 0.0,
        "train/flops_per_token": per_token,
    }
    peak, source = ceiling.peak()
    if peak:
        achieved = per_token * real / seconds if seconds > 0 else 0.0
        out["train/peak_flops"] = peak
        out["train/mfu"] = achieved / (peak * max(processes, 1))
        log.info("throughput: %.0f real tokens/s, padding %.1f%%, MFU %.2f%% of %.3g FLOP/s (%s)",
                 out["train/tokens_per_s"], 100 * out["train/padding_ratio"], 100 * out["train/mfu"], peak, source)
    return out
