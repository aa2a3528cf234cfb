"""One run over several processes (``torchrun`` / ``accelerate launch``): which process
this is, one start time (and so one run directory) for all of them, and the rule that
only rank 0 writes records, adapters and W&B and runs the evaluation; and, for a sweep's
parallel worker processes, one GPU each.

Outside a launcher every helper is a no-op: world size 1, rank 0.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ftexp import files

log = logging.getLogger(__name__)

_START: float | None = None


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the launcher's process group (env:// rendezvous); the trainer reuses it."""
    import torch
    import torch.distributed as dist

    if world_size() == 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def agree(value):
    """Rank 0's ``value``, on every rank."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    init()
    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        init()
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. builds a base model on disk); the others after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def start_time() -> float:
    """When this run started, the same on every rank: the run directory's ``${ftexp_now:...}``
    is made from it, so all ranks of a torchrun agree on one folder."""
    global _START
    if _START is None:
        _START = agree(time.time())
    return _START


def register_resolver() -> None:
    """``${ftexp_now:%Y-%m-%d_%H-%M-%S}``: Hydra's ``now``, but one value for all ranks."""
    from datetime import datetime

    from omegaconf import OmegaConf

    def ftexp_now(fmt: str) -> str:
        return datetime.fromtimestamp(start_time()).strftime(fmt)

    OmegaConf.register_resolver("ftexp_now", ftexp_now, use_cache=True, replace=True)


# ----------------------------------------------------------------------------- one GPU per sweep worker

_PINNED: dict[str, Any] = {}


def visible_gpus() -> list[str]:
    """The GPU ids this process may use. Asks nvidia-smi rather than torch: torch caches its
    device count, which would go stale once CUDA_VISIBLE_DEVICES is narrowed."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


def pin_worker_gpu(lock_dir: str, job_num: int) -> str | None:
    """Give this worker process one visible GPU for its whole life.

    Workers are reused across trials (joblib's loky pool) and CUDA reads CUDA_VISIBLE_DEVICES
    once per process, so the GPU belongs to the process: its first trial takes a free slot (an
    exclusive lock file in the sweep dir, starting at its job number's slot) and keeps it.
    More workers than GPUs share by job number. One GPU or none, or SLURM (which assigns
    GPUs itself): nothing to do.
    """
    if "gpu" not in _PINNED:
        gpus = visible_gpus()
        _PINNED["gpu"] = None
        if len(gpus) > 1 and not os.environ.get("SLURM_JOB_ID"):
            Path(lock_dir).mkdir(parents=True, exist_ok=True)
            for slot in [(job_num + k) % len(gpus) for k in range(len(gpus))]:
                handle = files.hold(Path(lock_dir) / f"slot{slot}.lock", wait=False)
                if handle is None:
                    continue
                _PINNED.update(gpu=gpus[slot], lock=handle)  # the lock is held until the process exits
                break
            else:
                _PINNED["gpu"] = gpus[job_num % len(gpus)]
                log.warning("More parallel workers than GPUs: this worker shares GPU %s.", _PINNED["gpu"])
            os.environ["CUDA_VISIBLE_DEVICES"] = _PINNED["gpu"]
            log.info("worker pid %d uses GPU %s", os.getpid(), _PINNED["gpu"])
    return _PINNED["gpu"]
