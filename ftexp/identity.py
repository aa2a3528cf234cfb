"""A run's identity: which config keys make the experiment, and whether a folder holds it.

A finished run is reused, and a killed one resumed, when its ``config.yaml`` describes the
same experiment as the config at hand; a folder holding another experiment is refused
with the keys that differ. Where a run is written or logged, and how evaluation batches
its rows, are not part of the identity (``NON_EXPERIMENT_KEYS``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ftexp.errors import ConfigError
from ftexp.records import config_dict, read_metrics

log = logging.getLogger(__name__)

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
