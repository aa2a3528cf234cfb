"""``hydra/sweeper=ftexp``: hydra-optuna-sweeper made resumable, parallel-safe and reporting.

Extends the stock Optuna sweeper's config; the work happens in ``_impl`` (imported only when a
sweep starts, so single runs do not pay for Optuna). What it changes, and why, is in ``_impl``'s
docstring.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig

from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf


@dataclass
class FtexpSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.ftexp_sweeper.ftexp_sweeper.FtexpSweeper"
    # maximize | minimize | auto (minimize when the objective names a loss or error, else maximize)
    direction: Any = "auto"
    # null = default: an SQLite file optuna.db in the sweep dir. Any SQLAlchemy URL works, e.g.
    # postgresql://user@host/db to share one study between machines (give them one study_name).
    storage: Any = None
    study_name: Optional[str] = None  # null = the sweep dir's name
    # The budget of finished (COMPLETE) trials, counted over the stored study, earlier runs
    # included. null = every grid cell (grids), required for tpe/random/... samplers.
    n_trials: Optional[int] = None
    # Trials launched per batch; null = the launcher's parallelism (joblib n_jobs,
    # submitit array_parallelism), else 1.
    n_jobs: Optional[int] = None
    # Abort the sweep when the share of failed trials in this invocation exceeds this.
    # 1.0: never; failed trials are recorded (failed.json, Optuna state FAIL) and the sweep goes on.
    max_failure_rate: float = 1.0
    # An explicit list of grid cells, each a string of overrides ("train.n=100 train.epochs=10").
    # Sweeping a cell's key on the command line re-grids that key (see sweeps/sst2_study.yaml).
    cells: Optional[List[str]] = None
    heartbeat_s: float = 60.0  # how often a running trial says it is alive
    # A running trial of another machine whose heartbeat is older than this is taken as dead
    # and retried. Trials of this machine are checked by process id at once.
    stale_after_s: float = 600.0
    report: bool = True  # write results.md/.csv/.png (ftexp.report) when the sweep ends
    # evaluate.py output dirs (zero-/k-shot baselines) shown as the report's first rows
    baselines: Optional[List[str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="ftexp", node=FtexpSweeperConf, provider="ftexp")


class FtexpSweeper(Sweeper):
    def __init__(self, sampler: Any, **kwargs: Any) -> None:
        from ._impl import FtexpSweeperImpl

        whitelist = ("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")
        sampler_cfg = sampler

        def resumed_sampler(n_trials_stored: int) -> Any:
            """The sampler for a study that already holds trials: seed + their number."""
            seed = sampler_cfg.get("seed") if hasattr(sampler_cfg, "get") else None
            if seed is None:
                return None
            return instantiate(sampler_cfg, seed=int(seed) + n_trials_stored, _execution_whitelist_=whitelist)

        sampler = instantiate(sampler, _execution_whitelist_=whitelist)
        self.sweeper = FtexpSweeperImpl(sampler=sampler, sampler_factory=resumed_sampler, **kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        from ._impl import SweepError

        try:
            return self.sweeper.sweep(arguments)
        except SweepError as err:  # a message, not a traceback: the sweep's records are on disk
            print(f"ftexp: error: {err}", file=sys.stderr, flush=True)
            sys.exit(err.exit_code)
