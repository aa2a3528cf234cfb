"""Run-directory files and W&B.

A run directory holds ``config.yaml`` (resolved), ``metrics.json`` (flat
``area/name`` keys), ``predictions.jsonl``, ``train_log.jsonl`` and the adapter or
model with its tokenizer. Secrets never reach any of them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import traceback
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ftexp import files
from ftexp.errors import ConfigError

log = logging.getLogger(__name__)

# A credential's key: "token", "hf_token", "hub_token", "api_key", "WANDB_API_KEY", "client_secret",
# "password" - but not settings that merely mention tokens ("tokenizer_max_texts", "max_new_tokens",
# "pad_token").
_SECRET_KEY = re.compile(
    r"(?:^|[_.-])(?:api[_-]?key|apikey|secret|password|passwd)$"
    r"|^token$|(?:^|[_.-])(?:hf|hub|auth|access|api|bearer|refresh|session|wandb|github|gh)[_-]?token$",
    re.IGNORECASE)


# Values that are credentials whatever their key: Hugging Face, GitHub and OpenAI-style tokens.
_SECRET_VALUE = re.compile(r"^(?:hf_[A-Za-z0-9]{30,}|gh[pousr]_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,})$")


def scrub(obj):
    """Drop values whose key looks like a credential, or that look like a token themselves."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if _SECRET_KEY.search(str(k)) else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    if isinstance(obj, str) and _SECRET_VALUE.match(obj.strip()):
        return "<redacted>"
    return obj


