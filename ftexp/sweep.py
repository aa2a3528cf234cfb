"""What a sweep's trials share with the sweeper (hydra_plugins/ftexp_sweeper).

Grid cells and override text, run and folder names, ``claim_lock`` (one worker at a time
hands itself trials), and ``TrialFunction``: the wrapper every trial runs in, which records a
failure as ``failed.json`` in the run directory instead of letting it end the sweep.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from sqlalchemy.engine import make_url

from ftexp import distributed, files, records


def parse_value(text: str) -> Any:
    """An override value as Hydra reads it: "100" -> 100, "null" -> None, "1e-4" -> 0.0001."""
    return OverridesParser.create().parse_override(f"k={text}").value()


def format_value(value: Any) -> str:
    """A Python value as override text that parses back to the same value."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else json.dumps(value)
    text = str(value)
    try:
        if parse_value(text) == text:
            return text
    except Exception:
        pass
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def parse_cell(text: str) -> dict[str, Any]:
    """ "train.n=100 train.epochs=10" -> {"train.n": 100, "train.epochs": 10}."""
    cell: dict[str, Any] = {}
    for override in OverridesParser.create().parse_overrides(shlex.split(text)):
        if override.is_sweep_override():
            raise ValueError(f"grid cell {text!r}: {override.input_line} sweeps; a cell holds single values")
        cell[override.get_key_element()] = override.value()
    if not cell:
        raise ValueError("an empty grid cell: give each cell at least one key=value")
    return cell


def expand_grid(axes: dict[str, list], cells: list[dict] | None = None) -> list[dict]:
    """The grid's cells, in order: the product of the axes, or each explicit cell crossed with
    them. An axis whose key is also in the cells replaces it there (the cells are projected
    off it first), so sweeping ``train.n=100,1000`` over a cell list re-grids ``train.n``."""
    bases: list[dict] = []
    for cell in cells or [{}]:
        base = {k: v for k, v in cell.items() if k not in axes}
        bases += [base] if base not in bases else []
    out: list[dict] = []
    for base in bases:
        for combo in itertools.product(*axes.values()):
            cell = {**base, **dict(zip(axes, combo))}
            out += [cell] if cell not in out else []
    return out


def short_names(keys) -> dict[str, str]:
    """Each swept key by its last part ("train.n" -> "n"), or whole where two keys share that part."""
    keys = [k.lstrip("+~") for k in keys]
    last = [k.split(".")[-1] for k in keys]
    return {k: short if last.count(short) == 1 else k for k, short in zip(keys, last)}


# The environment variable that tells a trial's process which keys the sweep varies (hydra.job.env_set):
# W&B gets their values as top-level config keys, the columns a sweep's runs table and panels need.
SWEPT_ENV = "FTEXP_SWEPT"


def swept_values(cfg) -> dict:
    """{short name: value} of the keys this sweep trial varies (``SWEPT_ENV``); {} outside a sweep. A swept
    config group gives the option chosen, and a name that is also a top-level config key goes under
    ``swept/``."""
    keys = [k for k in os.environ.get(SWEPT_ENV, "").split(",") if k]
    out = {}
    for key, name in short_names(keys).items():
        value = OmegaConf.select(cfg, key)
        if isinstance(value, DictConfig):  # a config group (lora=default,qv): the option chosen
            value = value.get("name")
        elif isinstance(value, ListConfig):
            value = OmegaConf.to_container(value)
        out[f"swept/{name}" if name in cfg else name] = value  # never over a section of the config itself
    return out


def run_name(values: dict) -> str:
    """ "n=100 epochs=10": the swept values, each by its last key part unless that is ambiguous."""
    names = short_names(values)
    parts = []
    for key, value in values.items():
        name = names[key.lstrip("+~")]
        if isinstance(value, float):
            value = int(value) if value.is_integer() else float(f"{value:.3g}")
        parts.append(f"{name}={format_value(value).strip(chr(39))}")
    return " ".join(parts)


def folder_name(number: int, values: dict) -> str:
    """Run folder of trial ``number``: "7_n=100_epochs=10". Unique because trial numbers are."""
    slug = re.sub(r"[^A-Za-z0-9._=+-]+", "-", run_name(values).replace(" ", "_")).strip("-")
    return f"{number}_{slug}"[:120] if slug else str(number)


