"""``hydra/sweeper=ftexp``: Optuna sweeps that stop and start again, shared by several workers.

It reads the stock hydra-optuna-sweeper's config but has its own ``sweep()``: the stock one
(1.4.0rc3) asks for ``n_trials`` *new* trials on every invocation, restarts job numbers (a
rerun writes into earlier trials' folders), re-samples an exhausted grid and never takes over a
trial whose process died. Here, on Optuna's and Hydra's public API: grid cells are WAITING
trials (``enqueue_trial``) that ``ask`` hands to one worker each (on SQLite, under
``claim_lock``: SQLite ignores the row lock Optuna relies on); a trial whose heartbeat is
older than ``stale_after_s`` runs again in its folder (``RetryFailedTrialCallback``);
``n_trials`` counts COMPLETE trials; a failed trial leaves ``failed.json`` and the sweep goes on.

``pruner`` (``hydra/sweeper/pruner=median|successive_halving|hyperband``): each trial reports its
evaluations during training (``train.eval_every``) to its Optuna trial and stops when the pruner
gives it up; it is recorded PRUNED, with the step it reached, and counts as finished.
``epochs_from_one_run``: grid cells that differ only in ``train.epochs`` run once, to the largest
number of epochs, writing each smaller one's results at the end of that epoch (``epoch_results``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import optuna
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
from omegaconf import OmegaConf
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.storages import RetryFailedTrialCallback
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from ftexp import records
from ftexp import sweep as sw
from ftexp.config import CONSTANT_SCHEDULES

log = logging.getLogger(__name__)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # fail_stale_trials

CELL, WORKER, ERROR, RUN_DIR = "ftexp:cell", "ftexp:worker", "ftexp:error", "ftexp:run_dir"  # user attrs
RELEASED = "ftexp:released"  # a trial this worker asked for and then left (no room, or a duplicate)
STARTED = "ftexp:started"  # the trial's own number, set once its first heartbeat is stored
PRUNED_AT = "ftexp:pruned"  # why and where the pruner stopped the trial (a pruned trial is finished)
EPOCH_DIRS = "ftexp:epoch_dirs"  # a one-run epoch axis: cell -> the folder its results are written to
FROM_RUN = "ftexp:from_trial"  # a cell whose results a longer run of the epoch axis wrote
LIVE, COUNTED = (TrialState.WAITING, TrialState.RUNNING), (TrialState.COMPLETE, TrialState.RUNNING)


@dataclass
class FtexpSweeperConf(OptunaSweeperConf):
    _target_: str = "hydra_plugins.ftexp_sweeper.ftexp_sweeper.FtexpSweeper"
    # hydra/sweeper/sampler=grid|tpe|..., hydra/sweeper/pruner=median|successive_halving|hyperband (none by default)
    defaults: List[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": None}])
    direction: Any = "auto"  # maximize | minimize | auto (the objective's own direction, ftexp.tasks)
    storage: Any = None  # null: sqlite optuna.db in the sweep dir; postgresql://... for several machines
    study_name: Optional[str] = None  # null: the sweep dir's name
    n_trials: Optional[int] = None  # finished trials the study should hold; null: every grid cell
    n_jobs: Optional[int] = None  # trials per batch; null: the launcher's parallelism
    max_failure_rate: float = 1.0  # stop when more of this invocation's trials fail (1.0: never)
    cells: Optional[List[str]] = None  # explicit grid cells, e.g. ["train.n=100 train.epochs=10"]
    heartbeat_s: int = 10  # how often a running trial says it is alive
    stale_after_s: int = 60  # a trial silent this long was interrupted: it runs again
    report: bool = True  # results.md/.csv/.png when the sweep ends
    baselines: Optional[List[str]] = None  # evaluate.py output dirs shown first in the report
    pruner: Any = None  # an Optuna pruner (hydra/sweeper/pruner=median ...); needs train.eval_every
    epochs_from_one_run: bool = False  # grid cells differing only in train.epochs: one run (constant schedule)


@dataclass
class MedianPrunerConf:
    """Stop a trial whose held-out objective is worse than the median of earlier trials at the same step."""
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5  # trials that run to the end before any is pruned
    n_warmup_steps: int = 0  # steps of each trial never pruned
    interval_steps: int = 1
    n_min_trials: int = 1  # trials that must have reported at a step before it is judged


@dataclass
class SuccessiveHalvingPrunerConf:
    """Asynchronous successive halving: keep the top 1/reduction_factor of trials at each rung."""
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0
    bootstrap_count: int = 0


@dataclass
class HyperbandPrunerConf:
    """Hyperband: successive halving over several brackets of min_resource (steps)."""
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3
    bootstrap_count: int = 0


_store = ConfigStore.instance()
_store.store(group="hydra/sweeper", name="ftexp", node=FtexpSweeperConf, provider="ftexp")
for _name, _node in (("median", MedianPrunerConf), ("successive_halving", SuccessiveHalvingPrunerConf),
                     ("hyperband", HyperbandPrunerConf)):
    _store.store(group="hydra/sweeper/pruner", name=_name, node=_node, provider="ftexp")


def cell_key(cell: dict) -> str:
    """A grid cell's identity, as stored on its trials (user attr ``ftexp:cell``)."""
    return json.dumps(cell, sort_keys=True, default=str)


