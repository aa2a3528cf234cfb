"""Data loading: real GLUE files load intact, subsets nest, bad paths and columns
are refused with messages that say what was found."""

from __future__ import annotations

import pytest
from omegaconf import open_dict

from conftest import compose_cfg
from ftexp import data
from ftexp.errors import ConfigError


def _sst2(shared_data, **extra):
    cfg = compose_cfg(["data=sst2", f"data.path={shared_data / 'SST-2'}"])
    with open_dict(cfg):
        for k, v in extra.items():
            cfg.data[k] = v
    return cfg.data


def test_glue_dev_loads_all_872_rows_intact(shared_data):
    splits = data.load_splits(_sst2(shared_data))
    dev = splits["eval"]
    assert len(dev) == 872
    assert sum(dev["label"]) == 444  # 428 negative, 444 positive
    assert len(splits["train"]) == 67349
    # tokenized GLUE text with quotes and backticks survives verbatim
    assert any("``" in t for t in dev["text"]) or any("'" in t for t in dev["text"])
    assert all(isinstance(t, str) and t for t in dev["text"])


def test_smaller_subsets_are_prefixes_of_larger_ones():
    ds = data.synthetic.sentiment(train_size=500, eval_size=10)["train"]
    small = data.subset(ds, 20, seed=3, key="train.n")
    large = data.subset(ds, 200, seed=3, key="train.n")
    assert small["text"] == large["text"][:20]
    again = data.subset(ds, 20, seed=3, key="train.n")
    assert again["text"] == small["text"]  # same seed, same rows
    other = data.subset(ds, 20, seed=4, key="train.n")
    assert other["text"] != small["text"]


def test_train_n_larger_than_the_split_is_refused():
    ds = data.synthetic.sentiment(train_size=50, eval_size=10)["train"]
    with pytest.raises(ConfigError, match=r"train.n=51 but the split has only 50 rows"):
        data.subset(ds, 51, seed=0, key="train.n")


def test_missing_data_path_is_named(tmp_path):
    cfg = compose_cfg(["data=sst2", f"data.path={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="nowhere.*does not exist"):
        data.load_splits(cfg.data)


def test_missing_column_lists_the_columns_found(shared_data):
    dcfg = _sst2(shared_data)
    with open_dict(dcfg):
        dcfg.columns = {"text": "review", "label": "label"}
    with pytest.raises(ConfigError) as err:
        data.load_splits(dcfg)
    assert "'review'" in str(err.value) and "sentence" in str(err.value)


def test_folder_without_the_split_file_says_what_it_holds(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,0\nb,1\n")
    cfg = compose_cfg(["data=sst2", f"data.path={tmp_path}", "data.columns={text: text, label: label}"])
    with pytest.raises(ConfigError, match=r"no file for split 'validation'.*train.csv"):
        data.load_splits(cfg.data)


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_local_formats_load_with_column_mapping(tmp_path, suffix):
    import pandas as pd

    frame = pd.DataFrame({"review": ["good film", "bad film", "fine"], "y": [1, 0, 1]})
    for split in ("train", "validation"):
        path = tmp_path / f"{split}.{suffix}"
        if suffix == "csv":
            frame.to_csv(path, index=False)
        elif suffix == "jsonl":
            frame.to_json(path, orient="records", lines=True)
        else:
            frame.to_parquet(path)
    cfg = compose_cfg(["data=sst2", f"data.path={tmp_path}", "data.columns={text: review, label: y}"])
    splits = data.load_splits(cfg.data)
    assert splits["train"]["text"] == ["good film", "bad film", "fine"]
    assert splits["eval"]["label"] == [1, 0, 1]
