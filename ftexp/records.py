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
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)


def scrub(obj):
    """Drop values whose key looks like a credential."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if _SECRET_KEY.search(str(k)) else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
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


def write_predictions(rows: list[dict], run_dir: Path) -> None:
    with (run_dir / "predictions.jsonl").open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


class Tracker:
    """Experiment tracker facade: W&B when logger=wandb, nothing otherwise."""

    def __init__(self, lcfg, cfg: DictConfig, run_dir: Path):
        self.run = None
        self.lcfg = lcfg
        if lcfg.name == "none":
            return
        if lcfg.name != "wandb":
            raise ValueError(f"logger={lcfg.name}; valid: none, wandb")
        import wandb

        mode = lcfg.mode
        if mode is None:
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            if mode == "offline":
                log.warning("No WANDB_API_KEY: logging offline under %s/wandb. Upload later with "
                            "`wandb sync %s/wandb/offline-run-*`.", run_dir, run_dir)
        self.run = wandb.init(project=lcfg.project, entity=lcfg.entity, group=lcfg.group, tags=list(lcfg.tags),
                              name=cfg.run_name, dir=str(run_dir), mode=mode, config=config_dict(cfg),
                              reinit="finish_previous")

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
