"""The ftexp sweeper: hydra-optuna-sweeper's search space and samplers, with the study treated
as the record of a sweep that can stop and start again.

What differs from the stock sweeper (hydra-optuna-sweeper 1.4.0rc3) and why:

* Storage: an SQLite file ``optuna.db`` in the sweep dir unless ``storage`` names another
  SQLAlchemy URL. The study is named after the sweep dir. So rerunning the same command (same
  sweep dir) reloads the same study.
* Budget: ``n_trials`` counts COMPLETE trials already in the study, from earlier invocations and
  from other workers, plus trials other live workers are running. The stock sweeper asks for
  ``n_trials`` new trials on every invocation.
* Grids (``sampler=grid`` or ``cells``): the sweeper enumerates the cells itself and runs each
  cell that has no COMPLETE trial, once. The stock GridSampler, once exhausted, re-samples
  random cells. Cell values are stored as trial user attributes, so a grid may change between
  invocations (extra cells, fewer cells) without Optuna's "dynamic value space" error.
* Run folders: ``<trial number>_<swept values>``. Trial numbers are unique in a study, so a
  rerun or a second worker never writes into an earlier run's folder (the stock sweeper
  restarts job numbering at 0 and overwrites folders 0, 1, ...).
* Reuse: before launching a trial, its composed config is compared with the finished runs in
  the sweep dir; on a match the trial is launched into that folder, where ``finetune`` finds
  ``metrics.json`` for the same config and returns it without training.
* Interrupted sweeps: a RUNNING trial whose sweeper process is gone (same machine: checked by
  pid; another machine: heartbeat older than ``stale_after_s``) is taken over by the next
  sweeper and run again as the same trial, in its own folder (where a ``metrics.json`` written
  just before the crash is reused). An interruption leaves no failed trial behind; a trial
  interrupted three times is marked failed.
* Failures: a trial that raises is told FAIL with its error in the user attribute
  ``ftexp:error`` (and ``failed.json`` in its folder); the sweep goes on unless
  ``max_failure_rate`` is exceeded.
* Several workers on one storage: a worker claims a grid cell by tagging its trial and then
  re-reading the study; if another live trial holds the same cell it backs off and takes the
  next one (a claim is kept only when no other claim is visible after writing one's own, so
  two workers never keep the same cell). For samplers, a worker keeps a new trial only while
  the trials numbered before it leave room in the budget.
* The end: ``optimization_results.yaml`` as before, then the results table and plot
  (``ftexp.report``), logged to W&B when ``logger=wandb``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.trial import TrialState

from ftexp import records
from ftexp import sweep as sw
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides

log = logging.getLogger(__name__)

# Names of what ftexp stores with a trial (system attrs are ftexp's bookkeeping; user attrs are
# for people reading the study).
CELL = "ftexp:cell"  # system attr: the grid cell this trial runs (cell_key), None once released
WORKER = "ftexp:worker"  # system attr: sweeper process running it (ftexp.sweep.worker_id)
HEARTBEAT = "ftexp:heartbeat"  # system attr: last time that process said it was alive
ADOPT = "ftexp:adopt:"  # system attr prefix: a worker's claim on an interrupted trial
ATTEMPTS = "ftexp:attempts"  # system attr: how many times the trial was started
MAX_ATTEMPTS = 3  # an interrupted trial runs again at most this often in all
RELEASED = "ftexp:released"  # user attr: trial created by a worker that then found no room
ERROR = "ftexp:error"  # user attr: why the trial failed
RUN_DIR = "ftexp:run_dir"  # user attr: the trial's run folder, relative to the sweep dir
BASE_CONFIG = "ftexp:base_config"  # study user attr: the fixed part of the config


def shown_url(url: str) -> str:
    """A storage URL as it may be logged or written down: any password masked."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: nothing to hide
        return str(url)


class SweepError(RuntimeError):
    """A sweep that cannot start as asked; the message says what to change."""

    exit_code = 2


class TrialsFailed(SweepError):
    """Some trials failed; the sweep has recorded them and written its report."""

    exit_code = 1


