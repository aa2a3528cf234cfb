"""What the entry scripts share: turning expected failures into one clear line and
a non-zero exit, picking the objective out of the metrics for a sweeper, and
reading which settings the command line gave."""

from __future__ import annotations

import logging
import sys

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser

from ftexp.errors import ConfigError
from ftexp.distributed import is_main

log = logging.getLogger("ftexp")


def run_guarded(fn, cfg, objective: str | None = None):
    """Run a recipe (and pick its objective); a ConfigError becomes a one-line
    message and exit code 2 instead of a traceback."""
    try:
        metrics = fn(cfg)
        if not objective or not is_main():  # other ranks of a torchrun neither evaluate nor report
            return metrics
        if objective not in metrics and objective.startswith("eval/") and not cfg.eval.enabled:
            log.warning("eval.enabled=false: no %s to return; the run's results are in its directory.", objective)
            return None
        return objective_value(metrics, objective)
    except ConfigError as err:
        log.error("%s", err)
        print(f"ftexp: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def objective_value(metrics: dict, objective: str) -> float:
    if objective not in metrics or metrics[objective] is None:
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        raise ConfigError(f"objective={objective!r} is not in this run's metrics. Available: {numeric}")
    return float(metrics[objective])


def command_line_keys() -> list[str]:
    """Config keys (or groups) set on the command line of a Hydra app; [] outside one."""
    if not HydraConfig.initialized():
        return []
    parsed = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    return [o.key_or_group for o in parsed]


# Overrides whose value is a path. A sweep's trial folders are named by Hydra after their overrides
# ("0_learning_rate=0.001"), and Hydra's override grammar refuses an unquoted "=" inside a value.
PATH_KEYS = ("run", "output_dir", "judge.baseline", "data.path", "hydra.run.dir", "hydra.sweep.dir")


def quote_paths(argv: list[str]) -> list[str]:
    """``argv`` with each path override (``PATH_KEYS``) whose value holds an ``=`` put in quotes,
    so ``run=outputs/sweeps/s/0_lr=0.001`` works as typed; quoted values are left as they are."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in PATH_KEYS and "=" in value and value[:1] not in "'\"":
            arg = f"{key}='{value}'" if "'" not in value else f'{key}="{value}"'
        out.append(arg)
    return out
