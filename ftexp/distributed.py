"""One run over several processes (``torchrun`` / ``accelerate launch``): which process
this is, one start time (and so one run directory) for all of them, and the rule that
only rank 0 writes records, adapters and W&B and runs the evaluation.

Outside a launcher every helper is a no-op: world size 1, rank 0.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

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
