"""Run-directory files: what a run folder holds, written and read, and the lock that keeps
one live run in it.

A run directory holds ``config.yaml`` (resolved), ``metrics.json`` (flat
``area/name`` keys), ``predictions.jsonl``, ``train_log.jsonl`` and the adapter or
model with its tokenizer; a failed or pruned sweep trial leaves ``failed.json`` or
``pruned.json``. Secrets never reach any of them (``scrub``). Whether a folder holds the
same experiment as a config is ``ftexp.identity``'s question; W&B is ``ftexp.tracker``'s.
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
