"""Sweep plumbing shared by the sweeper (hydra_plugins/ftexp_sweeper) and the trials it launches.

Pure helpers (grid cells, override formatting, run names), the identity and liveness of a
sweeper process (so a rerun knows which "running" trials were left behind by a dead sweep), and
``TrialFunction``: the wrapper every trial runs in. It records a failure as ``failed.json`` in the
run directory instead of letting it end the sweep, and gives each parallel worker process its
own GPU.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import math
import os
import random
import re
import shlex
import socket
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- values and cells


def parse_value(text: str) -> Any:
    """An override value as Hydra reads it: "100" -> 100, "null" -> None, "1e-4" -> 0.0001."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"k={text}").value()


def normalize(value: Any) -> Any:
    """Grid choices arrive as Python values or as override text ("null"); make them one kind."""
    if isinstance(value, str):
        try:
            parsed = parse_value(value)
        except Exception:  # not valid override syntax: keep the text
            return value
        if isinstance(parsed, (str, int, float, bool, type(None))):
            return parsed
    return value


def format_value(value: Any) -> str:
    """A Python value as override text that parses back to the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    try:
        if parse_value(text) == text:
            return text
    except Exception:
        pass
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def parse_cell(text: str) -> dict[str, Any]:
    """ "train.n=100 train.epochs=10" -> {"train.n": 100, "train.epochs": 10}."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cell: dict[str, Any] = {}
    for override in OverridesParser.create().parse_overrides(shlex.split(text)):
        if override.is_sweep_override():
            raise ValueError(f"grid cell {text!r}: {override.input_line} sweeps; a cell holds single values")
        cell[override.get_key_element()] = override.value()
    if not cell:
        raise ValueError("an empty grid cell: give each cell at least one key=value")
    return cell


def expand_grid(axes: dict[str, list], cells: list[dict] | None = None) -> list[dict]:
    """The grid's cells, in order.

    Without ``cells``: the product of the axes. With ``cells`` (an explicit list): each cell
    crossed with the axes. An axis whose key also appears in the cells replaces that key: the
    cells are projected off it (duplicates dropped) before the product, so sweeping
    ``train.n=100,1000 train.epochs=1,3`` over sst2_study's cells gives the plain 2 x 2 grid.
    """
    bases: list[dict] = [{}]
    if cells:
        bases = []
        for cell in cells:
            base = {k: v for k, v in cell.items() if k not in axes}
            if base not in bases:
                bases.append(base)
    out = []
    for base in bases:
        for combo in itertools.product(*axes.values()):
            cell = {**base, **dict(zip(axes, combo))}
            if cell not in out:
                out.append(cell)
    return out


def cell_key(cell: dict) -> str:
    """A stable identity for a cell (stored with its trial)."""
    return json.dumps({k: cell[k] for k in sorted(cell)}, default=str)


def _short_keys(keys: list[str]) -> dict[str, str]:
    last = [k.lstrip("+~").split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k.lstrip("+~")) for k, s in zip(keys, last)}


def _short_value(value: Any) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.3g}"
    if isinstance(value, float):
        return str(int(value))
    return format_value(value).strip("'")


def run_name(values: dict) -> str:
    """A human name from the swept values: {"train.n": 100, "train.epochs": 10} -> "n=100 epochs=10"."""
    short = _short_keys(list(values))
    return " ".join(f"{short[k]}={_short_value(v)}" for k, v in values.items())


def folder_name(number: int, values: dict) -> str:
    """Run folder of trial ``number``: "7_n=100_epochs=10". Unique because trial numbers are."""
    slug = re.sub(r"[^A-Za-z0-9._=+-]+", "-", run_name(values).replace(" ", "_")).strip("-")
    return f"{number}_{slug}"[:120] if slug else str(number)


def objective_direction(objective: str) -> str:
    """minimize for losses and errors (eval/mcrmse, train/loss_last), maximize otherwise."""
    name = objective.lower().split("/")[-1]
    return "minimize" if re.search(r"loss|rmse|mse|mae|error|perplexity|irregular", name) else "maximize"


# ----------------------------------------------------------------------------- who runs a trial


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """Start time of a process (clock ticks since boot) so a reused pid is not mistaken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def host_id() -> str:
    return f"{socket.gethostname()}/{_boot_id()}"


def worker_id(pid: int | None = None) -> str:
    """This process as "host/boot|pid|start": enough to tell later whether it still runs."""
    pid = os.getpid() if pid is None else pid
    return f"{host_id()}|{pid}|{_process_start(pid)}"


def process_alive(pid: int, start: str = "") -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X"):  # exited, not yet reaped
                return False
        except (OSError, IndexError):
            pass
        if start and _process_start(pid) != start:
            return False  # the pid now belongs to another process
    return True


def worker_alive(worker: str | None, heartbeat: float | None, stale_after_s: float, now: float | None = None) -> bool:
    """Is the sweeper that started a trial still there? Same machine: ask the OS. Another
    machine: trust its heartbeat for ``stale_after_s`` seconds."""
    if not worker:
        return False
    try:
        host, pid, start = worker.split("|")
    except ValueError:
        return False
    if host == host_id():
        return process_alive(int(pid), start)
    now = time.time() if now is None else now
    return heartbeat is not None and now - float(heartbeat) < stale_after_s


# ----------------------------------------------------------------------------- the trial wrapper


class TrialFailed(RuntimeError):
    """A trial raised; the message is the error's one-line summary (details in failed.json)."""