@contextlib.contextmanager
def claim_lock(storage_url: str) -> Iterator[None]:
    """Held while a worker reads the study and takes trials from it, so no two take the same one.

    Optuna hands a WAITING trial to one worker by reading it with SELECT ... FOR UPDATE and
    setting it RUNNING. PostgreSQL and MySQL lock the row; SQLite ignores FOR UPDATE, and two
    workers asking at once can both be given the same trial (measured: 13 of 200 trials when two
    processes asked together). An SQLite database lives on one machine's disk, so an exclusive
    lock on a file beside it closes that gap; other databases need nothing.
    """
    url = make_url(storage_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        yield
        return
    with files.locked(Path(f"{url.database}.claim")):
        yield


def study_location(sweep_dir: Path, storage: str | None, study_name: str | None) -> tuple[str, str]:
    """(storage URL, study name) of a sweep: ``hydra.sweeper.storage``, else optuna.db in the sweep dir;
    ``hydra.sweeper.study_name``, else the sweep dir's name."""
    return str(storage or f"sqlite:///{Path(sweep_dir).absolute() / 'optuna.db'}"), study_name or Path(sweep_dir).name


def open_storage(url: str, **kwargs) -> optuna.storages.RDBStorage:
    """The study's database; SQLite waits up to a minute for a lock another worker holds."""
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    return optuna.storages.RDBStorage(url, engine_kwargs=engine, **kwargs)


# The environment variable that tells a trial's process which Optuna trial it is (hydra.job.env_set)
TRIAL_ENV = "FTEXP_TRIAL"


class TrialReporter:
    """A sweep trial's side of pruning: each evaluation during training is stored as an intermediate
    value of its Optuna trial, and the study's pruner, given the trial as stored, says whether to stop.
    The trial lives in the sweeper's process; this reaches it through the study's storage."""

    def __init__(self, url: str, study_name: str, number: int, pruner):
        self.storage = open_storage(url)
        self.trial_id = self.storage.get_trial_id_from_study_id_trial_number(
            self.storage.get_study_id_from_name(study_name), number)
        self.study = optuna.load_study(study_name=study_name, storage=self.storage, pruner=pruner,
                                       sampler=optuna.samplers.RandomSampler())  # never samples here
        self.number, self.pruner_name = number, type(pruner).__name__

    def report(self, value: float, step: int) -> bool:
        """Store ``value`` at ``step``; True when the pruner gives the trial up."""
        self.storage.set_trial_intermediate_value(self.trial_id, step, value)
        return bool(self.study.pruner.prune(self.study, self.storage.get_trial(self.trial_id)))

    def pruned(self, step: int, value: float) -> optuna.TrialPruned:
        return optuna.TrialPruned(f"trial {self.number} pruned at step {step} (held-out objective {value:.4g}) by "
                                  f"{self.pruner_name}")


def trial_reporter() -> TrialReporter | None:
    """This process's ``TrialReporter`` when it runs a trial of a sweep that prunes
    (``hydra.sweeper.pruner``); None otherwise."""
    number = os.environ.get(TRIAL_ENV)
    if number is None or not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    pruner = hydra_cfg.sweeper.get("pruner")
    if not pruner:
        return None
    url, name = study_location(Path(str(hydra_cfg.sweep.dir)), hydra_cfg.sweeper.get("storage"),
                               hydra_cfg.sweeper.get("study_name"))
    return TrialReporter(url, name, int(number), instantiate(pruner))


@dataclass(frozen=True)
class PrunedTrial:
    """What a trial's job returns when the study's pruner stopped it (its folder holds pruned.json)."""
    message: str


class TrialFailed(RuntimeError):
    """A trial raised; the message is the error's one-line summary (details in failed.json)."""


class TrialFunction:
    """What the launcher runs for each trial: the task function, guarded.

    A parallel worker process (joblib) first takes a GPU of its own. A trial its pruner stopped
    returns ``PrunedTrial`` to the sweeper (its folder holds pruned.json). A trial that raises,
    CUDA out-of-memory and ``sys.exit`` from a config error included, leaves ``failed.json``
    (error, type, traceback) in its run directory and is reported to the sweeper as failed;
    the sweep goes on. Ctrl-C still stops everything.
    """

    def __init__(self, fn: Callable, sweeper_pid: int, gpu_lock_dir: str):
        self.fn, self.sweeper_pid, self.gpu_lock_dir = fn, sweeper_pid, gpu_lock_dir

    def __call__(self, cfg):
        if os.getpid() != self.sweeper_pid:
            distributed.pin_worker_gpu(self.gpu_lock_dir, HydraConfig.get().job.num if HydraConfig.initialized() else 0)
        run_dir = Path(cfg.output_dir) if cfg.get("output_dir") else (
            Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None)
        try:
            value = self.fn(cfg)
        except optuna.TrialPruned as pruned:  # an outcome, not a failure: returned, not raised through Hydra
            return PrunedTrial(str(pruned))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - a trial's failure must not end the sweep
            if isinstance(exc, SystemExit) and not exc.code:
                raise
            line = records.error_summary(exc)[0]
            if run_dir is not None:
                records.write_failure(run_dir, exc)
                if not (run_dir / "config.yaml").exists():  # failed before the recipe wrote it
                    try:
                        records.write_config(cfg, run_dir)
                    except Exception:  # an unresolvable config: .hydra/config.yaml still has it
                        pass
            gc.collect()
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise TrialFailed(line) from None
        if run_dir is not None and (run_dir / "failed.json").exists():
            (run_dir / "failed.json").unlink()  # an earlier attempt in this folder failed; this one did not
        return value