def finished(t: optuna.trial.FrozenTrial) -> bool:
    """A trial whose cell needs no more work: complete, or stopped by the pruner."""
    return t.state == TrialState.COMPLETE or (t.state == TrialState.PRUNED and PRUNED_AT in t.user_attrs)


class SweepError(RuntimeError):
    """A sweep that cannot go on as asked (exit 2), or that had failed trials (exit 1)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def search_space(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(swept key -> its choices, or an Optuna distribution for ``interval``; fixed overrides).

    A key given more than once takes its last value, swept or fixed, as Hydra does for a single run:
    ``train.n=16,32 train.n=64`` runs n=64 only. Otherwise the fixed value, applied after the swept
    one, would run every trial with it under a folder named for another value.
    """
    space, fixed = {}, {}
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.get_key_element()
        name = key.lstrip("+~")
        space.pop(next((k for k in space if k.lstrip("+~") == name), None), None)
        fixed.pop(name, None)
        if not o.is_sweep_override():
            fixed[name] = o.input_line
        elif o.is_interval_sweep():
            iv = o.value()
            kind = IntDistribution if isinstance(iv.start, int) and isinstance(iv.end, int) else FloatDistribution
            space[key] = kind(iv.start, iv.end, log="log" in iv.tags)
        else:
            space[key] = list(o.sweep_iterator())
    return space, list(fixed.values())