class FtexpSweeperImpl(OptunaSweeperImpl):
    def __init__(self, sampler: Any, direction: Any, storage: Any, study_name: str | None, n_trials: int | None,
                 n_jobs: int | None, max_failure_rate: float, custom_search_space: str | None,
                 params: DictConfig | None, cells: list | None = None, heartbeat_s: float = 60.0,
                 stale_after_s: float = 600.0, report: bool = True, baselines: list | None = None,
                 sampler_factory: Any = None) -> None:
        super().__init__(sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
                         custom_search_space, params)
        self.cells = list(cells) if cells else None
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.report = report
        self.baselines = [Path(str(b)) for b in baselines or []]
        self.sampler_factory = sampler_factory
        self.me = sw.worker_id()

    # ------------------------------------------------------------------ setup

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.job_idx = 0
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        self.me = sw.worker_id()
        self.trial_fn = sw.TrialFunction(task_function, os.getpid(), str(self.sweep_dir / ".gpu_slots"))
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=self.trial_fn)

    # ------------------------------------------------------------------ the sweep

    def sweep(self, arguments: list[str]) -> None:
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config()
        params_conf.extend(arguments)
        space, fixed_params, fixed_overrides = create_params_from_overrides(params_conf)
        for name in fixed_params:
            space.pop(name, None)
        self.fixed = [f"{k}={v}" for k, v in fixed_params.items()] + list(fixed_overrides)
        self.fixed_params = fixed_params

        is_grid_sampler = isinstance(self.sampler, functools.partial) and \
            self.sampler.func == optuna.samplers.GridSampler
        grid_mode = is_grid_sampler or self.cells is not None
        cells = None
        if grid_mode:
            axes = {k: [sw.normalize(v) for v in self._to_grid_sampler_choices(d)] for k, d in space.items()}
            parsed = [sw.parse_cell(c) for c in self.cells] if self.cells else None
            for key in {k for c in (parsed or []) for k in c} & set(fixed_params):
                # a single value for a cell key (+sweep=sst2_study train.epochs=1): a one-value axis
                axes[key] = [sw.normalize(fixed_params.pop(key))]
                self.fixed = [f"{k}={v}" for k, v in fixed_params.items()] + list(fixed_overrides)
            cells = sw.expand_grid(axes, parsed)
            swept_keys = set(axes) | {k for c in (parsed or []) for k in c}
        else:
            if self.n_trials is None:
                raise SweepError(f"hydra.sweeper.n_trials is needed with the {type(self.sampler).__name__}: "
                                 "how many finished trials should the study hold? e.g. hydra.sweeper.n_trials=20")
            swept_keys = set(space)
        self._check_swept_keys(swept_keys)

        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        study = self._load_study(grid_mode)
        self._check_base_config(study, swept_keys)

        self.failures = 0
        self.attempted = 0
        self.index = self._finished_runs()
        try:
            if grid_mode:
                self._run_grid(study, cells)
            else:
                self._run_sampler(study, space)
        except TrialsFailed:  # too many failures: stop, but leave the summary and the report behind
            self._finish(study, grid_mode)
            raise
        self._finish(study, grid_mode)
        if self.failures:
            raise TrialsFailed(f"{self.failures} of {self.attempted} trials failed in this sweep (the report and "
                             f"failed.json in their folders say why). Rerunning the same command retries them.")

    # ------------------------------------------------------------------ study and storage

    def _storage_url(self) -> Any:
        if self.storage:
            return self.storage
        return f"sqlite:///{self.sweep_dir / 'optuna.db'}"

    def _load_study(self, grid_mode: bool) -> optuna.Study:
        url = self._storage_url()
        self.study_name_used = self.study_name or self.sweep_dir.name
        sampler = optuna.samplers.RandomSampler() if grid_mode else self.sampler
        for attempt in range(6):
            try:
                storage: Any = url
                if isinstance(url, str) and "://" in url:
                    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
                    storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
                study = optuna.create_study(study_name=self.study_name_used, storage=storage, sampler=sampler,
                                            directions=self._directions(), load_if_exists=True)
                break
            except ModuleNotFoundError as err:  # the database driver is an extra
                raise SweepError(f"hydra.sweeper.storage={shown_url(url)} needs the database driver {err.name}: "
                                 "pip install -e \".[postgres]\" (or the driver for your database).") from None
            except Exception as err:  # workers starting together race to create the schema
                # ("table ... already exists", "UNIQUE constraint failed: alembic_version", "locked")
                if attempt == 5 or not type(err).__module__.startswith(("sqlalchemy", "optuna")):
                    if type(err).__module__.startswith("sqlalchemy"):
                        raise SweepError(f"hydra.sweeper.storage={shown_url(url)}: cannot open the study "
                                         f"({sw.error_summary(err)[0]}). Check the server, database and user.") from None
                    raise
                sw.backoff(attempt)
        self.storage_shown = shown_url(url) if isinstance(url, str) else type(url).__name__
        n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        log.info("Study %r in %s: %d finished trial(s) stored", study.study_name, self.storage_shown, n)
        n_all = len(study.get_trials(deepcopy=False))
        if not grid_mode and n_all and self.sampler_factory is not None:
            # A seeded sampler restarted with its first seed replays its first suggestions: the
            # resumed search would repeat finished trials. Continue the seed sequence instead.
            resumed = self.sampler_factory(n_all)
            if resumed is not None:
                study.sampler = self.sampler = resumed
        return study

    def _directions(self) -> list[str]:
        directions = self._get_directions()
        objective = str(self.config.get("objective", ""))
        return [sw.objective_direction(objective) if d == "auto" else d for d in directions]

    def _check_swept_keys(self, swept: set[str]) -> None:
        task = self.config
        if any(k.startswith("lora.") for k in swept) and "lora" not in swept:
            if "lora" in task and not task.lora.get("enabled", True):
                raise SweepError(f"The sweep varies {sorted(k for k in swept if k.startswith('lora.'))} but "
                                 f"lora={task.lora.get('name')} trains no adapters. Add lora=default "
                                 "(the tiny model defaults to lora=none).")

    def _base_config(self, swept: set[str]) -> dict:
        """The composed config minus the hydra node, logging keys and swept keys, flattened."""
        cfg = OmegaConf.to_container(self.config, resolve=False)
        cfg = {k: v for k, v in cfg.items() if k != "hydra" and k not in records.NON_EXPERIMENT_KEYS}
        flat: dict[str, str] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict) and node:
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                flat[prefix] = json.dumps(node, sort_keys=True, default=str)

        walk("", cfg)
        stripped = {s.lstrip("+~") for s in swept}
        return {k: v for k, v in flat.items()
                if not any(k == s or k.startswith(s + ".") for s in stripped)}

    def _check_base_config(self, study: optuna.Study, swept: set[str]) -> None:
        """Refuse to continue a study whose fixed settings differ from this command's: its
        finished cells would count for a different experiment."""
        now = self._base_config(swept)
        stored = study.user_attrs.get(BASE_CONFIG)
        if stored is None:
            study.set_user_attr(BASE_CONFIG, now)
            return
        common = sorted(k for k in set(stored) & set(now) if stored[k] != now[k] and k not in swept)
        if common:
            diffs = "; ".join(f"{k}: {stored[k]} -> {now[k]}" for k in common[:6])
            raise SweepError(
                f"{self.sweep_dir} holds study {study.study_name!r} run with other fixed settings ({diffs}"
                f"{'; ...' if len(common) > 6 else ''}). Repeat the original command to continue that sweep, "
                "or pass hydra.sweep.dir=<new dir> to start another.")
        added = sorted(set(now) - set(stored))
        if added:
            log.warning("Config keys new since this study began (kept at their defaults): %s", added[:10])
            stored.update({k: now[k] for k in added})
            study.set_user_attr(BASE_CONFIG, stored)

    # ------------------------------------------------------------------ liveness

    def _live(self, t: optuna.trial.FrozenTrial) -> bool:
        """A RUNNING trial whose sweeper process is still there."""
        if t.state != TrialState.RUNNING:
            return False
        worker = t.system_attrs.get(WORKER)
        if worker is None:  # created by ask() a moment ago; its owner tags it right away
            started = t.datetime_start.timestamp() if t.datetime_start else 0.0
            return time.time() - started < 30.0
        if worker == self.me:
            return True
        return sw.worker_alive(worker, t.system_attrs.get(HEARTBEAT), self.stale_after_s)

    def _adopt_stale(self, study: optuna.Study, by_key: dict | None) -> list[tuple[optuna.Trial, dict]]:
        """Take over trials left RUNNING by a sweeper that is gone (crash, kill, Ctrl-C): they run
        again here, as the same trial in the same folder, so an interruption costs no extra trial.

        A claim is a per-worker attribute written, then checked against the other live workers'
        claims; on any rival claim this worker lets go (two workers never both keep a trial).
        A trial interrupted ``MAX_ATTEMPTS`` times, or whose cell is no longer in the grid, is
        marked failed instead.
        """
        storage = study._storage
        adopted = []
        for t in storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            if self._live(t):
                continue
            if by_key is None:
                values = {k: sw.normalize(v) for k, v in t.params.items()} or None
            else:
                values = by_key.get(t.system_attrs.get(CELL))
            attempts = int(t.system_attrs.get(ATTEMPTS) or 1)
            if values is None and RUN_DIR not in t.user_attrs:  # stopped before it was given work
                try:
                    storage.set_trial_user_attr(t._trial_id, RELEASED, "its sweep stopped before it was given a cell")
                    study.tell(t.number, state=TrialState.FAIL)
                except Exception:
                    pass
                continue
            if values is None or attempts >= MAX_ATTEMPTS:
                why = ("interrupted: its sweep stopped before it finished"
                       + (f" ({attempts} times)" if values is not None else "; its cell is not in this grid"))
                try:
                    storage.set_trial_user_attr(t._trial_id, ERROR, why)
                    study.tell(t.number, state=TrialState.FAIL)
                    log.warning("Trial %d: %s. Marked failed.", t.number, why)
                except Exception:  # another worker settled it first
                    pass
                continue
            mine = ADOPT + self.me
            storage.set_trial_system_attr(t._trial_id, mine, time.time())
            fresh = storage.get_trial(t._trial_id)
            rivals = [k for k, v in fresh.system_attrs.items()
                      if k.startswith(ADOPT) and k != mine and v is not None
                      and sw.worker_alive(k[len(ADOPT):], v, self.stale_after_s)]
            if rivals or fresh.state != TrialState.RUNNING or self._live(fresh):
                storage.set_trial_system_attr(t._trial_id, mine, None)
                continue
            storage.set_trial_system_attr(t._trial_id, WORKER, self.me)
            storage.set_trial_system_attr(t._trial_id, HEARTBEAT, time.time())
            storage.set_trial_system_attr(t._trial_id, ATTEMPTS, attempts + 1)
            storage.set_trial_system_attr(t._trial_id, mine, None)
            log.warning("Trial %d was left running by a sweep that stopped: running it again (attempt %d).",
                        t.number, attempts + 1)
            adopted.append((optuna.trial.Trial(study, t._trial_id), values))
        return adopted

    def _launch_adopted(self, study: optuna.Study, adopted: list) -> None:
        size = self._batch_size()
        for i in range(0, len(adopted), size):
            self._launch(study, adopted[i:i + size])

    def _heartbeat(self, trial_ids: list[int], stop: threading.Event, storage) -> None:
        while not stop.wait(self.heartbeat_s):
            for tid in trial_ids:
                try:
                    storage.set_trial_system_attr(tid, HEARTBEAT, time.time())
                except Exception as err:  # a busy database: try again next beat
                    log.debug("heartbeat failed: %s", err)

    # ------------------------------------------------------------------ grids

    def _cell_claims(self, study: optuna.Study, me: int) -> tuple[set, set]:
        """(cells with a COMPLETE trial, cells held by another RUNNING trial). An interrupted
        trial still holds its cell: whoever adopts it runs that cell."""
        done, busy = set(), set()
        for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
            key = t.system_attrs.get(CELL)
            if key is None or t.number == me:
                continue
            if t.state == TrialState.COMPLETE:
                done.add(key)
            elif t.state == TrialState.RUNNING:
                busy.add(key)
        return done, busy

    def _claim_cell(self, study: optuna.Study, trial: optuna.Trial, candidates: list[str]) -> str | None:
        storage, tid = study._storage, trial._trial_id
        for attempt, key in enumerate(candidates):
            done, busy = self._cell_claims(study, trial.number)
            if key in done or key in busy:
                continue
            storage.set_trial_system_attr(tid, CELL, key)
            done, busy = self._cell_claims(study, trial.number)
            if key not in done and key not in busy:
                return key
            storage.set_trial_system_attr(tid, CELL, None)  # another worker took it: let go, pick again
            sw.backoff(attempt)
        return None

    def _run_grid(self, study: optuna.Study, cells: list[dict]) -> None:
        by_key = {sw.cell_key(c): c for c in cells}
        budget = len(cells) if self.n_trials is None else min(self.n_trials, len(cells))
        log.info("Grid of %d cell(s)%s", len(cells), "" if budget == len(cells) else f", budget {budget}")
        tried: set[str] = set()
        while True:
            adopted = self._adopt_stale(study, by_key)
            if adopted:
                tried.update(sw.cell_key(values) for _, values in adopted)
                self._launch_adopted(study, adopted)
                continue
            done, busy = self._cell_claims(study, -1)
            n_done = len(done & by_key.keys())
            room = budget - n_done - len(busy & by_key.keys())
            pending = [k for k in by_key if k not in done and k not in busy and k not in tried]
            if n_done >= budget or room <= 0 or not pending:
                if n_done < budget and busy & by_key.keys():
                    log.info("%d cell(s) are running in other workers; leaving them to those.",
                             len(busy & by_key.keys()))
                break
            jobs = []
            for _ in range(min(self._batch_size(), room, len(pending))):
                candidates = [k for k in pending if k not in tried]
                if not candidates:
                    break
                trial = self._ask(study)
                key = self._claim_cell(study, trial, candidates)
                if key is None:
                    self._release(study, trial, "every remaining cell was taken by another worker")
                    break
                tried.add(key)
                values = by_key[key]
                for name, value in values.items():
                    trial.set_user_attr(name, value)
                jobs.append((trial, values))
            if not jobs:
                break
            self._launch(study, jobs)

    # ------------------------------------------------------------------ samplers (tpe, random, ...)

    def _run_sampler(self, study: optuna.Study, space: dict) -> None:
        budget = int(self.n_trials)
        while True:
            adopted = self._adopt_stale(study, None)
            if adopted:
                self._launch_adopted(study, adopted)
                continue
            trials = study._storage.get_all_trials(study._study_id, deepcopy=False)
            complete = sum(t.state == TrialState.COMPLETE for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            room = budget - complete - running
            if room <= 0:
                log.info("Study holds %d finished trial(s) (budget n_trials=%d)%s.", complete, budget,
                         f"; {running} still running elsewhere" if running else "")
                break
            if self.failures >= max(budget, 1):
                log.error("Stopping: %d trials failed in this sweep (see failed.json in their folders).",
                          self.failures)
                break
            jobs = []
            for _ in range(min(self._batch_size(), room)):
                trial = self._ask(study)
                if self._over_budget(study, trial, budget):
                    self._release(study, trial, f"the budget n_trials={budget} was used up by other workers")
                    break
                for name, dist in space.items():
                    trial._suggest(name, dist)
                for name, value in self.fixed_params.items():
                    trial.set_user_attr(name, value)
                if self.custom_search_space_extender:
                    self.custom_search_space_extender(self.config, trial)
                jobs.append((trial, {k: sw.normalize(v) for k, v in trial.params.items()}))
            if not jobs:
                break
            self._launch(study, jobs)

    def _ask(self, study: optuna.Study) -> optuna.Trial:
        trial = study.ask()
        study._storage.set_trial_system_attr(trial._trial_id, WORKER, self.me)
        study._storage.set_trial_system_attr(trial._trial_id, HEARTBEAT, time.time())
        return trial

    def _over_budget(self, study: optuna.Study, trial: optuna.Trial, budget: int) -> bool:
        before = sum(1 for t in study._storage.get_all_trials(study._study_id, deepcopy=False)
                     if t.number < trial.number and t.state in (TrialState.COMPLETE, TrialState.RUNNING))
        return before >= budget

    def _release(self, study: optuna.Study, trial: optuna.Trial, why: str) -> None:
        trial.set_user_attr(RELEASED, why)
        study.tell(trial, state=TrialState.FAIL)

    # ------------------------------------------------------------------ launching

    def _batch_size(self) -> int:
        if self.n_jobs:
            return max(1, int(self.n_jobs))
        launcher = self.config.hydra.get("launcher") or {}
        for key in ("n_jobs", "array_parallelism"):
            n = launcher.get(key)
            if isinstance(n, int) and n != 0:
                return (os.cpu_count() or 1) if n < 0 else n
        return 1

    def _finished_runs(self) -> dict[str, str]:
        """fingerprint -> folder name, for every finished run in the sweep dir."""
        index = {}
        for d in sorted(p for p in self.sweep_dir.iterdir() if p.is_dir()):
            if (d / "metrics.json").exists() and (d / "config.yaml").exists():
                try:
                    cfg = OmegaConf.to_container(OmegaConf.load(d / "config.yaml"), resolve=False)
                except Exception:
                    continue
                index.setdefault(records.experiment_fingerprint(cfg), d.name)
        return index

    def _fingerprint(self, overrides: list[str]) -> str | None:
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                del cfg["hydra"]
            return records.experiment_fingerprint(records.config_dict(cfg))
        except Exception as err:  # a config that does not compose fails in its job, with the reason
            log.debug("could not compose %s: %s", overrides, err)
            return None

    def _launch(self, study: optuna.Study, jobs: list[tuple[optuna.Trial, dict]]) -> None:
        storage = study._storage
        batch = []
        for trial, values in jobs:
            overrides = [f"{k}={sw.format_value(v)}" for k, v in values.items()] + self.fixed
            own = trial.user_attrs.get(RUN_DIR)  # an interrupted trial goes on in its own folder
            reuse = None if own else (self.index.get(self._fingerprint(overrides)) if self.index else None)
            folder = own or reuse or self._new_folder(trial.number, values)
            trial.set_user_attr(RUN_DIR, folder)
            if reuse:
                trial.set_user_attr("ftexp:reused", True)
                log.info("Trial %d: %s finished before in %s; reusing it.", trial.number, sw.run_name(values), folder)
            name = sw.run_name(values) or folder
            overrides += [f"run_name={sw.format_value(name)}", f"hydra.sweep.subdir={sw.format_value(folder)}"]
            batch.append((trial, values, overrides))
            log.info("Trial %d -> %s: %s", trial.number, folder, " ".join(overrides[: len(values)]))

        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=([t._trial_id for t, _, _ in batch], stop, storage),
                                daemon=True)
        beat.start()
        try:
            returns = self.launcher.launch([o for _, _, o in batch], initial_job_idx=batch[0][0].number)
        except Exception as err:  # the launcher itself broke (e.g. a worker process was killed)
            line = sw.error_summary(err)[0]
            log.error("The launcher failed for trials %s: %s", [t.number for t, _, _ in batch], line)
            for trial, values, _ in batch:
                self.attempted += 1
                self._fail(study, trial, f"launcher: {line}", values)
            return
        finally:
            stop.set()
        self.job_idx += len(returns)
        for (trial, values, _), ret in zip(batch, returns):
            self.attempted += 1
            error = None
            if ret.status.name != "COMPLETED":
                error = sw.error_summary(ret._return_value)[0] if ret._return_value is not None else "failed"
            else:
                try:
                    value = ret.return_value
                    vals = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]
                except (TypeError, ValueError):
                    error = f"the task returned {ret.return_value!r}, not a number (objective missing?)"
            if error is not None:
                self._fail(study, trial, error, values)
                continue
            study.tell(trial, values=vals)
            self._index_add(trial.user_attrs[RUN_DIR])
        if self.attempted and self.failures / self.attempted > self.max_failure_rate:
            raise TrialsFailed(f"{self.failures} of {self.attempted} trials failed, more than "
                             f"max_failure_rate={self.max_failure_rate}. See failed.json in their run folders.")

    def _fail(self, study: optuna.Study, trial: optuna.Trial, error: str, values: dict | None = None) -> None:
        self.failures += 1
        trial.set_user_attr(ERROR, error)
        folder = trial.user_attrs.get(RUN_DIR)
        if folder and not (self.sweep_dir / folder / "failed.json").exists():
            # the job never ran far enough to record itself (its overrides did not compose, or the
            # launcher broke): the trial still gets a folder and a record, so the table counts it
            values = values or {k: v for k, v in trial.user_attrs.items() if not k.startswith("ftexp:")}
            records.write_failure(self.sweep_dir / folder, SweepError(error), summary=error, values=values)
        study.tell(trial, state=TrialState.FAIL)
        log.warning("Trial %d failed: %s (recorded; the sweep goes on)", trial.number, error)

    def _index_add(self, folder: str) -> None:
        d = self.sweep_dir / folder
        if (d / "metrics.json").exists() and (d / "config.yaml").exists():
            cfg = OmegaConf.to_container(OmegaConf.load(d / "config.yaml"), resolve=False)
            self.index.setdefault(records.experiment_fingerprint(cfg), folder)

    def _new_folder(self, number: int, values: dict) -> str:
        base = sw.folder_name(number, values)
        folder, k = base, 1
        while (self.sweep_dir / folder).exists():  # e.g. the study was deleted but its folders were not
            k += 1
            folder = f"{base}-{k}"
        return folder

    # ------------------------------------------------------------------ the end

    def _finish(self, study: optuna.Study, grid_mode: bool) -> None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if RELEASED not in t.user_attrs]
        summary: dict[str, Any] = {"name": "ftexp", "study_name": study.study_name, "storage": self.storage_shown,
                                   "n_complete": len(complete), "n_failed": len(failed)}
        directions = self._directions()
        if complete and len(directions) == 1:
            best = study.best_trial
            summary["best_params"] = best.params or {k: v for k, v in best.user_attrs.items() if not k.startswith("ftexp:")}
            summary["best_value"] = best.value
            summary["best_run_dir"] = best.user_attrs.get(RUN_DIR)
            log.info("Best: %s = %s in %s", self.config.get("objective"), best.value, best.user_attrs.get(RUN_DIR))
        elif complete:
            summary["solutions"] = [{"params": t.params, "values": t.values} for t in study.best_trials]
        OmegaConf.save(OmegaConf.create(summary), self.sweep_dir / "optimization_results.yaml")
        log.info("Sweep %s: %d finished, %d failed trial(s) in the study; this invocation ran %d, %d failed.",
                 self.sweep_dir, len(complete), len(failed), self.attempted, self.failures)
        if not self.report:
            return
        try:
            from ftexp import report

            missing = [b for b in self.baselines if not (b / "metrics.json").exists()]
            for b in missing:
                log.warning("hydra.sweeper.baselines: %s holds no finished evaluate.py run; the table leaves it out. "
                            "Run it with evaluate.py output_dir=%s, then `python -m ftexp.report %s --baseline %s`.",
                            b, b, self.sweep_dir, b)
            paths = report.write_report(self.sweep_dir, [b for b in self.baselines if b not in missing])
            log.info("Results: %s", ", ".join(str(p) for p in paths))
            if self.config.get("logger") and self.config.logger.get("name") == "wandb":
                report.log_to_wandb(self.sweep_dir, self.config.logger)
        except Exception as err:  # the runs are safe on disk; the report can be rerun by hand
            log.error("Could not write the report (%s). Run `python -m ftexp.report %s`.", err, self.sweep_dir)