def error_summary(exc: BaseException) -> tuple[str, BaseException]:
    """(one line, the exception that explains it). ``sys.exit(2)`` from a ConfigError is
    explained by the ConfigError it was raised in."""
    cause = exc
    if isinstance(exc, SystemExit) and exc.__context__ is not None:
        cause = exc.__context__
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    if isinstance(exc, SystemExit) and cause is exc:
        text = f"exit code {exc.code}"
    line = f"{type(cause).__name__}: {text}" if text else type(cause).__name__
    return line[:500], cause


def is_out_of_memory(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name in ("OutOfMemoryError", "MemoryError") or "out of memory" in str(exc).lower()


def release_accelerator_memory() -> None:
    gc.collect()
    torch = __import__("sys").modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        try:
            torch.cuda.empty_cache()
        except Exception:  # a broken CUDA context: nothing more to free here
            pass


def current_run_dir(cfg) -> Path | None:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return None


class TrialFunction:
    """What the launcher runs for each trial: the task function, guarded.

    * In a parallel worker process (joblib), first pins the process to one GPU.
    * A trial that raises, CUDA out-of-memory and ``sys.exit`` from a config error included,
      leaves ``failed.json`` (error, type, traceback) in its run directory and is reported to
      the sweeper as failed; the sweep goes on. Ctrl-C still stops everything.
    """

    def __init__(self, fn: Callable, sweeper_pid: int, gpu_lock_dir: str):
        self.fn = fn
        self.sweeper_pid = sweeper_pid
        self.gpu_lock_dir = gpu_lock_dir

    def __call__(self, cfg):
        if os.getpid() != self.sweeper_pid:
            pin_worker_gpu(self.gpu_lock_dir, _job_num())
        run_dir = current_run_dir(cfg)
        try:
            value = self.fn(cfg)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - a trial's failure must not end the sweep
            if isinstance(exc, SystemExit) and not exc.code:
                raise
            line, cause = error_summary(exc)
            if run_dir is not None:
                from ftexp import records

                records.write_failure(run_dir, cause, summary=line, out_of_memory=is_out_of_memory(cause))
                if not (run_dir / "config.yaml").exists():  # failed before the recipe wrote it
                    try:
                        records.write_config(cfg, run_dir)
                    except Exception:  # an unresolvable config: .hydra/config.yaml still has it
                        pass
            release_accelerator_memory()
            raise TrialFailed(line) from None
        if run_dir is not None and (run_dir / "failed.json").exists():
            (run_dir / "failed.json").unlink()  # an earlier attempt in this folder failed; this one did not
        return value


def _job_num() -> int:
    try:
        from hydra.core.hydra_config import HydraConfig

        return int(HydraConfig.get().job.num)
    except Exception:
        return 0


# ----------------------------------------------------------------------------- one GPU per worker

_PINNED: dict[str, Any] = {}


def visible_gpus() -> list[str]:
    """The GPU ids this process may use. Asks nvidia-smi rather than torch: torch caches its
    device count, which would go stale once CUDA_VISIBLE_DEVICES is narrowed."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


def pin_worker_gpu(lock_dir: str, job_num: int) -> str | None:
    """Give this worker process one GPU of those visible, for its whole life.

    Workers are reused across trials (joblib's loky pool), and CUDA reads CUDA_VISIBLE_DEVICES
    once per process, so the GPU belongs to the process, not the trial: the first trial a worker
    runs claims a free GPU slot (an exclusive lock file in the sweep dir, starting at the slot
    of its job number) and keeps it. More workers than GPUs: the extra ones share, by job
    number. One GPU or none, or a SLURM job (SLURM assigns GPUs): nothing to do.
    """
    if "gpu" in _PINNED:
        return _PINNED["gpu"]
    gpus = visible_gpus()
    if len(gpus) < 2 or os.environ.get("SLURM_JOB_ID"):
        _PINNED["gpu"] = None
        return None
    import fcntl

    Path(lock_dir).mkdir(parents=True, exist_ok=True)
    n = len(gpus)
    chosen = None
    for k in range(n):
        slot = (job_num + k) % n
        fh = open(Path(lock_dir) / f"slot{slot}.lock", "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            continue
        _PINNED["lock"] = fh  # held (and the slot taken) until this process exits
        chosen = gpus[slot]
        break
    if chosen is None:
        chosen = gpus[job_num % n]
        log.warning("More parallel workers than GPUs: this worker shares GPU %s.", chosen)
    os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    _PINNED["gpu"] = chosen
    log.info("worker pid %d uses GPU %s", os.getpid(), chosen)
    return chosen


def backoff(attempt: int) -> None:
    """A short random pause, so two workers that collided do not collide again."""
    time.sleep(random.uniform(0.05, 0.3) * (1 + min(attempt, 5)))


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
