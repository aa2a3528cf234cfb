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
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ftexp.config import ConfigError

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
    return scrub(OmegaConf.to_container(cfg, resolve=True))


def write_config(cfg: DictConfig, run_dir: Path) -> None:
    OmegaConf.save(OmegaConf.create(config_dict(cfg)), run_dir / "config.yaml")


def _plain(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def write_metrics(metrics: dict, run_dir: Path, name: str = "metrics.json") -> None:
    path = run_dir / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: _plain(v) for k, v in metrics.items()}, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file


def read_metrics(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "metrics.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def write_failure(run_dir: Path, exc: BaseException, summary: str | None = None,
                  out_of_memory: bool = False, values: dict | None = None) -> None:
    """``failed.json``: why a run stopped (a sweep records it and goes on; the report shows it)."""
    import traceback

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "status": "failed",
        "error": summary or f"{type(exc).__name__}: {exc}",
        "error_type": type(exc).__name__,
        "out_of_memory": out_of_memory,
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-20000:],
    }
    if values:  # the swept values of a run that never composed a config.yaml: the report places it by them
        record["values"] = {k: v for k, v in values.items()}
    path = run_dir / "failed.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def read_failure(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "failed.json"
    return json.loads(path.read_text()) if path.exists() else None


# Keys that say where a run is written or logged, or where caches live - not what it computes.
NON_EXPERIMENT_KEYS = ("output_dir", "run_name", "logger", "cache_dir")


def experiment_fingerprint(config: dict) -> str:
    """The resolved config minus where/how it is logged, as canonical JSON: equal for two runs
    that compute the same thing."""
    kept = {k: v for k, v in config.items() if k not in NON_EXPERIMENT_KEYS}
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
    a = flatten({k: v for k, v in saved.items() if k not in NON_EXPERIMENT_KEYS})
    b = flatten({k: v for k, v in config.items() if k not in NON_EXPERIMENT_KEYS})
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


LOCK = ".ftexp.lock"


@contextmanager
def owned(run_dir: Path):
    """Hold ``run_dir`` for one live run: a second run into the same folder is refused.

    An advisory lock (flock) on ``.ftexp.lock``: the kernel drops it when its process
    dies, so the folder of a killed run is taken over by the next one at once.
    """
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fh = open(run_dir / LOCK, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise ConfigError(f"output_dir={run_dir} is in use by a live run ({holder}). Wait for it to finish, "
                              "or give this run another output_dir.") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        yield run_dir
    finally:
        fh.close()  # closing releases the lock


def write_predictions(rows: list[dict], run_dir: Path) -> None:
    with (run_dir / "predictions.jsonl").open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def wandb_mode(lcfg) -> str:
    """logger.mode, or online with WANDB_API_KEY in the environment and offline without."""
    if lcfg.get("mode"):
        return lcfg.mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def sweep_context() -> dict:
    """In a Hydra multirun job: {"group": the sweep dir's name, "name": this job's overrides}."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

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

    def __init__(self, lcfg, cfg: DictConfig, run_dir: Path):
        self.run = None
        self.lcfg = lcfg
        if lcfg.name == "none":
            return
        if lcfg.name != "wandb":
            raise ValueError(f"logger={lcfg.name}; valid: none, wandb")
        import wandb

        mode = wandb_mode(lcfg)
        if mode == "offline":
            log.warning("No WANDB_API_KEY: logging offline under %s/wandb. Upload later with "
                        "`wandb sync %s/wandb/offline-run-*` (a whole sweep: `wandb sync <sweep dir>/*/wandb/offline-run-*`).",
                        run_dir, run_dir)
        sweep = sweep_context()
        self.run = wandb.init(project=lcfg.project, entity=lcfg.entity, group=lcfg.group or sweep.get("group"),
                              tags=list(lcfg.tags), name=cfg.run_name or sweep.get("name") or Path(run_dir).name,
                              dir=str(run_dir), mode=mode, config=config_dict(cfg), reinit="finish_previous")

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

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
