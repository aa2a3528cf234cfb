"""Data: loading (Hub id, local files, or ftexp's own generators), column mapping,
splits, and seeded nested subsets.

``load_splits(cfg.data)`` returns ``{"train": Dataset, "eval": Dataset}`` whose
columns are the canonical names of ``data.columns`` (plus any others the source had).
``subset(ds, n, seed)`` takes a seeded prefix of one fixed permutation, so a smaller
n is always a prefix of a larger n: learning curves compare nested training sets.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from datasets import Dataset, DatasetDict

from ftexp import synthetic
from ftexp.errors import ConfigError

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _read_file(path: Path, fmt: str | None) -> Dataset:
    """One local file as a table; a file that cannot be read is named in a ConfigError."""
    try:
        table = _parse_file(path, fmt)
    except ConfigError:
        raise
    except Exception as err:  # pandas / pyarrow / datasets errors name neither the file nor a fix
        root = err
        while root.__cause__ is not None or root.__context__ is not None:  # the reader's own words
            root = root.__cause__ or root.__context__
        first = str(root).strip().splitlines()[0] if str(root).strip() else type(root).__name__
        raise ConfigError(f"data.path: {path} could not be read as {fmt or path.suffix.lstrip('.')} "
                          f"({type(root).__name__}: {first[:300]}). Check the file (empty, truncated or a "
                          "broken line?) or set data.format.") from err
    if len(table) == 0 or not table.column_names:
        raise ConfigError(f"data.path: {path} holds no rows. Point data.path at a file with data in it.")
    return table


def _parse_file(path: Path, fmt: str | None) -> Dataset:
    fmt = fmt or FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"data.path: cannot tell the format of {path}; set data.format to one of csv, tsv, json, jsonl, parquet.")
    if fmt == "tsv":
        # GLUE TSVs hold quotes and backticks verbatim: read without quote handling so
        # no row is merged with the next one.
        import pandas as pd
        import csv
        frame = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, dtype=str)
        for col in frame.columns:  # numeric columns (labels) back to numbers
            try:
                frame[col] = pd.to_numeric(frame[col])
            except (ValueError, TypeError):
                pass
        return Dataset.from_pandas(frame, preserve_index=False)
    builder = "json" if fmt == "jsonl" else fmt
    return _load_builder(builder, str(path))


def _load_builder(builder: str, path: str) -> Dataset:
    from datasets import load_dataset
    return load_dataset(builder, data_files=path, split="train")


def _find_split_file(folder: Path, split: str, files: dict) -> Path:
    if split in files:
        candidate = folder / files[split]
        if candidate.exists():
            return candidate
    for suffix in FORMATS:
        candidate = folder / f"{split}{suffix}"
        if candidate.exists():
            return candidate
    found = sorted(p.name for p in folder.iterdir())
    expected = files.get(split, f"{split}.<csv|tsv|json|jsonl|parquet>")
    raise ConfigError(
        f"data.path={folder}: no file for split '{split}' (expected {expected}). Files found: {found}. "
        f"Set data.files.{split}=<file name>."
    )


def _load_local(dcfg) -> DatasetDict:
    path = Path(os.path.expanduser(str(dcfg.path)))
    if not path.exists():
        raise ConfigError(f"data.path={dcfg.path} does not exist. Point data.path at a file or a folder of split files.")
    if dcfg.format in FOLDER_LOADERS:  # several files merged into one table
        return DatasetDict({dcfg.train_split: FOLDER_LOADERS[dcfg.format](path)})
    files = dict(dcfg.files or {})
    if path.is_file():
        table = _read_file(path, dcfg.format)
        return DatasetDict({dcfg.train_split: table})
    splits = {}
    # With data.eval_fraction the eval rows are carved out of train: no eval file needed.
    wanted = (dcfg.train_split,) if dcfg.eval_fraction else (dcfg.train_split, dcfg.eval_split)
    for split in wanted:
        splits[split] = _read_file(_find_split_file(path, split, files), dcfg.format)
    return DatasetDict(splits)


def load_commonlit(folder: Path) -> Dataset:
    """CommonLit "Evaluate Student Summaries" as the competition ships it: each row of
    ``summaries_train.csv`` (student_id, prompt_id, text, content, wording) joined with
    its prompt from ``prompts_train.csv`` (prompt_id, prompt_question, prompt_title,
    prompt_text) on ``prompt_id``. One table; ``data.eval_fraction`` splits it."""
    import pandas as pd

    if not folder.is_dir():
        raise ConfigError(f"data.path={folder}: data.format=commonlit needs the folder holding prompts_train.csv "
                          "and summaries_train.csv.")
    tables = {}
    for name, needed in (("prompts_train.csv", {"prompt_id"}), ("summaries_train.csv", {"prompt_id", "text"})):
        file = folder / name
        if not file.exists():
            raise ConfigError(f"data.path={folder}: {name} is missing (found {sorted(p.name for p in folder.iterdir())}). "
                              "Unpack the competition's files there.")
        tables[name] = pd.read_csv(file, keep_default_na=False)
        missing = needed - set(tables[name].columns)
        if missing:
            raise ConfigError(f"data.path={folder}: {name} lacks column(s) {sorted(missing)}.")
    prompts, summaries = tables["prompts_train.csv"], tables["summaries_train.csv"]
    orphans = sorted(set(summaries["prompt_id"]) - set(prompts["prompt_id"]))
    if orphans:
        raise ConfigError(f"data.path={folder}: summaries_train.csv refers to prompt_id(s) {orphans[:5]} that "
                          "prompts_train.csv does not have.")
    merged = summaries.merge(prompts, on="prompt_id", how="left", validate="many_to_one")
    return Dataset.from_pandas(merged, preserve_index=False)


# data.format values that read a folder of several files into one table
FOLDER_LOADERS = {"commonlit": load_commonlit}


def _load_hub(dcfg) -> DatasetDict:
    from datasets import load_dataset
    try:
        return load_dataset(dcfg.source, dcfg.hub_config)
    except Exception as err:  # network, gated repo, or unknown id
        raise ConfigError(
            f"data.source={dcfg.source}: could not load from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Check the id and your network/login, or use local files with data.path=<folder>."
        ) from err


def load_raw(dcfg) -> DatasetDict:
    if dcfg.path:
        return _load_local(dcfg)
    if dcfg.source and str(dcfg.source).startswith("ftexp:"):
        name = str(dcfg.source).split(":", 1)[1]
        if name not in synthetic.GENERATORS:
            raise ConfigError(f"data.source={dcfg.source}: unknown generator; valid: {', '.join('ftexp:' + g for g in synthetic.GENERATORS)}")
        return synthetic.GENERATORS[name](**dict(dcfg.generator or {}))
    if dcfg.source:
        return _load_hub(dcfg)
    raise ConfigError(f"data={dcfg.name}: neither data.source nor data.path is set. Give data.path=<file or folder>.")


def map_columns(ds: Dataset, columns: dict, where: str) -> Dataset:
    """Rename source columns to canonical names; a missing column names those found."""
    missing = {canon: src for canon, src in columns.items() if src not in ds.column_names}
    if missing:
        desc = ", ".join(f"data.columns.{c}={s!r}" for c, s in missing.items())
        raise ConfigError(
            f"{where}: column(s) not found: {desc}. Columns found: {ds.column_names}. "
            "Map them with data.columns.<field>=<column>."
        )
    for canon, src in columns.items():
        if src == canon:
            continue
        if canon in ds.column_names:
            ds = ds.remove_columns(canon)
        if list(columns.values()).count(src) > 1 or src in columns:  # the source column is needed again: copy
            ds = ds.add_column(canon, ds[src])
        else:  # a rename is free; a copy of a 67k-row column takes seconds
            ds = ds.rename_column(src, canon)
    return ds


def load_splits(dcfg) -> dict[str, Dataset]:
    """Load the train and eval splits with canonical column names."""
    raw = load_raw(dcfg)
    if dcfg.train_split not in raw:
        raise ConfigError(f"data.train_split={dcfg.train_split!r} not found; splits: {list(raw)}")
    train = raw[dcfg.train_split]
    if dcfg.eval_fraction:
        parts = train.train_test_split(test_size=float(dcfg.eval_fraction), seed=int(dcfg.seed))
        train, evaluation = parts["train"], parts["test"]
    elif dcfg.eval_split in raw:
        evaluation = raw[dcfg.eval_split]
    else:
        raise ConfigError(
            f"data.eval_split={dcfg.eval_split!r} not found; splits: {list(raw)}. "
            "Name one with data.eval_split=<split> or carve one out with data.eval_fraction=0.1."
        )
    columns = dict(dcfg.columns or {})
    return {
        "train": map_columns(train, columns, f"data={dcfg.name} split {dcfg.train_split}"),
        "eval": map_columns(evaluation, columns, f"data={dcfg.name} split {dcfg.eval_split}"),
    }


def subset(ds: Dataset, n: int | None, seed: int, *, key: str) -> Dataset:
    """The first ``n`` rows of a permutation fixed by ``seed``; n=None takes every row.

    Asking for more rows than the split holds is refused (not clamped), so a
    results table never labels a run with a size it did not train on.
    """
    if n is None:
        n = len(ds)  # still permuted: "all rows" is the longest prefix of the same order
    if n > len(ds):
        raise ConfigError(
            f"{key}={n} but the split has only {len(ds):,} rows. Use {key}<={len(ds)}, or {key}=null for all of them."
        )
    return ds.select(seeded_order(len(ds), seed)[:n])


def seeded_order(rows: int, seed: int) -> list[int]:
    """The permutation of ``rows`` row indices that ``seed`` fixes: nested subsets are its prefixes."""
    import numpy as np
    return np.random.default_rng(seed).permutation(rows).tolist()


def held_out(ds: Dataset, n: int, seed: int, *, train_n: int | None, key: str) -> Dataset:
    """``n`` rows no run of this split trains on: the last ``n`` of the permutation ``subset`` takes
    its first ``train_n`` from (same ``seed``), so they stay out of every nested training subset up
    to ``len(ds) - n`` rows. Refused when the training subset would reach them."""
    used = len(ds) if train_n is None else train_n
    if used + n > len(ds):
        raise ConfigError(
            f"{key}={n} rows are held out of the training split for evaluation during training, and train.n="
            f"{'null' if train_n is None else train_n} takes {used:,} of its {len(ds):,} rows: together more than "
            f"it holds. Lower {key} or train.n (at most {len(ds) - n:,} with {key}={n}), or turn evaluation during "
            "training off (train.eval_every=null).")
    return ds.select(seeded_order(len(ds), seed)[len(ds) - n:])