def config_dict(cfg: DictConfig) -> dict:
    """The resolved config as plain data: fixed-choice settings become their strings."""
    return scrub(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def write_config(cfg: DictConfig, run_dir: Path) -> None:
    OmegaConf.save(OmegaConf.create(config_dict(cfg)), run_dir / "config.yaml")


def _plain(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def write_metrics(metrics: dict, run_dir: Path, name: str = "metrics.json") -> None:
    text = json.dumps({k: _plain(v) for k, v in metrics.items()}, indent=2, sort_keys=True) + "\n"
    files.atomic_write(run_dir / name, text)


def read_metrics(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def error_summary(exc: BaseException) -> tuple[str, BaseException]:
    """(one line, the exception that explains it). ``sys.exit(2)`` from a ConfigError is
    explained by the ConfigError it was raised in."""
    cause = exc.__context__ if isinstance(exc, SystemExit) and exc.__context__ is not None else exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    if isinstance(exc, SystemExit) and cause is exc:
        text = f"exit code {exc.code}"
    return (f"{type(cause).__name__}: {text}" if text else type(cause).__name__)[:500], cause


def write_failure(run_dir: Path, exc: BaseException, values: dict | None = None) -> str:
    """``failed.json``: why a run stopped (a sweep records it and goes on; the report shows it).
    ``values``: the swept values of a run that never composed a config (the report places it by
    them). Returns the error's one-line summary."""
    line, cause = error_summary(exc)
    record = {"status": "failed", "error": line, "error_type": type(cause).__name__,
              "out_of_memory": type(cause).__name__ in ("OutOfMemoryError", "MemoryError")
              or "out of memory" in str(cause).lower(),
              "traceback": "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))[-20000:]}
    if values:
        record["values"] = dict(values)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    files.atomic_write(Path(run_dir) / "failed.json", json.dumps(record, indent=2) + "\n")
    return line


def read_failure(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "failed.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_pruned(run_dir: Path, step: int, epoch: float, objective: str, value: float, reason: str) -> None:
    """``pruned.json``: the sweep's pruner stopped this run at ``step``, where the objective on the held-out
    rows was ``value`` (the report lists the run as pruned, with that step)."""
    record = {"status": "pruned", "step": step, "epoch": epoch, "objective": objective, "value": value,
              "reason": reason}
    files.atomic_write(Path(run_dir) / "pruned.json", json.dumps(record, indent=2) + "\n")


# Keys that say where a run is written or logged, or where caches live - not what it computes.
# epoch_results only adds folders for earlier epochs; the run's own results are the same with or without it.
# Settings that say where a run goes, how it is logged, or how evaluation batches its rows, not what
# the run computes (evaluation gives the same outputs at any batch shape): a finished run is reused,
# and its folder taken over, whatever they are; a sweep's table does not show them as axes.
NON_EXPERIMENT_KEYS = ("output_dir", "run_name", "logger", "cache_dir", "epoch_results", "eval.batch_size",
                       "eval.batch_tokens")


def is_experiment_key(key: str) -> bool:
    """Whether a dotted config key takes part in what a run computes (see ``NON_EXPERIMENT_KEYS``)."""
    return not any(key == k or key.startswith(k + ".") for k in NON_EXPERIMENT_KEYS)


def experiment_fingerprint(config: dict) -> str:
    """The resolved config minus ``NON_EXPERIMENT_KEYS``, as canonical JSON: equal for two runs
    that compute the same thing."""
    kept = {k: v for k, v in flatten(config).items() if is_experiment_key(k)}
    return json.dumps(kept, sort_keys=True, default=str)


def reusable_metrics(run_dir: Path, cfg: DictConfig) -> dict | None:
    """The metrics of a finished run in ``run_dir`` made from the same config, or None.

    Lets a rerun sweep (or a repeated command with the same output_dir) skip work that is done.
    Finished = ``metrics.json`` written (it is written last); same config = the resolved
    ``config.yaml`` equals this one apart from logging keys.
    """
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    saved = run_dir / "config.yaml"
    if metrics is None or not saved.exists():
        return None
    old = OmegaConf.to_container(OmegaConf.load(saved), resolve=False)
    if experiment_fingerprint(old) != experiment_fingerprint(config_dict(cfg)):
        return None
    log.info("%s already holds finished metrics for this config: reusing them (delete metrics.json to rerun).",
             run_dir)
    return metrics


def flatten(node, prefix: str = "") -> dict:
    """A nested dict as dotted keys: {"train": {"n": 100}} -> {"train.n": 100}."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def config_differences(saved: dict, config: dict) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, new value) where two resolved configs differ (logging keys aside)."""
    a = {k: v for k, v in flatten(saved).items() if is_experiment_key(k)}
    b = {k: v for k, v in flatten(config).items() if is_experiment_key(k)}
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if json.dumps(a.get(k), default=str) != json.dumps(b.get(k), default=str)]


def check_same_experiment(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse ``run_dir`` when it holds a run made from another config.

    Its files (metrics, adapter, base model, checkpoints) describe that run; writing
    this one over them would mix two experiments in one folder. The same config
    reuses the folder: finished metrics are returned, a killed run resumes.
    """
    saved = Path(run_dir) / "config.yaml"
    if not saved.exists():
        return
    try:
        old = OmegaConf.to_container(OmegaConf.load(saved), resolve=False)
    except Exception as err:  # unreadable: do not guess, do not overwrite
        raise ConfigError(f"output_dir={run_dir}: its config.yaml cannot be read ({err}). "
                          "Give this run another output_dir, or delete that folder to replace it.") from err
    differ = config_differences(old, config_dict(cfg))
    if differ:
        shown = ", ".join(f"{k} ({_short(there)} there, {_short(now)} now)" for k, there, now in differ[:6])
        more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
        raise ConfigError(
            f"output_dir={run_dir} holds a run made from another config: {shown}{more}. Its files are kept. "
            "Give this run another output_dir, or delete that folder to replace it."
        )


def _short(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def resolve_run_dir(cfg: DictConfig) -> Path:
    """The folder a run writes to, made if missing: output_dir, else Hydra's run directory."""
    path = Path(cfg.output_dir) if cfg.output_dir else Path(HydraConfig.get().runtime.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


LOCK = ".ftexp.lock"


@contextmanager
def owned(run_dir: Path):
    """Hold ``run_dir`` for one live run: a second run into the same folder is refused.

    An advisory lock (``files.locked``) on ``.ftexp.lock``: the kernel drops it when its process
    dies, so the folder of a killed run is taken over by the next one at once.
    """
    run_dir = Path(run_dir)
    try:
        with files.locked(run_dir / LOCK, wait=False) as fh:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            fh.flush()
            yield run_dir
    except files.Busy as busy:
        raise ConfigError(f"output_dir={run_dir} is in use by a live run ({busy.holder}). Wait for it to finish, "
                          "or give this run another output_dir.") from None


def write_predictions(rows: list[dict], run_dir: Path) -> None:
    with (run_dir / "predictions.jsonl").open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def result_row(metrics: dict, objective: str, criteria=()) -> str:
    """The line a finished run prints: its scores, the judge's ratings of ``criteria``,
    the loss, irregular outputs and the time taken."""
    parts = []
    if "eval/accuracy" in metrics:
        parts.append(f"accuracy {metrics['eval/accuracy']:.3f}  F1 {metrics.get('eval/f1', float('nan')):.3f}")
    for key in ("eval/rouge1", "eval/rougeL", "eval/exact_match", "eval/mcrmse"):
        if metrics.get(key) is not None:  # null when nothing parsed (e.g. mcrmse)
            parts.append(f"{key.split('/')[1]} {metrics[key]:.4f}")
    if objective in metrics and not any(objective.split("/")[-1].lower() in p.lower() for p in parts):
        parts.append(f"{objective} {metrics[objective]}")
    if "judge/n" in metrics:
        rated = [c for c in criteria if f"judge/{c}" in metrics]
        parts.append("judge " + " ".join(f"{c} {metrics[f'judge/{c}']:.2f}" for c in rated))
        if "judge/control_gap_consistency" in metrics:
            lo, hi = metrics["judge/control_gap_consistency_lo"], metrics["judge/control_gap_consistency_hi"]
            flag = "" if lo > 0 else " JUDGE CANNOT TELL A TRUE SUMMARY FROM A WRONG ONE"
            parts.append(f"consistency gap {metrics['judge/control_gap_consistency']:+.2f} [{lo:+.2f}, {hi:+.2f}]{flag}")
        verdicts = [c for c in criteria if f"judge/valid_{c}" in metrics]
        if verdicts:  # judge.control: the validity check per criterion (ftexp/judge.py judge_is_valid)
            bad = [c for c in verdicts if not metrics[f"judge/valid_{c}"]]
            parts.append(f"judge valid for {', '.join(c for c in verdicts if c not in bad) or 'no criterion'}"
                         + (f", INVALID for {', '.join(bad)}" if bad else ""))
        lost = "".join(f", {metrics[f'judge/{k}']} {k}" for k in ("unparsed", "failed") if metrics.get(f"judge/{k}"))
        parts.append(f"judge calls {metrics['judge/requests']} (cache {metrics['judge/cache_hits']}{lost})")
    if "train/loss_first" in metrics:
        first, last = metrics["train/loss_first"], metrics["train/loss_last"]
        parts.append(f"loss {first:.3f}->{last:.3f}" + (" (ROSE: last above first)" if last > first else ""))
    if "eval/irregular" in metrics:
        top = metrics.get("eval/irregular_top") or ""
        parts.append(f"irregular {metrics['eval/irregular']}" + (f" [{top}]" if top else ""))
    total = metrics.get("train/runtime_s", 0.0) + metrics.get("eval/runtime_s", 0.0)
    parts.append(f"time {total:.1f}s (eval n={metrics.get('eval/n')})")
    return " | ".join(parts)


def wandb_mode(lcfg) -> str:
    """logger.mode, or online with WANDB_API_KEY in the environment and offline without."""
    if lcfg.get("mode"):
        return str(lcfg.mode)
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def sweep_context() -> dict:
    """In a Hydra multirun job: {"group": the sweep dir's name, "name": this job's overrides}."""
    try:
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return {}
        return {"group": Path(hc.sweep.dir).name, "name": hc.job.override_dirname or None}
    except Exception:  # not under Hydra (tests calling finetune directly)
        return {}


class Tracker:
    """Experiment tracker facade: W&B when logger=wandb, nothing otherwise.

    In a sweep, runs are grouped by the sweep dir's name and named from their swept values
    (the ftexp sweeper sets ``run_name``). Without WANDB_API_KEY the run is written offline
    under ``<run dir>/wandb`` and the log says how to upload it. Keys are never logged: the
    config passes through ``scrub`` and W&B reads the key from the environment itself.
    """

    def __init__(self, lcfg, cfg: DictConfig, run_dir: Path, swept: dict | None = None):
        self.run = None
        self.lcfg = lcfg
        if lcfg.name == "none":
            return
        import wandb

        mode = wandb_mode(lcfg)
        if mode == "offline":
            log.warning("No WANDB_API_KEY: logging offline under %s/wandb. Upload later with "
                        "`wandb sync %s/wandb/offline-run-*` (a whole sweep: `wandb sync <sweep dir>/*/wandb/offline-run-*`).",
                        run_dir, run_dir)
        sweep = sweep_context()
        self.run = wandb.init(project=lcfg.project, entity=lcfg.entity, group=lcfg.group or sweep.get("group"),
                              tags=list(lcfg.tags), name=cfg.run_name or sweep.get("name") or Path(run_dir).name,
                              dir=str(run_dir), mode=mode, reinit="finish_previous",
                              # the swept values also as top-level keys: the runs table's and panels' columns
                              config={**config_dict(cfg), **(swept or {})})

    @property
    def report_to(self) -> list[str]:
        return ["wandb"] if self.run is not None else []

    def log(self, data: dict, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in data.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    def table(self, name: str, rows: list[dict]) -> None:
        if self.run is None or not rows:
            return
        import wandb

        cols = list(rows[0])
        self.run.log({name: wandb.Table(columns=cols, data=[[json.dumps(r[c]) if isinstance(r[c], (dict, list)) else r[c]
                                                               for c in cols] for r in rows])})

    def artifact(self, folder: Path, kind: str) -> None:
        """Log ``folder`` (the trained adapter or model) as a W&B artifact named after the run,
        when ``logger.log_model`` asks for it."""
        if self.run is None or not self.lcfg.get("log_model") or not Path(folder).is_dir():
            return
        import wandb

        art = wandb.Artifact(re.sub(r"[^A-Za-z0-9._-]+", "-", f"{self.run.name}-{kind}").strip("-"), type=kind)
        art.add_dir(str(folder))
        self.run.log_artifact(art)

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
