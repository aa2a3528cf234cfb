"""A sweep directory -> the study's results table and plot.

    python -m ftexp.report outputs/sweeps/sst2_study-tiny-sst2
    python -m ftexp.report <sweep dir> --baseline outputs/runs/zero_shot --baseline outputs/runs/five_shot

Writes into the sweep dir (or ``--out``):

* ``results.md`` / ``results.csv``: one row per cell (the swept values other than the seed):
  Method, # training data (epochs), the task's metrics (Accuracy and F1 for classification,
  ROUGE for summarization, MCRMSE for scoring, exact match for QA), training loss first->last,
  Irregular output, wall time, peak memory, trainable parameters, and the status. Several
  seeds in a cell: mean +- std and the number of seeds. A failed run shows as failed with its
  error; a run without results (interrupted) as incomplete. Nothing is dropped.
* ``results.png``: the objective against training-set size (log axis), one line per epochs
  value (or per LoRA rank); baselines as dashed lines.

The sweeper runs this at the end of every multirun; run it by hand on a sweep in progress, on an
older sweep, or to add baseline rows (``evaluate.py`` run dirs).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ftexp import records

RUN_FILES = ("config.yaml", "metrics.json", "failed.json")
SKIP_DIRS = {"base_model", "model", "adapter", "checkpoints", "wandb", ".hydra", ".gpu_slots"}
SEED_KEYS = ("train.seed",)
# Axes shown in their own columns are everything except these, which Method and
# "# training data (epochs)" already show.
SHOWN_ELSEWHERE = ("train.n", "train.epochs", "train.max_steps", "lora.r", "model.name", "quant.name", "lora.name",
                   "lora.enabled", "model.name_or_path")

METRICS_BY_KIND = {
    "classification": [("Accuracy", "eval/accuracy"), ("F1", "eval/f1")],
    "summarization": [("ROUGE-1", "eval/rouge1"), ("ROUGE-2", "eval/rouge2"), ("ROUGE-L", "eval/rougeL")],
    "scoring": [("MCRMSE", "eval/mcrmse")],
    "qa": [("Exact match", "eval/exact_match"), ("Token F1", "eval/token_f1")],
}


class ReportError(ValueError):
    """Input the report cannot use; the message says what was expected."""


# ----------------------------------------------------------------------------- reading runs


@dataclass
class Run:
    path: Path
    config: dict  # flat: "train.n" -> 100
    metrics: dict | None
    failure: dict | None
    partial: bool = False  # config holds only the swept values (failed before composing)

    @property
    def status(self) -> str:
        if self.metrics is not None:
            return "ok"
        return "failed" if self.failure is not None else "incomplete"


def load_run(path: Path) -> Run:
    config = {}
    for name in ("config.yaml", ".hydra/config.yaml"):  # the second is unresolved: resolve if it can be
        if (path / name).exists() and not config:
            loaded = OmegaConf.load(path / name)
            for resolve in (True, False):
                try:
                    config = records.flatten(records.scrub(OmegaConf.to_container(loaded, resolve=resolve)))
                    break
                except Exception:
                    continue
    failure = records.read_failure(path)
    partial = False
    if not config and failure and failure.get("values"):  # a trial whose config never composed
        config, partial = dict(failure["values"]), True
    return Run(path=path, config=config, metrics=records.read_metrics(path), failure=failure, partial=partial)


def is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_FILES)


def find_runs(root: Path, depth: int = 2) -> list[Run]:
    """Run directories at or under ``root`` (a sweep dir, or a single run dir)."""
    if is_run_dir(root):
        return [load_run(root)]
    runs = []
    if depth > 0:
        for child in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in SKIP_DIRS
                            and not p.name.startswith(".")):
            runs.extend(find_runs(child, depth - 1))
    return runs


# ----------------------------------------------------------------------------- cells


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in records.NON_EXPERIMENT_KEYS)


def fill_partial_configs(runs: list[Run]) -> None:
    """A trial that failed before composing knows only its swept values: give it the settings
    every composed run of the sweep shares, so it lands in its own cell with the right label."""
    full = [r.config for r in runs if r.config and not r.partial]
    if not full:
        return
    common = {k: v for k, v in full[0].items() if all(c.get(k, object()) == v for c in full[1:])}
    for run in runs:
        if run.partial:
            # a swept config group (model=a,b) is stored by its name: drop the composed run's keys under it
            groups = [k for k in run.config if "." not in k]
            kept = {k: v for k, v in common.items() if not any(k.startswith(g + ".") for g in groups)}
            run.config = {**kept, **run.config}


def swept_axes(runs: list[Run]) -> list[str]:
    """Config keys whose value differs between runs, in config order."""
    keys: list[str] = []
    for run in runs:
        keys.extend(k for k in run.config if k not in keys)
    axes = []
    for key in keys:
        if _ignored(key):
            continue
        values = {json.dumps(r.config.get(key), sort_keys=True, default=str) for r in runs if r.config}
        if len(values) > 1:
            axes.append(key)
    return axes


@dataclass
class Cell:
    values: dict  # axis -> value (seed excluded)
    runs: list[Run] = field(default_factory=list)
    baseline: bool = False

    @property
    def config(self) -> dict:
        for run in self.results or self.runs:
            if run.config:
                return run.config
        return {}

    @property
    def per_seed(self) -> list[Run]:
        """One run per seed: a finished one where there is one (a retried cell keeps its success)."""
        best: dict[str, Run] = {}
        rank = {"ok": 0, "failed": 1, "incomplete": 2}
        for run in self.runs:
            seed = json.dumps([run.config.get(k) for k in SEED_KEYS], default=str)
            if seed not in best or rank[run.status] < rank[best[seed].status]:
                best[seed] = run
        return list(best.values())

    @property
    def results(self) -> list[Run]:
        return [r for r in self.per_seed if r.status == "ok"]

    def values_of(self, key: str) -> list[float]:
        out = []
        for run in self.results:
            v = run.metrics.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append(float(v))
        return out

    def stat(self, key: str) -> tuple[float | None, float | None, int]:
        vals = self.values_of(key)
        if not vals:
            return None, None, 0
        return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)

    @property
    def status(self) -> str:
        seeds = self.per_seed
        counts = {s: sum(r.status == s for r in seeds) for s in ("ok", "failed", "incomplete")}
        errors = [r.failure.get("error", "") for r in seeds if r.status == "failed" and r.failure]
        error = f": {errors[0]}" if errors else ""
        if counts["ok"] == len(seeds):
            return "ok"
        if counts["ok"] == 0 and counts["failed"] == len(seeds):
            return f"failed{error}"
        if counts["ok"] == 0 and counts["incomplete"] == len(seeds):
            return "incomplete"
        parts = [f"{n} {s}" for s, n in counts.items() if n]
        return ", ".join(parts) + error


def group_cells(runs: list[Run], axes: list[str]) -> list[Cell]:
    keys = [a for a in axes if a not in SEED_KEYS]
    cells: dict[str, Cell] = {}
    for run in runs:
        values = {k: run.config.get(k) for k in keys}
        ident = json.dumps(values, sort_keys=True, default=str)
        cells.setdefault(ident, Cell(values=values)).runs.append(run)
    return list(cells.values())


# ----------------------------------------------------------------------------- formatting


def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return ""
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def fmt_stat(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None:
        return ""
    return fmt_num(mean, digits) + (f" ± {std:.{digits}f}" if std is not None else "")


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s:.1f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


def fmt_mb(mb: float | None) -> str:
    if mb is None:
        return ""
    return f"{mb:,.0f} MB" if mb < 10240 else f"{mb / 1024:.1f} GB"


def fmt_params(n: float | None) -> str:
    if n is None:
        return ""
    n = float(n)
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,.0f}"


def method_label(config: dict, baseline: bool = False) -> str:
    model = config.get("model.name") or config.get("model.name_or_path") or "?"
    if baseline:
        shots = int(config.get("eval.shots") or 0)
        return f"{model} · {'zero-shot' if shots == 0 else f'{shots}-shot'} prompt"
    quant = config.get("quant.name") or "none"
    if config.get("lora.enabled") is False:
        how = "full fine-tune"
    else:
        r = config.get("lora.r")
        kind = "QLoRA" if quant == "nf4" else ("LoRA int8" if quant == "int8" else "LoRA")
        how = f"{kind} (r={r})" if r is not None else kind
    return f"{model} · {how}"


def training_size(cell: Cell) -> tuple[int | None, str]:
    """(n as a number, "1,000 (3)") for a cell: train.n, or the rows actually used when null."""
    config = cell.config
    if cell.baseline:
        return 0, "0"
    n = config.get("train.n")
    if n is None:
        sizes = cell.values_of("train/samples")
        n = int(sizes[0]) if sizes else None
    size = f"{n:,}" if isinstance(n, int) else "full" if n is None else str(n)
    steps, epochs = config.get("train.max_steps"), config.get("train.epochs")
    if steps:
        return n, f"{size} ({steps} step{'s' if steps != 1 else ''})"
    if epochs is not None:
        return n, f"{size} ({float(epochs):g})"
    return n, size


def metric_columns(cells: list[Cell], objective: str | None) -> list[tuple[str, str]]:
    kinds = []
    for cell in cells:
        kind = cell.config.get("task.kind")
        if kind and kind not in kinds:
            kinds.append(kind)
    present = {k for c in cells for r in c.results for k in r.metrics}
    if not kinds:
        kinds = [k for k, cols in METRICS_BY_KIND.items() if any(key in present for _, key in cols)]
    cols: list[tuple[str, str]] = []
    for kind in kinds:
        cols.extend(c for c in METRICS_BY_KIND.get(kind, []) if c not in cols)
    # LLM-judge scores, when the runs have them: one column per criterion, as the runs name them
    from ftexp.judge import BOOKKEEPING

    for key in sorted(k for k in present if k.startswith("judge/")):
        name = key.split("/", 1)[1]
        if name not in BOOKKEEPING and not name.startswith("control_") and not name.endswith(("_argmax", "_lo", "_hi")):
            cols.append((f"Judge {name.replace('reference_', 'reference ')}", key))
    if objective and objective not in [k for _, k in cols]:
        cols.append((objective, objective))
    return cols


# ----------------------------------------------------------------------------- the table


@dataclass
class Table:
    title: str
    objective: str | None
    direction: str
    cells: list[Cell]
    axes: list[str]
    metric_cols: list[tuple[str, str]]
    n_runs: int

    @property
    def extra_axes(self) -> list[str]:
        return [a for a in self.axes if a not in SHOWN_ELSEWHERE and a not in SEED_KEYS]

    @property
    def show_seeds(self) -> bool:
        return any(a in SEED_KEYS for a in self.axes) or any(len(c.per_seed) > 1 for c in self.cells)

    @property
    def show_irregular(self) -> bool:
        return any(c.values_of("eval/irregular") for c in self.cells)

    def headers(self) -> list[str]:
        h = ["Method", "# training data (epochs)"] + self.extra_axes + [name for name, _ in self.metric_cols]
        h += ["training loss first→last"]
        if self.show_irregular:
            h.append("Irregular output")
        h += ["Wall time", "Peak memory", "Trainable params"]
        if self.show_seeds:
            h.append("Seeds")
        return h + ["Status"]

    def row(self, cell: Cell) -> list[str]:
        _, size = training_size(cell)
        out = [method_label(cell.config, cell.baseline), size]
        out += [_axis_text(cell.values.get(a)) for a in self.extra_axes]
        failed = not cell.results
        for _, key in self.metric_cols:
            out.append("failed" if failed and cell.status.startswith("failed") else fmt_stat(*cell.stat(key)[:2]))
        first, last = cell.stat("train/loss_first")[0], cell.stat("train/loss_last")[0]
        out.append(f"{first:.3f} → {last:.3f}" if first is not None and last is not None else "")
        if self.show_irregular:
            counts = cell.values_of("eval/irregular")
            digits = 0 if all(float(v).is_integer() for v in counts) and len(counts) == 1 else 1
            out.append(fmt_stat(*cell.stat("eval/irregular")[:2], digits=digits))
        wall = [r.metrics.get("train/runtime_s", 0.0) + r.metrics.get("eval/runtime_s", 0.0) for r in cell.results]
        out.append(fmt_seconds(statistics.fmean(wall)) if wall else "")
        out.append(fmt_mb(cell.stat("train/peak_memory_mb")[0]))
        out.append(fmt_params(cell.stat("train/trainable_params")[0]))
        if self.show_seeds:
            out.append(str(len(cell.results)) + (f"/{len(cell.per_seed)}" if len(cell.results) != len(cell.per_seed) else ""))
        out.append(cell.status)
        return out

    def csv_rows(self) -> tuple[list[str], list[list]]:
        head = ["Method", "# training data", "epochs", "max_steps"] + self.extra_axes
        for name, _ in self.metric_cols:
            head += [name, f"{name} std"]
        head += ["training loss first", "training loss last", "Irregular output", "Wall time (s)",
                 "Peak memory (MB)", "Trainable params", "Seeds", "Status", "Runs"]
        rows = []
        for cell in self.cells:
            n, _ = training_size(cell)
            cfg = cell.config
            row: list[Any] = [method_label(cfg, cell.baseline), n, cfg.get("train.epochs") if not cell.baseline else 0,
                              cfg.get("train.max_steps") if not cell.baseline else None]
            row += [cell.values.get(a) for a in self.extra_axes]
            for _, key in self.metric_cols:
                mean, std, _ = cell.stat(key)
                row += [mean, std]
            wall = [r.metrics.get("train/runtime_s", 0.0) + r.metrics.get("eval/runtime_s", 0.0) for r in cell.results]
            row += [cell.stat("train/loss_first")[0], cell.stat("train/loss_last")[0], cell.stat("eval/irregular")[0],
                    statistics.fmean(wall) if wall else None, cell.stat("train/peak_memory_mb")[0],
                    cell.stat("train/trainable_params")[0], len(cell.results), cell.status,
                    " ".join(r.path.name for r in cell.per_seed)]
            rows.append(row)
        return head, rows

    def markdown(self) -> str:
        heads = self.headers()
        lines = [f"# Results: {self.title}", ""]
        ok = sum(1 for c in self.cells for r in c.per_seed if r.status == "ok" and not c.baseline)
        failed = sum(1 for c in self.cells for r in c.per_seed if r.status == "failed" and not c.baseline)
        sweep_cells = [c for c in self.cells if not c.baseline]
        lines.append(f"Objective: `{self.objective}` ({self.direction}). {len(sweep_cells)} cell(s) from "
                     f"{self.n_runs} run folder(s): {ok} finished, {failed} failed"
                     + (f", {self.n_runs - ok - failed} superseded or incomplete" if self.n_runs - ok - failed else "")
                     + ".")
        if self.axes:
            lines.append(f"Swept: {', '.join(f'`{a}`' for a in self.axes)}.")
        lines += ["", "| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
        for cell in self.cells:
            lines.append("| " + " | ".join(v.replace("|", "\\|") for v in self.row(cell)) + " |")
        lines += ["", "![objective against training-set size](results.png)", ""]
        problems = [(c, r) for c in self.cells for r in c.per_seed if r.status != "ok"]
        if problems:
            lines.append("Runs without results:")
            for _, run in problems:
                why = (run.failure or {}).get("error", "no metrics.json (interrupted, or still running)")
                lines.append(f"- `{run.path.name}`: {run.status}: {why}")
            lines.append("")
        return "\n".join(lines)


def _axis_text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "null" if v is None else str(v)


def _sort_key(cell: Cell) -> tuple:
    n, _ = training_size(cell)
    cfg = cell.config
    if cell.baseline:  # baselines first: zero-shot, then by number of shots
        return (False, int(cfg.get("eval.shots") or 0), method_label(cfg, True), 0.0, "")
    epochs = cfg.get("train.epochs")
    return (True, method_label(cfg, cell.baseline), n if isinstance(n, (int, float)) else math.inf,
            epochs if isinstance(epochs, (int, float)) else 0.0, json.dumps(cell.values, sort_keys=True, default=str))


def build_table(sweep_dir: Path, baselines: list[Path] = ()) -> Table:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.exists():
        raise ReportError(f"{sweep_dir} does not exist. Pass a sweep dir (e.g. outputs/sweeps/<name>).")
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir} is not a directory.")
    runs = find_runs(sweep_dir)
    if not runs:
        raise ReportError(f"No runs under {sweep_dir}: expected run folders holding config.yaml, metrics.json "
                          "or failed.json (one per trial of a sweep).")
    fill_partial_configs(runs)
    axes = swept_axes(runs)
    cells = group_cells(runs, axes)
    for base in baselines:
        base = Path(base)
        if not base.is_dir():
            raise ReportError(f"baseline {base} does not exist (give an evaluate.py run dir).")
        found = [r for r in find_runs(base) if r.metrics is not None]
        if not found:
            raise ReportError(f"baseline {base} holds no finished run (no metrics.json).")
        for run in found:
            cells.append(Cell(values={}, runs=[run], baseline=True))
    objectives = [r.config.get("objective") for r in runs if r.config.get("objective")]
    objective = max(set(objectives), key=objectives.count) if objectives else None
    from ftexp.sweep import objective_direction

    cells.sort(key=_sort_key)
    return Table(title=sweep_dir.name, objective=objective,
                 direction=objective_direction(objective) if objective else "maximize", cells=cells, axes=axes,
                 metric_cols=metric_columns(cells, objective), n_runs=len(runs))


# ----------------------------------------------------------------------------- the plot


def plot(table: Table, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = table.objective or (table.metric_cols[0][1] if table.metric_cols else None)
    sweep = [c for c in table.cells if not c.baseline and c.results]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    axes = set(table.axes)
    if "train.n" in axes or len({training_size(c)[0] for c in sweep}) > 1:
        x_of, x_label, logx = (lambda c: training_size(c)[0]), "training examples (n)", True
        line_keys = [k for k in ("train.epochs", "train.max_steps", "lora.r") if k in axes]
    elif "lora.r" in axes:
        x_of, x_label, logx = (lambda c: c.config.get("lora.r")), "LoRA rank r", True
        line_keys = [k for k in ("train.epochs",) if k in axes]
    else:
        numeric = [a for a in table.extra_axes + ["train.epochs"] if a in axes]
        first = numeric[0] if numeric else None
        x_of = (lambda c: c.config.get(first)) if first else (lambda c: table.cells.index(c))
        x_label, logx, line_keys = (first or "cell"), False, []
    others = [a for a in table.axes if a not in SEED_KEYS and a not in line_keys and a != "train.n"
              and a not in ("lora.r",) and a in table.extra_axes]
    line_keys = line_keys + others[:1] if not line_keys else line_keys
    lines: dict[str, list] = {}
    for cell in sweep:
        x = x_of(cell)
        mean, std, _ = cell.stat(key) if key else (None, None, 0)
        if x is None or mean is None or not isinstance(x, (int, float)):
            continue
        label = ", ".join(f"{k.split('.')[-1]}={_axis_text(cell.config.get(k))}" for k in line_keys) or key
        lines.setdefault(label, []).append((x, mean, std or 0.0))
    for label, pts in sorted(lines.items()):
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=label)
    for cell in table.cells:
        if cell.baseline and key:
            mean = cell.stat(key)[0]
            if mean is not None:
                ax.axhline(mean, linestyle="--", linewidth=1, color="gray")
                ax.annotate(method_label(cell.config, True), (0.01, mean), xycoords=("axes fraction", "data"),
                            fontsize=8, color="gray", va="bottom")
    if logx and lines:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(key or "objective")
    ax.set_title(f"{table.title}: {key}")
    ax.grid(True, alpha=0.3)
    if lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- writing


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # concurrent workers finishing together never leave half a file


def write_report(sweep_dir: Path, baselines: list[Path] = (), out_dir: Path | None = None) -> list[Path]:
    """Write results.md, results.csv and results.png; return their paths."""
    table = build_table(Path(sweep_dir), list(baselines))
    out = Path(out_dir or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "results.md"
    _atomic_write(md, table.markdown())
    head, rows = table.csv_rows()
    csv_path = out / "results.csv"
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(head)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    tmp.replace(csv_path)
    png = out / "results.png"
    tmp_png = out / "results.tmp.png"
    plot(table, tmp_png)
    tmp_png.replace(png)
    return [md, csv_path, png]


def log_to_wandb(sweep_dir: Path, lcfg) -> None:
    """Log the results table and plot to W&B, in the sweep's group, as a run of its own."""
    import logging

    import wandb

    log = logging.getLogger(__name__)
    sweep_dir = Path(sweep_dir)
    table = build_table(sweep_dir)
    mode = records.wandb_mode(lcfg)
    run = wandb.init(project=lcfg.project, entity=lcfg.get("entity"), group=lcfg.get("group") or sweep_dir.name,
                     name=f"{sweep_dir.name} results", job_type="report", dir=str(sweep_dir), mode=mode,
                     reinit="finish_previous", config={"sweep_dir": sweep_dir.name, "objective": table.objective})
    run.log({"results": wandb.Table(columns=table.headers(), data=[table.row(c) for c in table.cells])})
    if (sweep_dir / "results.png").exists():
        run.log({"results_plot": wandb.Image(str(sweep_dir / "results.png"))})
    run.finish()
    if mode == "offline":
        log.warning("W&B is offline (no WANDB_API_KEY). Upload the sweep with `wandb sync %s/wandb/offline-run-* "
                    "%s/*/wandb/offline-run-*`.", sweep_dir, sweep_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftexp.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep dir (hydra.sweep.dir) or a single run dir")
    parser.add_argument("--baseline", type=Path, action="append", default=[],
                        help="an evaluate.py run dir (zero-/k-shot), or a folder of them; repeatable")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep dir)")
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.sweep_dir, args.baseline, args.out)
    except ReportError as err:
        print(f"ftexp.report: error: {err}", file=sys.stderr)
        return 2
    print((paths[0]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
