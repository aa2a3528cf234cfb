"""The experiment tracker: W&B when ``logger=wandb``, nothing otherwise.

The run's config (scrubbed of secrets), its metrics, a table of predictions and, with
``logger.log_model``, the adapter or model as an artifact. In a sweep, each trial is a W&B
run of the sweep's group, and the swept values are top-level config keys.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ftexp.records import config_dict

log = logging.getLogger(__name__)


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