class FtexpSweeper(Sweeper):
    def __init__(self, sampler: Any, **kwargs: Any) -> None:
        self.sampler_cfg, self.opts = sampler, OmegaConf.create(dict(kwargs))

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.sweep_dir = config, Path(str(config.hydra.sweep.dir)).absolute()
        self.me = f"{socket.gethostname()}:{os.getpid()}"
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context,
            task_function=sw.TrialFunction(task_function, os.getpid(), str(self.sweep_dir / ".gpu_slots")))

    def sweep(self, arguments: list[str]) -> None:
        try:
            self._sweep(arguments)
        except SweepError as err:  # a message, not a traceback: the sweep's records are on disk
            print(f"ftexp: error: {err}", file=sys.stderr, flush=True)
            sys.exit(err.exit_code)

    def _sweep(self, arguments: list[str]) -> None:
        o = self.opts
        space, self.fixed = search_space([f"{k}={v}" for k, v in (o.params or {}).items()] + list(arguments))
        grid = str(self.sampler_cfg.get("_target_", "")).endswith("GridSampler") or bool(o.cells)
        if grid:
            cells = [sw.parse_cell(c) for c in o.cells or []]
            for text in [f for f in self.fixed if any(f.split("=")[0] in c for c in cells)]:
                self.fixed.remove(text)  # a single value for a cell's key: a one-value axis
                space.update(search_space([text.replace("=", "=choice(", 1) + ")"])[0])
            if any(not isinstance(v, list) for v in space.values()):
                raise SweepError("interval() sweeps need a sampler (hydra/sweeper/sampler=tpe); a grid lists values.")
            cells = sw.expand_grid(space, cells or None)
        elif o.n_trials is None:
            raise SweepError("hydra.sweeper.n_trials is needed with a sampler: how many finished trials should "
                             "the study hold? e.g. hydra.sweeper.n_trials=20")
        swept = {k.lstrip("+~") for k in ({k for c in cells for k in c} if grid else space)}
        if any(k.startswith("lora.") for k in swept) and not self.config.lora.get("enabled", True):
            raise SweepError(f"The sweep varies {sorted(k for k in swept if k.startswith('lora.'))} but "
                             f"lora={self.config.lora.get('name')} trains no adapters. Add lora=default.")
        self._check_pruner(swept)
        self.leaders = self._epoch_axis(cells, swept) if grid and o.epochs_from_one_run else {}
        if o.epochs_from_one_run and not grid:
            raise SweepError("hydra.sweeper.epochs_from_one_run=true runs a grid's epoch axis as one run; a sampler "
                             "picks epochs one trial at a time. Use hydra/sweeper/sampler=grid.")
        study = self._study(grid)
        self.failures = self.attempted = self.pruned = 0
        try:
            self._run_grid(study, cells) if grid else self._run_sampler(study, space)
        finally:
            self._finish(study)
        if self.failures:
            raise SweepError(f"{self.failures} of {self.attempted} trials failed in this sweep (the report and "
                             "failed.json in their folders say why). Rerunning the same command retries them.", 1)

    def _check_pruner(self, swept: set[str]) -> None:
        """A pruner judges trials by their evaluations during training: refuse a sweep that makes none."""
        o = self.opts
        if not o.pruner:
            return
        if "train.eval_every" not in swept and self.config.train.get("eval_every") is None:
            raise SweepError(f"hydra.sweeper.pruner={o.pruner.get('_target_', o.pruner)} judges trials by their "
                             "evaluations during training, and train.eval_every=null makes none. Set "
                             "train.eval_every=<steps> (or epoch), and train.eval_n=<held-out rows>.")
        if o.epochs_from_one_run:
            raise SweepError("hydra.sweeper.pruner with epochs_from_one_run=true: a pruned run would take the "
                             "results of its shorter cells with it. Use one or the other.")

    def _epoch_axis(self, cells: list[dict], swept: set[str]) -> dict[str, str]:
        """epochs_from_one_run: {cell: the cell whose run writes its results}, for the cells that differ from
        another only in train.epochs; the one with the most epochs runs, and writes the others at their epoch."""
        if "train.epochs" not in swept:
            raise SweepError("hydra.sweeper.epochs_from_one_run=true, but the sweep does not vary train.epochs.")
        if "train.scheduler" not in swept and self.config.train.scheduler not in CONSTANT_SCHEDULES:
            raise SweepError(
                f"hydra.sweeper.epochs_from_one_run=true with train.scheduler={self.config.train.scheduler}: the "
                "learning rate at epoch k of a longer run then depends on its total number of epochs, so its first "
                "k epochs are not the training a k-epoch run would do. Use train.scheduler=constant (or "
                "constant_with_warmup), or hydra.sweeper.epochs_from_one_run=false to run every cell.")
        if self.config.train.get("early_stopping", {}).get("patience") is not None:
            raise SweepError("hydra.sweeper.epochs_from_one_run=true with train.early_stopping.patience: an early "
                             "stop would end the longer run before the epochs of its shorter cells. Use one or the "
                             "other.")
        if "train.max_steps" in swept or self.config.train.get("max_steps"):
            raise SweepError("hydra.sweeper.epochs_from_one_run=true needs runs measured in epochs: "
                             "train.max_steps=null.")
        groups: dict[str, list[dict]] = {}
        for cell in cells:
            rest = {k: v for k, v in cell.items() if k.lstrip("+~") != "train.epochs"}
            groups.setdefault(cell_key(rest), []).append(cell)
        leaders = {}
        for members in groups.values():
            if len(members) < 2:
                continue
            epochs = [sw.parse_value(str(c.get("train.epochs"))) for c in members]
            if any(not isinstance(e, (int, float)) or float(e) != int(e) for e in epochs):
                raise SweepError(f"hydra.sweeper.epochs_from_one_run=true needs whole epochs; the grid has "
                                 f"train.epochs={epochs}.")
            longest = cell_key(members[epochs.index(max(epochs))])
            leaders.update({cell_key(c): longest for c in members if cell_key(c) != longest})
        log.info("epochs_from_one_run: %d cell(s) written by the runs of %d longer cell(s)", len(leaders),
                 len(set(leaders.values())))
        return leaders

    def _study(self, grid: bool) -> optuna.Study:
        from ftexp import tasks  # task classes load torch: only when a sweep starts

        o = self.opts
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        url, name = sw.study_location(self.sweep_dir, o.storage, o.study_name)
        self.url = url
        self.url_shown = make_url(url).render_as_string(hide_password=True)  # no password in logs
        try:  # a misspelt objective fails here, not after every trial has trained
            declared = tasks.metric(str(self.config.objective), str(self.config.task.kind))
        except ValueError as err:
            raise SweepError(str(err)) from None
        for attempt in range(6):  # workers starting together race to create the schema
            try:
                self.storage = sw.open_storage(
                    url, heartbeat_interval=int(o.heartbeat_s), grace_period=int(o.stale_after_s),
                    heartbeat_stale_trial_callback=RetryFailedTrialCallback(max_retry=2))
                study = optuna.create_study(study_name=name, storage=self.storage,
                                            direction=declared.direction if o.direction == "auto" else o.direction,
                                            pruner=instantiate(o.pruner) if o.pruner else None, load_if_exists=True)
                break
            except ModuleNotFoundError as err:  # the database driver is an extra
                raise SweepError(f"hydra.sweeper.storage={self.url_shown} needs the database driver {err.name}: "
                                 "pip install -e \".[postgres]\" (or the driver for your database).") from None
            except Exception as err:
                if not type(err).__module__.startswith(("sqlalchemy", "optuna")):
                    raise
                if attempt == 5:
                    raise SweepError(f"hydra.sweeper.storage={self.url_shown}: cannot open the study ("
                                     f"{records.error_summary(err)[0]}). Check the server, database and user.") from None
                threading.Event().wait(0.2 * (attempt + 1))
        self.study_id = self.storage.get_study_id_from_name(study.study_name)
        n_all = len(study.get_trials(deepcopy=False))
        if not grid:  # a seeded sampler resumed with its first seed would replay its first trials
            seed = self.sampler_cfg.get("seed")
            study.sampler = instantiate(self.sampler_cfg, **({"seed": int(seed) + n_all} if seed is not None else {}))
        log.info("Study %r in %s: %d trial(s) stored", study.study_name, self.url_shown, n_all)
        return study

    def _ask(self, study: optuna.Study) -> optuna.Trial:
        trial = study.ask()  # a WAITING trial if there is one (grid cells, interrupted trials)
        self.storage.record_heartbeat(self._id_of(trial))
        trial.set_user_attr(WORKER, self.me)
        trial.set_user_attr(STARTED, trial.number)
        return trial

    def _recover(self, study: optuna.Study) -> None:
        """The trials of dead sweepers become available again.

        A trial whose heartbeat went stale fails and is retried (``RetryFailedTrialCallback``). A
        sweeper killed between ``ask`` and its first heartbeat leaves a RUNNING trial that no
        heartbeat check can see. A live worker marks its trial STARTED right after ``ask``, so a
        RUNNING trial without that mark, asked for longer ago than ``stale_after_s``, is such an
        orphan. It never ran: it is released (its grid cell is queued again).
        """
        optuna.storages.fail_stale_trials(study)
        cutoff = datetime.datetime.now() - datetime.timedelta(seconds=float(self.opts.stale_after_s))
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get(STARTED) != t.number and t.datetime_start and t.datetime_start < cutoff:
                log.warning("Trial %d was left RUNNING by a sweeper that stopped before starting it: released.",
                            t.number)
                self.storage.set_trial_user_attr(self._id_of(t), RELEASED, "its sweeper stopped before it started")
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # another worker was first
                    study.tell(t.number, state=TrialState.PRUNED)

    def _id_of(self, trial: optuna.Trial) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)

    def _batch(self) -> int:
        launcher = self.config.hydra.get("launcher") or {}
        n = self.opts.n_jobs or launcher.get("n_jobs") or launcher.get("array_parallelism") or 1
        return (os.cpu_count() or 1) if n < 0 else int(n)

    def _run_grid(self, study: optuna.Study, cells: list[dict]) -> None:
        by_key = {cell_key(c): c for c in cells}
        budget = len(cells) if self.opts.n_trials is None else min(int(self.opts.n_trials), len(cells))
        tried: set[str] = set()
        while True:
            with sw.claim_lock(self.url):
                done, held, jobs = self._claim_cells(study, by_key, budget, tried)
            if not jobs:
                return log.info("Grid of %d cell(s): %d finished%s.", len(cells), len(done),
                                f", {len(held)} running in other workers" if held else "")
            self._launch(study, jobs)

    def _claim_cells(self, study: optuna.Study, by_key: dict, budget: int, tried: set[str]):
        """(cells finished, cells held by other workers, this worker's next trials) from the grid."""
        self._recover(study)  # a dead sweeper's trials run again
        trials = study.get_trials(deepcopy=False)
        done = {t.user_attrs.get(CELL) for t in trials if finished(t)} & by_key.keys()
        held = {t.user_attrs.get(CELL) for t in trials if t.state in LIVE} & by_key.keys()
        failed = {t.user_attrs.get(CELL) for t in trials if t.state == TrialState.FAIL and ERROR in t.user_attrs}
        # a longer run writes its shorter cells; once it has failed for real they run on their own
        written_by_longer = {k for k, leader in self.leaders.items() if leader not in done | failed}
        for key in [k for k in by_key if k not in done | held | tried | written_by_longer][
                :max(budget - len(done | held), 0)]:
            study.enqueue_trial({}, user_attrs={CELL: key, **by_key[key]})
        jobs = []
        while len(jobs) < self._batch() and len(done) + len(jobs) < budget and any(
                t.user_attrs.get(CELL) in by_key.keys() - tried
                for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))):
            trial = self._ask(study)
            key = trial.user_attrs.get(CELL)
            twins = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(CELL) == key and (
                finished(t) or (t.state in LIVE and t.number < trial.number))]
            if key not in by_key or key in tried or twins:
                trial.set_user_attr(RELEASED, "its cell is run by another trial")
                study.tell(trial, state=TrialState.PRUNED)
            else:
                tried.add(key)
                jobs.append((trial, by_key[key]))
        return done, held, jobs

    def _run_sampler(self, study: optuna.Study, space: dict) -> None:
        budget = int(self.opts.n_trials)
        while self.failures < max(budget, 1):
            jobs = []
            with sw.claim_lock(self.url):
                self._recover(study)
                room = budget - sum(t.state in COUNTED or finished(t) for t in study.get_trials(deepcopy=False))
                for _ in range(min(self._batch(), room)):
                    trial = self._ask(study)
                    if sum(t.number < trial.number and (t.state in COUNTED or finished(t))
                           for t in study.get_trials(deepcopy=False)) >= budget:
                        trial.set_user_attr(RELEASED, f"the budget n_trials={budget} was used up by other workers")
                        study.tell(trial, state=TrialState.PRUNED)
                        break
                    jobs.append((trial, {k: trial.suggest_categorical(k, d) if isinstance(d, list) else
                                         (trial.suggest_int if isinstance(d, IntDistribution) else trial.suggest_float)(
                                             k, d.low, d.high, log=d.log) for k, d in space.items()}))
            if not jobs:
                return log.info("Study holds %d finished trial(s) (n_trials=%d).", budget - room, budget)
            self._launch(study, jobs)

    def _launch(self, study: optuna.Study, jobs: list[tuple[optuna.Trial, dict]]) -> None:
        batch = []
        for trial, values in jobs:
            folder = trial.user_attrs.get(RUN_DIR)  # an interrupted trial goes on in its own folder
            if folder is None:
                folder = base = sw.folder_name(trial.number, values)
                while (self.sweep_dir / folder).exists():  # the study was deleted, its folders were not
                    folder = f"{base}-{len(folder) - len(base) + 1}"
            for key, value in {**values, RUN_DIR: folder}.items():
                trial.set_user_attr(key, value)
            overrides = [f"{k}={sw.format_value(v)}" for k, v in values.items()] + self.fixed
            overrides += self._epoch_results(study, trial, values)
            # the keys this sweep varies, for the trial's W&B config (ftexp.sweep.swept_values)
            overrides.append(f"+hydra.job.env_set.{sw.SWEPT_ENV}='{','.join(k.lstrip('+~') for k in values)}'")
            if self.opts.pruner:  # the trial's process reports to this trial (ftexp.sweep.trial_reporter)
                overrides.append(f"+hydra.job.env_set.{sw.TRIAL_ENV}='{trial.number}'")
            log.info("Trial %d -> %s: %s", trial.number, folder, " ".join(overrides[:len(values)]))
            batch.append((trial, values, overrides + [f"run_name={sw.format_value(sw.run_name(values) or folder)}",
                                                      f"hydra.sweep.subdir={sw.format_value(folder)}"]))
        stop = threading.Event()
        threading.Thread(target=self._heartbeat, args=([self._id_of(t) for t, _, _ in batch], stop),
                         daemon=True).start()
        try:
            returns = self.launcher.launch([o for _, _, o in batch], initial_job_idx=batch[0][0].number)
        except Exception as err:  # the launcher itself broke (e.g. a worker process was killed)
            returns = [err] * len(batch)
        finally:
            stop.set()
        for (trial, values, _), ret in zip(batch, returns):
            self.attempted += 1
            try:
                if isinstance(ret, Exception):
                    raise ret
                value = ret.return_value  # a failed job's return_value raises its error
                # the shorter cells a longer run wrote are recorded before the run itself, so that no worker
                # sees the run finished and its cells not, and runs them again
                self._adopt_epoch_results(study, trial, ended=not isinstance(value, sw.PrunedTrial))
                if isinstance(value, sw.PrunedTrial):
                    self._pruned(study, trial, value.message)
                else:
                    study.tell(trial, float(value))
            except optuna.exceptions.UpdateFinishedTrialError:
                self._taken_over(trial)
            except Exception as err:  # noqa: BLE001 - recorded as the trial's failure
                self._adopt_epoch_results(study, trial, ended=False)  # what it wrote before it failed
                self._fail(study, trial, err, values)
        if self.failures / max(self.attempted, 1) > self.opts.max_failure_rate:
            raise SweepError(f"{self.failures} of {self.attempted} trials failed, more than max_failure_rate="
                             f"{self.opts.max_failure_rate}. See failed.json in their run folders.", 1)

    def _epoch_results(self, study: optuna.Study, trial: optuna.Trial, values: dict) -> list[str]:
        """The overrides that make a longer cell's run write the results of its shorter cells not yet finished
        (epoch_results), each in a folder of its own, kept on the trial so a retry writes to the same ones."""
        key = cell_key(values)
        trials = study.get_trials(deepcopy=False)
        taken = {t.user_attrs.get(CELL) for t in trials if finished(t) or t.state in LIVE}  # done or running alone
        shorter = [k for k, leader in self.leaders.items() if leader == key and k not in taken]
        if not shorter:
            return []
        folders = dict(trial.user_attrs.get(EPOCH_DIRS) or {})
        for cell in shorter:
            if cell not in folders:
                base = folder = sw.folder_name(trial.number, json.loads(cell))
                while (self.sweep_dir / folder).exists() or folder in folders.values():
                    folder = f"{base}-{len(folder) - len(base) + 1}"
                folders[cell] = folder
        trial.set_user_attr(EPOCH_DIRS, folders)
        epochs = [int(float(v)) for c in shorter for k, v in json.loads(c).items() if k.lstrip("+~") == "train.epochs"]
        dirs = ",".join(sw.format_value(str(self.sweep_dir / folders[c])) for c in shorter)
        return [f"epoch_results.epochs=[{','.join(map(str, epochs))}]", f"epoch_results.dirs=[{dirs}]"]

    def _adopt_epoch_results(self, study: optuna.Study, trial: optuna.Trial, ended: bool) -> None:
        """Record, as finished trials of their own cells, the shorter cells' results a run wrote (also when it
        failed later); a cell whose results are missing after its longer run ``ended`` is recorded failed,
        and runs on its own."""
        folders = trial.user_attrs.get(EPOCH_DIRS) or {}
        objective = str(self.config.objective)
        done = {t.user_attrs.get(CELL) for t in study.get_trials(deepcopy=False) if finished(t)}
        for cell, folder in folders.items():
            if cell in done:
                continue
            metrics = records.read_metrics(self.sweep_dir / folder) or {}
            attrs = {CELL: cell, RUN_DIR: folder, FROM_RUN: trial.number, **json.loads(cell)}
            if metrics.get(objective) is not None:
                study.add_trial(optuna.trial.create_trial(state=TrialState.COMPLETE, value=float(metrics[objective]),
                                                          user_attrs=attrs))
                log.info("Trial %d wrote the results of %s: %s %.4g", trial.number, folder, objective,
                         metrics[objective])
            elif ended:
                error = (f"trial {trial.number} finished without writing these epoch results (its folder "
                         f"{folder} has no {objective}); the cell runs on its own")
                records.write_failure(self.sweep_dir / folder, sw.TrialFailed(error), values=json.loads(cell))
                study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={**attrs, ERROR: error}))
                log.warning("%s", error)

    def _pruned(self, study: optuna.Study, trial: optuna.Trial, message: str) -> None:
        trial.set_user_attr(PRUNED_AT, message)
        study.tell(trial, state=TrialState.PRUNED)  # taken over by another worker: raises, the caller logs it
        self.pruned += 1
        log.info("Trial %d: %s", trial.number, message)

    def _heartbeat(self, trial_ids: list[int], stop: threading.Event) -> None:
        while not stop.wait(float(self.opts.heartbeat_s)):
            for trial_id in trial_ids:
                with contextlib.suppress(Exception):  # a busy database: the next beat will do
                    self.storage.record_heartbeat(trial_id)

    def _fail(self, study: optuna.Study, trial: optuna.Trial, err: BaseException, values: dict) -> None:
        self.failures += 1
        error = str(err) if isinstance(err, sw.TrialFailed) else records.error_summary(err)[0]
        folder = self.sweep_dir / trial.user_attrs[RUN_DIR]
        if not (folder / "failed.json").exists():  # the job never ran far enough to record itself
            records.write_failure(folder, err, values=values)
        try:
            trial.set_user_attr(ERROR, error)
            study.tell(trial, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return self._taken_over(trial)
        log.warning("Trial %d failed: %s (recorded; the sweep goes on)", trial.number, error)

    def _taken_over(self, trial: optuna.Trial) -> None:
        log.warning("Trial %d was closed by another worker while it ran here: its heartbeat looked stale "
                    "(hydra.sweeper.stale_after_s=%s is too short for this machine, or the database was busy). "
                    "What it wrote stays in %s.", trial.number, self.opts.stale_after_s,
                    self.sweep_dir / trial.user_attrs[RUN_DIR])

    def _finish(self, study: optuna.Study) -> None:
        from ftexp import report  # pandas and matplotlib: only when a sweep ends

        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        failed = sum(ERROR in t.user_attrs for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        pruned = sum(PRUNED_AT in t.user_attrs for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
        summary = {"name": "ftexp", "study_name": study.study_name, "storage": self.url_shown,
                   "n_complete": len(complete), "n_failed": failed, "n_pruned": pruned}
        if complete:
            best = study.best_trial
            summary.update(best_params={k: v for k, v in best.user_attrs.items() if not k.startswith("ftexp:")},
                           best_value=best.value, best_run_dir=best.user_attrs.get(RUN_DIR))
        OmegaConf.save(OmegaConf.create(summary), self.sweep_dir / "optimization_results.yaml")
        log.info("Sweep %s: %d finished, %d pruned, %d failed trial(s) in the study; this invocation ran %d, "
                 "%d pruned, %d failed.", self.sweep_dir, len(complete), pruned, failed, self.attempted, self.pruned,
                 self.failures)
        if self.opts.report:
            try:  # the runs are safe on disk whatever happens here; the report can be rerun by hand
                paths = report.write_report(self.sweep_dir, [Path(str(b)) for b in self.opts.baselines or []])
                log.info("Results: %s", ", ".join(str(p) for p in paths))
                if self.config.get("logger") and self.config.logger.get("name") == "wandb":
                    report.log_to_wandb(self.sweep_dir, self.config.logger)
            except Exception as err:
                log.error("Could not write the report (%s). Run `python -m ftexp.report %s`.", err, self.sweep_dir)
