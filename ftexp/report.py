"""A sweep's results table and plot: ``python -m ftexp.report <sweep dir>`` writes results.md, .csv and .png."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from ftexp import files, identity, intervals, records, tracker
from ftexp.tasks import KINDS, metric_direction
from ftexp.tasks.base import JUDGE_BOOKKEEPING

# Swept axes that Method and "# training data (epochs)" already show; every other one gets a column.
SHOWN_ELSEWHERE = ("train.n", "train.epochs", "train.max_steps", "lora.r", "model.name", "quant.name", "lora.name",
                   "lora.enabled", "model.name_or_path")
TABLE_METRICS = {  # the task metrics the table shows, in this order, where the runs' task kind declares them
    "eval/accuracy": "Accuracy", "eval/f1": "F1", "eval/rouge1": "ROUGE-1", "eval/rouge2": "ROUGE-2",
    "eval/rougeL": "ROUGE-L", "eval/mcrmse": "MCRMSE", "eval/exact_match": "Exact match", "eval/token_f1": "Token F1",
    # the instruction-tuning study's error breakdown: answers that are empty, too long, loop, or are
    # well-formed but wrong (counts)
    "eval/empty": "Empty", "eval/too_long": "Too long", "eval/repetitive": "Repetitive", "eval/wrong": "Wrong"}
COUNTS = ("Empty", "Too long", "Repetitive", "Wrong")  # shown as whole numbers, one decimal for a mean over seeds
# The means every row ends with, as results.csv names them ("wall": training plus evaluation time).
COSTS = {"training loss first": "train/loss_first", "training loss last": "train/loss_last",
         "Irregular output": "eval/irregular", "Wall time (s)": "wall", "Peak memory (MB)": "train/peak_memory_mb",
         "Trainable params": "train/trainable_params"}
UNITS = {  # how results.md writes the last three
    "Wall time (s)": lambda s: f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h",
    "Peak memory (MB)": lambda mb: f"{mb:,.0f} MB" if mb < 10240 else f"{mb / 1024:.1f} GB",
    "Trainable params": lambda n: f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,.0f}"}
STATUS_RANK = {"ok": 0, "pruned": 1, "failed": 2, "incomplete": 3}  # the best try of a cell first
RUN_FILES = ("config.yaml", "metrics.json", "failed.json", "pruned.json")  # any one makes a folder a run folder
Cell = namedtuple("Cell", "values runs")  # the runs of one combination of swept values (the seed aside)
MARKS = {"best": "*", "baseline": "†"}  # beyond noise against the best cell, against the baseline
TEST_RESULTS = ("beyond noise", "within noise", "not comparable")  # a paired test's outcomes
log = logging.getLogger(__name__)


class ReportError(ValueError):
    """Input the report cannot use; the message says what was expected."""


@dataclass
class RunFolder:
    """One run folder: its flat config ("train.n" -> 100), metrics, failure record and pruning record."""
    path: Path
    config: dict
    metrics: dict | None
    failure: dict | None
    partial: bool = False  # config holds only the swept values (failed before composing)
    pruned: dict | None = None  # pruned.json: the sweep's pruner stopped the run ({"step", "epoch", "value", ...})

    @property
    def status(self) -> str:
        """ok (metrics.json), pruned (pruned.json), failed (failed.json) or incomplete (none of them)."""
        return ("ok" if self.metrics is not None else "pruned" if self.pruned is not None
                else "failed" if self.failure is not None else "incomplete")

    def describe(self) -> str:
        """The status as the Status column words it: "ok", "pruned at step 40 (epoch 0.49)", "failed: <error>"."""
        if self.status == "pruned":
            step, epoch = self.pruned.get("step", "?"), self.pruned.get("epoch")
            return f"pruned at step {step}" + (f" (epoch {epoch:.3g})" if isinstance(epoch, (int, float)) else "")
        return f"failed: {self.failure.get('error', '')}" if self.status == "failed" else self.status


def read_pruned(run_dir: Path) -> dict | None:
    """A run's pruned.json (written when the sweep's pruner stopped it), or None."""
    path = Path(run_dir) / "pruned.json"
    return json.loads(path.read_text()) if path.exists() else None


def read_predictions(run_dir: Path) -> list[dict] | None:
    """The rows of a run's predictions.jsonl, or None when it has none or one that cannot be read."""
    path = Path(run_dir) / "predictions.jsonl"
    try:
        with path.open(encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:  # unreadable, or not JSON lines
        log.warning("%s cannot be read (%s); that run's metrics are shown without intervals.", path, err)
        return None
    return rows if all(isinstance(r, dict) for r in rows) else None


def find_runs(root: Path, depth: int = 2) -> list[RunFolder]:
    """The run folders at or under ``root`` (a sweep dir, or a single run dir)."""
    if not any((root / name).exists() for name in RUN_FILES):
        return [run for p in sorted(root.iterdir()) if depth > 0 and p.is_dir() and p.name[0] != "." and p.name not in
                {"base_model", "model", "adapter", "checkpoints", "wandb"} for run in find_runs(p, depth - 1)]
    config, failure = {}, records.read_failure(root)
    for path, r in [(root / n, r) for n in ("config.yaml", ".hydra/config.yaml") for r in (True, False)]:
        with contextlib.suppress(Exception):  # missing or unreadable; resolved if it can be (the .hydra one is not)
            config = config or identity.flatten(records.scrub(OmegaConf.to_container(OmegaConf.load(path), resolve=r)))
    partial = not config and bool(failure and failure.get("values"))  # never composed: failed.json has the values
    return [RunFolder(root, dict(failure["values"]) if partial else config, records.read_metrics(root), failure, partial,
                read_pruned(root))]


def fill_partial_configs(runs: list[RunFolder]) -> None:
    """Give a trial that failed before composing (its swept values only) the settings every composed run shares."""
    full = [r.config for r in runs if r.config and not r.partial]
    common = {k: v for k, v in full[0].items() if all(c.get(k, object()) == v for c in full[1:])} if full else {}
    for run in (r for r in runs if r.partial and full):
        groups = tuple(k + "." for k in run.config if "." not in k)  # a swept group (model=a,b): none of its keys
        run.config = {**{k: v for k, v in common.items() if not k.startswith(groups)}, **run.config}


def metric_columns(cells: list[Cell], objective: str | None) -> list[tuple[str, str]]:
    """(column name, metric key): the task metrics the runs' kind declares, judge criteria, and the objective."""
    present = {k for c in cells for r in c.runs if r.metrics for k in r.metrics}
    kinds = {r.config.get("task.kind") for c in cells for r in c.runs} & set(KINDS)
    declared = {m.name for kind in kinds for m in KINDS[kind].metrics} if kinds else present
    cols = [(name, key) for key, name in TABLE_METRICS.items() if key in declared]
    judge = [k for k in sorted(present) if k.startswith("judge/") and k[6:] not in JUDGE_BOOKKEEPING  # a criterion
             and not k[6:].startswith(("control_", "valid_")) and not k.endswith(("_argmax", "_lo", "_hi"))]
    cols += [(f"Judge {k[6:].replace('reference_', 'reference ')}", k) for k in judge]
    return cols + ([(objective, objective)] if objective and objective not in [k for _, k in cols] else [])


def run_row(run: RunFolder, keys: list[str], baseline: bool) -> dict:
    """A run as a row: its cell and seed, method, training size ("1,000 (2)"), status and finite metrics."""
    cfg, shots = run.config, int(run.config.get("eval.shots") or 0) if baseline else 0
    metrics = {k: float(v) for k, v in (run.metrics or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    method = "full fine-tune" if cfg.get("lora.enabled") is False else {"nf4": "QLoRA", "int8": "LoRA int8"}.get(
        cfg.get("quant.name"), "LoRA") + (f" (r={cfg['lora.r']})" if cfg.get("lora.r") is not None else "")
    method = f"{'zero' if shots == 0 else shots}-shot prompt" if baseline else method
    n = 0 if baseline else cfg.get("train.n")  # null: the rows the run used
    n = int(metrics["train/samples"]) if n is None and "train/samples" in metrics else n
    steps, epochs = (None, 0) if baseline else (cfg.get("train.max_steps"), cfg.get("train.epochs"))
    size = f"{n:,}" if isinstance(n, int) else "full" if n is None else str(n)
    size += (f" ({steps} step{'s' * (steps != 1)})" if steps else
             "" if baseline or epochs is None else f" ({float(epochs):g})")
    values, model = {k: cfg.get(k) for k in keys}, cfg.get("model.name") or cfg.get("model.name_or_path") or "?"
    pruned = run.pruned or {}  # the objective's last intermediate value where the pruner stopped the run
    return {**metrics, **values, "Method": f"{model} · {method}", "# training data": n, "epochs": epochs,
            "intermediate": pruned.get("value"), "intermediate of": pruned.get("objective"),
            "max_steps": steps, "size": size, "baseline": baseline, "run": run, "status": run.status, "shots": shots,
            "wall": metrics.get("train/runtime_s", 0.0) + metrics.get("eval/runtime_s", 0.0),
            "cell": str(run.path) if baseline else json.dumps(values, default=str), "seed": cfg.get("train.seed"),
            "n": pd.to_numeric(n, errors="coerce"), "e": pd.to_numeric(epochs, errors="coerce")}  # for sorting


class Table:
    """A sweep's runs and baselines as one row per cell, in table order: each metric's mean, std over seeds and
    bootstrap interval over examples, and the objective's paired difference from the best cell and baseline."""

    def __init__(self, sweep_dir: Path, baselines: list[Path] = (), resamples: int = intervals.RESAMPLES):
        runs = find_runs(sweep_dir) if sweep_dir.is_dir() else []
        if not runs:
            raise ReportError(f"No runs under {sweep_dir}: expected run folders holding config.yaml, metrics.json, "
                              "failed.json or pruned.json." if sweep_dir.exists() else f"{sweep_dir} does not exist.")
        fill_partial_configs(runs)
        configs = [r.config for r in runs if r.config]  # swept: the keys whose value differs between runs
        keys = dict.fromkeys(k for c in configs for k in c if identity.is_experiment_key(k))
        self.axes = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]
        keys, rows = [a for a in self.axes if a != "train.seed"], []
        self.extra_axes = [a for a in keys if a not in SHOWN_ELSEWHERE]  # shown in columns of their own
        for base in map(Path, baselines):
            found = [r for r in find_runs(base) if r.metrics is not None] if base.is_dir() else []
            if not found:
                raise ReportError(f"baseline {base} holds no finished run (the metrics.json of an evaluate.py run).")
            rows += [run_row(r, keys, True) for r in found]
        frame = pd.DataFrame(rows + [run_row(r, keys, False) for r in runs], dtype=object).astype({"baseline": bool})
        frame = frame.sort_values("status", key=lambda s: s.map(STATUS_RANK), kind="stable")  # the best try first
        self.runs = frame.drop_duplicates(["cell", "seed"]).sort_index()  # one run per seed of each cell
        self.title, self.n_runs = sweep_dir.name, len(runs)
        self.objective = next(iter(pd.Series([r.config.get("objective") for r in runs], dtype=object).mode()), None)
        self.metric_cols = metric_columns([Cell({}, list(self.runs["run"]))], self.objective)
        present = {k for r in self.runs["run"] if r.metrics for k in r.metrics}
        self.verdicts = {f"valid {k[12:]}": k for k in sorted(present) if k.startswith("judge/valid_")
                         and k != "judge/valid_against"}  # the judge's validity per criterion (ftexp/judge.py)
        numbers = {**dict(self.metric_cols), **COSTS, **self.verdicts}  # column -> metric key
        values = self.runs.reindex(columns=list(numbers.values())).astype(float).where(self.runs["status"] == "ok")
        values = values.set_axis(list(numbers), axis=1).groupby(self.runs["cell"])

        def status(runs: pd.Series) -> str:  # "ok", "failed: <error>", "pruned at step N", or runs in each state
            states = [r.status for r in runs]
            error = next((f": {r.failure.get('error', '')}" for r in runs if r.status == "failed"), "")
            counts = ", ".join(f"{states.count(s)} {s}" for s in STATUS_RANK if s in states)
            return runs.iloc[0].describe() if len(set(states)) == 1 else counts + error
        counts = self.runs.groupby("cell")["run"].agg(Status=status, Runs=lambda rs: " ".join(r.path.name for r in rs),
                                                      tries="size", Seeds=lambda rs: sum(r.status == "ok" for r in rs))
        intermediate = pd.to_numeric(self.runs["intermediate"], errors="coerce").where(
            (self.runs["status"] == "pruned") & (self.runs["intermediate of"] == self.objective))
        intermediate = intermediate.groupby(self.runs["cell"]).mean().rename("Intermediate objective")
        cells = frame.drop_duplicates("cell").set_index("cell").drop(columns=list(numbers), errors="ignore")
        self.cells = cells.sort_index().join([values.mean(), values.std().add_suffix(" std"), counts, intermediate])
        self.cells = self.cells.sort_values(["baseline", "shots", "Method", "n", "e"],
                                            ascending=[False, True, True, True, True])  # stable: by cell
        self.objective_col = next((name for name, key in self.metric_cols if key == self.objective), None)
        self.direction = metric_direction(self.objective) if self.objective else "maximize"
        self.resamples, self.references = resamples, {label: self.best_cell(label == "baseline") for label in MARKS}
        statistics = self.cell_statistics()
        differences, tests = self.paired_tests(statistics)
        self.paired_examples = sorted({d.n for d in differences.values()})  # how many examples each test resampled
        self.cells = self.cells.join(self.interval_columns(statistics, differences, tests))
        self.compared = [label for label in MARKS  # the columns of tests that found something to pair or refuse
                         if self.cells.get(f"vs {label} test", pd.Series(dtype=object)).isin(TEST_RESULTS).any()]

    def best_cell(self, baseline: bool) -> str | None:
        """The cell with the best mean objective among the sweep's cells, or among the baselines; None without one."""
        if self.objective_col is None:
            return None
        values = self.cells.loc[self.cells["baseline"] == baseline, self.objective_col].astype(float).dropna()
        return None if values.empty else values.idxmin() if self.direction == "minimize" else values.idxmax()

    def cell_statistics(self) -> dict[tuple[str, str], intervals.Statistic]:
        """(column, cell) -> the statistic of that metric in that cell, from its finished runs' predictions."""
        keys = {key: name for name, key in self.metric_cols if name not in COUNTS}
        ok = self.runs[self.runs["status"] == "ok"]
        per_run = pd.Series([run_statistics(run, keys) for run in ok["run"]], index=ok.index, dtype=object)
        return {(name, cell): found for cell, group in per_run.groupby(ok["cell"]) for key, name in keys.items()
                if (found := cell_statistic([s.get(key) for s in group])) is not None}

    def paired_tests(self, statistics: dict) -> tuple[dict, dict]:
        """The objective of each cell against the best cell's and the best baseline's: ({(label, cell): their
        difference, for the cells on the same examples}, {(label, cell): "best", "baseline" or "not comparable"})."""
        differences, tests = {}, {}
        for label, reference in self.references.items():
            theirs = statistics.get((self.objective_col, reference))
            for cell in self.cells.index if reference is not None else ():
                mine = statistics.get((self.objective_col, cell))
                if cell == reference:
                    tests[label, cell] = label
                elif mine is not None and theirs is not None:
                    if intervals.comparable([mine, theirs]):
                        differences[label, cell] = intervals.difference(mine, theirs)
                    else:
                        tests[label, cell] = "not comparable"
        return differences, tests

    def interval_columns(self, statistics: dict, differences: dict, tests: dict) -> pd.DataFrame:
        """Per cell, all bootstrapped at once: each metric's interval ("<column> lo", "<column> hi"), and the
        objective's difference from the best cell with its interval and test ("vs best", "vs best lo",
        "vs best hi", "vs best test": best, beyond noise, within noise or not comparable), the same from the
        baseline."""
        found = intervals.bootstrap([*statistics.values(), *differences.values()], self.resamples)
        columns = {f"{name} {bound}": {} for name, _ in self.metric_cols if name not in COUNTS
                   for bound in ("lo", "hi")}
        columns.update({f"vs {label}{part}": {} for label, reference in self.references.items()
                        if reference is not None for part in ("", " lo", " hi", " test")})
        for (name, cell), bounds in zip(statistics, found):
            columns[f"{name} lo"][cell], columns[f"{name} hi"][cell] = bounds.low, bounds.high
        for (label, cell), bounds in zip(differences, found[len(statistics):]):
            columns[f"vs {label}"][cell], columns[f"vs {label} lo"][cell], columns[f"vs {label} hi"][cell] = (
                bounds.value, bounds.low, bounds.high)
            columns[f"vs {label} test"][cell] = "beyond noise" if bounds.excludes(0) else "within noise"
        for (label, cell), test in tests.items():
            columns[f"vs {label} test"][cell] = test
        return pd.DataFrame(columns, index=self.cells.index)

    def shown(self) -> pd.DataFrame:
        """The table as results.md and W&B show it: text, each metric as "value ± h (sd s)" (h: half its 95%
        interval's width, where the runs have predictions; s: the spread over seeds, where a cell has several)."""
        def stat(mean, std, digits: int = 3, low=math.nan, high=math.nan) -> str:  # "" without a value
            if pd.isna(mean):
                return ""
            text = f"{mean:,.0f}" if abs(mean) >= 1000 else f"{mean:.{digits}f}"
            text += "" if pd.isna(low) or pd.isna(high) else f" ± {(high - low) / 2:.{digits}f}"
            return text + ("" if pd.isna(std) else f" (sd {std:.{digits}f})")
        t = self.cells
        out = t[["Method", "size"]].rename(columns={"size": "# training data (epochs)"})
        for axis in self.extra_axes:  # a float to 3 significant digits
            out[axis] = t[axis].map(lambda v: f"{v:.3g}" if isinstance(v, float) else "null" if v is None else str(v))
        for name, _ in self.metric_cols:
            if name in COUNTS:  # a whole count for one run, one decimal for a mean over seeds
                out[name] = [stat(m, s, int(pd.notna(s))) for m, s in zip(t[name], t[f"{name} std"])]
            else:
                out[name] = list(map(stat, t[name], t[f"{name} std"], [3] * len(t), t[f"{name} lo"], t[f"{name} hi"]))
        if self.objective_col is not None and t["Intermediate objective"].notna().any():  # pruned: its last value
            stopped = t.loc[t[self.objective_col].isna(), "Intermediate objective"].dropna()
            out.loc[stopped.index, self.objective_col] = stopped.map("{:.3f} (intermediate)".format)
        for label in self.compared:  # "-0.042 *": the objective's difference from the best cell, beyond noise
            out[f"vs {label}"] = [test if test in (label, "not comparable") else "" if pd.isna(diff) else
                                  f"{diff:+.3f}" + (f" {MARKS[label]}" if test == "beyond noise" else "")
                                  for diff, test in zip(t[f"vs {label}"], t[f"vs {label} test"])]
        out["training loss first→last"] = [  # a loss that ended above where it began: the run diverged
            f"{a:.3f} → {b:.3f}" + (" (rose)" if b > a else "") if pd.notna(a) and pd.notna(b) else ""
            for a, b in zip(t["training loss first"], t["training loss last"])]
        if t["Irregular output"].notna().any():
            out["Irregular output"] = [stat(m, s, int(pd.notna(s)))
                                       for m, s in zip(t["Irregular output"], t["Irregular output std"])]
        if self.verdicts:  # so nobody reads an invalid judge's ratings as findings
            out["Judge verdict"] = [verdict(row) for row in t[list(self.verdicts)].to_dict("records")]
        for column, unit in UNITS.items():  # "Wall time (s)" is shown as "Wall time"
            out[column.split(" (")[0]] = t[column].map(unit, na_action="ignore").fillna("")
        if "train.seed" in self.axes or (t["tries"] > 1).any():
            out["Seeds"] = [f"{k}" if k == n else f"{k}/{n}" for k, n in zip(t["Seeds"], t["tries"])]
        return out.assign(Status=t["Status"])

    def notes(self) -> list[str]:
        """The footer: what ± and sd are, the paired test behind "vs best" and "vs baseline", and what an
        intermediate value is."""
        t, notes = self.cells, []
        with_interval = [n for n, _ in self.metric_cols if n not in COUNTS and t[f"{n} lo"].notna().any()]
        several = (t["Seeds"] > 1).any()
        if with_interval:
            notes.append(f"value ± h: h is half the width of the {intervals.LEVEL:.0%} bootstrap interval over the "
                         f"run's eval examples (percentile, {self.resamples:,} resamples of its predictions.jsonl; "
                         "results.csv holds the bounds as `<column> lo` and `<column> hi`). A value without ± has "
                         "no per-example predictions to resample.")
        if several:
            notes.append("sd: the spread across seeds (standard deviation)."
                         + (" The interval of a mean over seeds resamples the examples of all its seeds jointly."
                            if with_interval else ""))
        if self.compared:
            n = self.paired_examples
            over = f"the {n[0]:,} eval examples" if len(n) == 1 else "the eval examples each pair shares"
            which = " and ".join(f"from the {'best cell' if label == 'best' else 'baseline'} "
                                 f"({t.loc[self.references[label], 'Method']}, {t.loc[self.references[label], 'size']})"
                                 for label in self.compared)
            marks = ", ".join(f"{MARKS[label]} beyond noise vs the {'best cell' if label == 'best' else 'baseline'}"
                              for label in self.compared)
            notes.append(f"{' / '.join(f'vs {label}' for label in self.compared)}: the difference in "
                         f"{self.objective_col} {which}, this row minus that one. Paired bootstrap over {over}, "
                         f"{self.resamples:,} resamples, {intervals.LEVEL:.0%} percentile interval of the difference; "
                         f"{marks} (the interval excludes 0); not comparable: predictions of other examples.")
        if t["Intermediate objective"].notna().any() and self.objective_col is not None:
            notes.append(f"(intermediate): the last {self.objective_col} a pruned trial reported during training, "
                         "when the sweep's pruner stopped it; not a final evaluation.")
        return [f"- {note}" for note in notes]

    def markdown(self) -> str:
        """results.md: the objective, what was swept, how many runs finished, failed or were pruned, the table
        and its notes."""
        shown, sweep = self.shown(), self.runs[~self.runs["baseline"]]
        ok, failed, pruned = ((sweep["status"] == s).sum() for s in ("ok", "failed", "pruned"))
        rest = self.n_runs - ok - failed - pruned
        lines = [f"# Results: {self.title}", "", f"Objective: `{self.objective}` ({self.direction}). "
                 f"{sweep['cell'].nunique()} cell(s) from {self.n_runs} run folder(s): {ok} finished, {failed} failed"
                 + (f", {pruned} pruned" if pruned else "") + (f", {rest} superseded or incomplete" if rest else "")
                 + "."]
        lines += [f"Swept: {', '.join(f'`{a}`' for a in self.axes)}."] if self.axes else []
        lines += ["", "| " + " | ".join(shown.columns) + " |", "|" + "|".join("---" for _ in shown.columns) + "|"]
        lines += ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in shown.itertuples(index=False)]
        notes = self.notes()
        return "\n".join(lines + ([""] + notes if notes else []) + ["", "![objective against training-set size]"
                                                                   "(results.png)", ""])

    def plot(self, path: Path) -> None:
        """The objective against training-set size (or LoRA rank) with its 95% intervals as error bars, a line per
        other swept value, baselines dashed over their interval's band."""
        from matplotlib.figure import Figure
        name = next((n for n, k in self.metric_cols if k == self.objective or not self.objective), None)
        t = self.cells.assign(y=self.cells.get(name, math.nan), lo=self.cells.get(f"{name} lo", math.nan),
                              hi=self.cells.get(f"{name} hi", math.nan))
        x = "lora.r" if "lora.r" in self.axes and "train.n" not in self.axes else "# training data"
        others, sweep = [a for a in self.axes if a not in ("train.n", x, "train.seed")], t[~t["baseline"]]
        points = sweep.assign(x=pd.to_numeric(sweep[x], errors="coerce"), line=[", ".join(
            f"{k.removeprefix('train.')}={v}" for k, v in zip(others, row)) or name for row in sweep[others].values])
        ax = Figure(figsize=(7, 4.5), layout="tight").subplots()
        for label, line in points.dropna(subset=["x", "y"]).sort_values("x").groupby("line"):
            below, above = (line["y"] - line["lo"]).clip(lower=0).fillna(0), (line["hi"] - line["y"]).clip(lower=0)
            ax.errorbar(line["x"].astype(float), line["y"].astype(float), yerr=[below, above.fillna(0)], marker="o",
                        capsize=3, label=label)
        for method, mean, lo, hi in t.loc[t["baseline"], ["Method", "y", "lo", "hi"]].dropna(subset=["y"]).values:
            ax.axhline(mean, linestyle="--", linewidth=1, color="gray")
            if pd.notna(lo) and pd.notna(hi):
                ax.axhspan(lo, hi, color="gray", alpha=0.12, linewidth=0)
            ax.annotate(method, (0.01, mean), xycoords=("axes fraction", "data"), fontsize=8, color="gray", va="bottom")
        ax.set_xscale("log")
        ax.grid(True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.set(xlabel="LoRA rank r" if x == "lora.r" else "training examples (n)",
               ylabel=f"{name} ({intervals.LEVEL:.0%} interval)", title=self.title)
        ax.figure.savefig(path, dpi=120)


def run_statistics(run: RunFolder, keys: dict) -> dict[str, intervals.Statistic]:
    """The per-example statistics behind ``run``'s metrics ``keys`` (metric key -> column), from its
    predictions.jsonl: only those that give back metrics.json's value on all examples."""
    rows, found = read_predictions(run.path), {}
    for key in keys if rows else ():
        statistic, value = intervals.metric_statistic(key, rows, run.config), (run.metrics or {}).get(key)
        if statistic is None or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if intervals.reproduces(statistic, key, value):
            found[key] = statistic
        else:
            log.warning("%s: predictions.jsonl gives %s %.6g and metrics.json %.6g, so it shows no interval.",
                        run.path, key, statistic.value(), value)
    return found


def cell_statistic(statistics: list) -> intervals.Statistic | None:
    """A cell's statistic: its one run's, or the mean over its seeds when every seed has one on the same examples."""
    if not statistics or any(s is None for s in statistics) or not intervals.comparable(statistics):
        return None
    return statistics[0] if len(statistics) == 1 else intervals.mean_of(statistics)


def verdict(valid: dict) -> str:
    """A cell's judge verdict from its mean judge/valid_<criterion> values: "valid", or the
    criteria the judge failed its check on (control gap not above 0, or references below zero-shot)."""
    failed = [name[6:] for name, v in valid.items() if pd.notna(v) and v < 1]
    if all(pd.isna(v) for v in valid.values()):
        return ""
    return f"INVALID for {', '.join(failed)}" if failed else "valid"


def write_report(sweep_dir: Path, baselines: list[Path] = (), out_dir: Path | None = None) -> list[Path]:
    """Write results.md, results.csv (the table with plain numbers: intervals as "<column> lo" and "<column> hi")
    and results.png; return their paths."""
    table, out = Table(Path(sweep_dir), list(baselines)), Path(out_dir or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    files.atomic_write(out / "results.md", table.markdown())
    metrics = [c for name, _ in table.metric_cols  # each mean with its std over seeds and its interval
               for c in (name, f"{name} std", *((f"{name} lo", f"{name} hi") if name not in COUNTS else ()))]
    tests = [f"vs {label}{part}" for label in table.compared for part in ("", " lo", " hi", " test")]
    with files.atomic_path(out / "results.csv") as tmp:
        table.cells[["Method", "# training data", "epochs", "max_steps", *table.extra_axes, *metrics, *tests, *COSTS,
                     "Intermediate objective", "Seeds", "Status", "Runs"]].to_csv(tmp, index=False,
                                                                                 lineterminator="\r\n")
    with files.atomic_path(out / "results.png") as tmp:
        table.plot(tmp)
    return [out / "results.md", out / "results.csv", out / "results.png"]


def log_to_wandb(sweep_dir: Path, lcfg) -> None:
    """Log the results table and plot to W&B, in the sweep's group, as a run of its own."""
    import wandb
    table, mode, plot = Table(Path(sweep_dir)), tracker.wandb_mode(lcfg), Path(sweep_dir) / "results.png"
    with wandb.init(project=lcfg.project, entity=lcfg.get("entity"), group=lcfg.get("group") or table.title,
                    name=f"{table.title} results", job_type="report", dir=str(sweep_dir), mode=mode,
                    reinit="finish_previous", config={"sweep_dir": table.title, "objective": table.objective}) as run:
        run.log({"results": wandb.Table(dataframe=table.shown()),
                 **({"results_plot": wandb.Image(str(plot))} if plot.exists() else {})})
    if mode == "offline":
        logging.getLogger(__name__).warning("W&B is offline (no WANDB_API_KEY). Upload the sweep with `wandb sync "
                                            "%s/wandb/offline-run-* %s/*/wandb/offline-run-*`.", sweep_dir, sweep_dir)


def main(argv: list[str] | None = None) -> None:
    """The command line: write the report and print results.md; exit 2 on input it cannot use."""
    parser = argparse.ArgumentParser(prog="python -m ftexp.report", description=__doc__.split(":")[0] + ".")
    parser.add_argument("sweep_dir", type=Path, help="a sweep dir (hydra.sweep.dir) or a single run dir")
    parser.add_argument("--baseline", dest="baselines", metavar="DIR", type=Path, action="append", default=[],
                        help="an evaluate.py run dir (zero-/k-shot), or a folder of them; repeatable")
    parser.add_argument("--out", dest="out_dir", metavar="DIR", type=Path, help="where to write (default: sweep_dir)")
    try:
        paths = write_report(**vars(parser.parse_args(argv)))
    except ReportError as err:
        parser.error(str(err))  # exits 2
    print(paths[0].read_text() + "\nwrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
