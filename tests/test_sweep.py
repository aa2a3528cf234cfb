"""The sweep's building blocks, without training: grid cells, override text, run names,
metric directions, GPU slots, reuse of finished runs, and the sweep configs in
sweeps/ as Hydra composes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ftexp import identity, records, tasks
from ftexp.errors import ConfigError
from ftexp import sweep as sw
from conftest import CONF, ROOT

# ----------------------------------------------------------------------------- grid cells


def test_expand_grid_is_the_product_of_the_axes_in_order():
    cells = sw.expand_grid({"train.n": [100, 1000], "train.epochs": [1, 3]})
    assert cells == [{"train.n": 100, "train.epochs": 1}, {"train.n": 100, "train.epochs": 3},
                     {"train.n": 1000, "train.epochs": 1}, {"train.n": 1000, "train.epochs": 3}]


def test_explicit_cells_cross_the_other_axes_and_a_swept_cell_key_regrids_it():
    cells = [sw.parse_cell(c) for c in ("train.n=100 train.epochs=10", "train.n=100 train.epochs=20",
                                        "train.n=null train.epochs=1")]
    assert sw.expand_grid({}, cells) == [{"train.n": 100, "train.epochs": 10}, {"train.n": 100, "train.epochs": 20},
                                         {"train.n": None, "train.epochs": 1}]
    # seeds as an extra axis: every cell once per seed
    assert len(sw.expand_grid({"train.seed": [1, 2, 3]}, cells)) == 9
    # both cell keys swept on the command line: the plain grid (sst2_study shrunk for the tiny model)
    regrid = sw.expand_grid({"train.n": [100, 1000, 5000], "train.epochs": [1, 3]}, cells)
    assert len(regrid) == 6 and {c["train.n"] for c in regrid} == {100, 1000, 5000}
    # one cell key swept: the cells lose that key (duplicates dropped), then cross the new values
    one = sw.expand_grid({"train.n": [10, 20]}, cells)
    assert [c["train.epochs"] for c in one] == [10, 10, 20, 20, 1, 1]


def test_cells_hold_single_values():
    with pytest.raises(ValueError, match="sweeps"):
        sw.parse_cell("train.n=100,200")
    with pytest.raises(ValueError, match="empty"):
        sw.parse_cell("  ")


@pytest.mark.parametrize("value", [None, True, 3, 0.0002693883019285409, 1e-5, "tiny", "a b", "n=1,2", "null"])
def test_format_value_round_trips_through_the_override_parser(value):
    assert sw.parse_value(sw.format_value(value)) == value


def test_the_search_space_is_read_from_the_overrides():
    from optuna.distributions import FloatDistribution, IntDistribution

    from hydra_plugins.ftexp_sweeper.ftexp_sweeper import search_space

    space, fixed = search_space(["train.n=100,null", "lora.r=tag(log, int(interval(4, 64)))",
                                 "train.learning_rate=interval(1e-5, 1e-3)", "train.epochs=range(1,3)", "model=tiny"])
    assert space["train.n"] == [100, None] and space["train.epochs"] == [1, 2] and fixed == ["model=tiny"]
    assert space["lora.r"] == IntDistribution(4, 64, log=True)
    assert space["train.learning_rate"] == FloatDistribution(1e-5, 1e-3)


def test_a_key_given_twice_takes_its_last_value_swept_or_fixed():
    from hydra_plugins.ftexp_sweeper.ftexp_sweeper import search_space

    space, fixed = search_space(["train.n=16,32", "train.max_steps=1", "train.n=64", "train.max_steps=null",
                                 "train.epochs=1", "train.epochs=1,2"])
    assert space == {"train.epochs": [1, 2]} and fixed == ["train.n=64", "train.max_steps=null"]


def test_run_and_folder_names_come_from_the_swept_values():
    values = {"train.n": 100, "train.epochs": 10.0, "train.learning_rate": 0.000123456}
    assert sw.run_name(values) == "n=100 epochs=10 learning_rate=0.000123"
    assert sw.folder_name(7, values) == "7_n=100_epochs=10_learning_rate=0.000123"
    assert sw.folder_name(3, {"train.seed": 1, "data.seed": 2}) == "3_train.seed=1_data.seed=2"
    assert sw.folder_name(4, {"data.path": "a/b c"}) == "4_path=a-b_c"


@pytest.mark.parametrize("objective,direction", [
    ("eval/accuracy", "maximize"), ("eval/rouge1", "maximize"), ("eval/mcrmse", "minimize"),
    ("train/loss_last", "minimize"), ("eval/parse_failure_rate", "minimize"), ("eval/empty_rate", "minimize"),
    ("eval/too_long_rate", "minimize"), ("eval/likelihood_accuracy", "maximize"), ("eval/rmse_wording", "minimize"),
    ("judge/consistency", "maximize"), ("judge/unparsed", "minimize")])
def test_each_metric_declares_its_direction(objective, direction):
    assert tasks.metric_direction(objective) == direction


def test_a_misspelt_objective_is_refused_with_the_valid_names():
    with pytest.raises(ConfigError, match=r"objective=eval/acuracy is not a metric a classification run writes. "
                                          r"Valid: eval/accuracy, eval/f1"):
        tasks.metric("eval/acuracy", "classification")
    with pytest.raises(ConfigError, match="eval/rougeL"):  # another kind's metric
        tasks.metric("eval/accuracy", "summarization")


# ----------------------------------------------------------------------------- GPUs


def test_parallel_workers_take_different_gpus_and_keep_them(tmp_path):
    code = ("import sys, time; from ftexp import distributed; "
            "print(distributed.pin_worker_gpu(sys.argv[1], int(sys.argv[2])), flush=True); "
            "print(distributed.pin_worker_gpu(sys.argv[1], 5), flush=True); time.sleep(float(sys.argv[3]))")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "4,6"}
    env.pop("SLURM_JOB_ID", None)
    first = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), "0", "3"], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    mine = [first.stdout.readline().strip(), first.stdout.readline().strip()]
    # a second worker whose job number also points at slot 0 finds it taken and takes the other GPU
    second = subprocess.run([sys.executable, "-c", code, str(tmp_path), "0", "0"], env=env, cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    first.wait()
    assert mine == ["4", "4"]  # kept for the life of the process, whatever the next job number
    assert second == ["6", "6"]


# ----------------------------------------------------------------------------- reuse and records


CLAIMER = """
import json, sys, optuna
from ftexp import sweep as sw
optuna.logging.set_verbosity(optuna.logging.ERROR)
url = sys.argv[1]
study = optuna.load_study(study_name="s", storage=url)
taken = []
for _ in range(60):
    with sw.claim_lock(url):
        taken.append(study.ask().number)
print(json.dumps(taken))
"""


def test_two_workers_asking_at_once_never_take_the_same_waiting_trial(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=url)
    for i in range(120):
        study.enqueue_trial({}, user_attrs={"i": i})
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, url], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    first, second = (json.loads(p.communicate(timeout=120)[0]) for p in procs)
    assert not set(first) & set(second)  # without the lock SQLite hands some trials to both
    assert sorted(first + second) == list(range(120))


def test_a_finished_run_with_the_same_config_is_reused_and_a_changed_one_is_not(tmp_path):
    cfg = OmegaConf.create({"train": {"n": 100, "seed": 1}, "logger": {"name": "none"}, "run_name": None,
                            "output_dir": str(tmp_path)})
    records.write_config(cfg, tmp_path)
    assert identity.reusable_metrics(tmp_path, cfg) is None  # no metrics.json: not finished
    records.write_metrics({"eval/accuracy": 0.9}, tmp_path)
    assert identity.reusable_metrics(tmp_path, cfg) == {"eval/accuracy": 0.9}
    renamed = OmegaConf.merge(cfg, {"run_name": "n=100", "logger": {"name": "wandb"}})
    assert identity.reusable_metrics(tmp_path, renamed) == {"eval/accuracy": 0.9}  # logging is not the experiment
    other = OmegaConf.merge(cfg, {"train": {"seed": 2}})
    assert identity.reusable_metrics(tmp_path, other) is None


def test_failure_record_has_the_error_and_the_traceback(tmp_path):
    try:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    except RuntimeError as err:
        records.write_failure(tmp_path, err)
    failure = json.loads((tmp_path / "failed.json").read_text())
    assert failure["status"] == "failed" and failure["out_of_memory"] is True
    assert "CUDA out of memory" in failure["error"] and "Traceback" in failure["traceback"]


def test_a_config_error_exit_is_explained_by_the_config_error():
    from ftexp.config import ConfigError

    try:
        try:
            raise ConfigError("train.n=0: need at least 1 row")
        except ConfigError:
            sys.exit(2)
    except SystemExit as exc:
        line, cause = records.error_summary(exc)
    assert line == "ConfigError: train.n=0: need at least 1 row" and isinstance(cause, ConfigError)


def test_trial_function_records_a_failure_and_raises_a_plain_error(tmp_path):
    def boom(cfg):
        raise MemoryError("out of memory")

    fn = sw.TrialFunction(boom, os.getpid(), str(tmp_path / "slots"))
    cfg = OmegaConf.create({"output_dir": str(tmp_path / "run"), "train": {"n": 1}})
    with pytest.raises(sw.TrialFailed, match="MemoryError: out of memory"):
        fn(cfg)
    assert json.loads((tmp_path / "run" / "failed.json").read_text())["out_of_memory"] is True
    assert (tmp_path / "run" / "config.yaml").exists()  # the report can still place the failed cell


def test_credentials_are_scrubbed_but_settings_that_mention_tokens_are_not():
    out = records.scrub({"hf_token": "x", "WANDB_API_KEY": "y", "client_secret": "z", "model": {"token": "t"},
                         "note": "hf_" + "a" * 34, "tokenizer_max_texts": 10, "max_new_tokens": 8, "pad_token": "<pad>"})
    assert out["hf_token"] == out["WANDB_API_KEY"] == out["client_secret"] == out["model"]["token"] == "<redacted>"
    assert out["note"] == "<redacted>"
    assert out["tokenizer_max_texts"] == 10 and out["max_new_tokens"] == 8 and out["pad_token"] == "<pad>"


# ----------------------------------------------------------------------------- the sweep configs


def compose_sweep(*overrides):
    with initialize_config_dir(config_dir=str(CONF)):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def test_every_sweep_config_opens_with_a_comment_naming_its_command():
    for path in sorted((ROOT / "sweeps").rglob("*.yaml")):
        head = path.read_text().splitlines()[:12]
        assert head[0].startswith("#"), path
        assert any("python train.py -m" in line for line in head), path


def test_sst2_study_is_the_nine_cells_of_the_study_on_its_experiment():
    cfg = compose_sweep("+sweep=sst2_study")
    assert cfg.hydra.runtime.choices["hydra/sweeper"] == "ftexp"
    assert cfg.model.name == "llama2_13b" and cfg.quant.name == "nf4" and cfg.data.name == "sst2"
    cells = [sw.parse_cell(c) for c in cfg.hydra.sweeper.cells]
    assert len(cells) == 9
    assert [c["train.epochs"] for c in cells if c["train.n"] == 100] == [1, 10, 20, 50]
    assert [c["train.n"] for c in cells if c["train.epochs"] == 1] == [100, 500, 1000, 5000, 10000, None]
    assert str(cfg.hydra.sweep.dir).endswith("sst2_study-llama2_13b")


def test_rank_sweeps_train_adapters_even_on_the_tiny_model():
    grid = compose_sweep("+sweep=data_epochs_rank", "model=tiny")
    assert grid.lora.enabled and grid.hydra.runtime.choices["hydra/sweeper/sampler"] == "grid"
    assert set(grid.hydra.sweeper.params) == {"train.n", "train.epochs", "lora.r"}
    search = compose_sweep("+sweep=rank_search", "model=tiny", "hydra.sweeper.n_trials=4")
    assert search.lora.enabled and search.train.n == 1000 and search.hydra.sweeper.n_trials == 4
    assert "interval(4, 64)" in search.hydra.sweeper.params["lora.r"]


def test_a_sweep_group_that_does_not_exist_lists_the_ones_that_do():
    with pytest.raises(Exception) as err:
        compose_sweep("+sweep=nope")
    assert "sst2_study" in str(err.value) and "rank_search" in str(err.value)


def test_the_swept_values_for_wandb_are_plain_and_never_replace_a_config_section(monkeypatch):
    cfg = OmegaConf.create({"train": {"n": 100, "seed": 1}, "data": {"seed": 2}, "lora": {"name": "qv", "r": 8},
                            "objective": "eval/accuracy"})
    monkeypatch.setenv(sw.SWEPT_ENV, "train.n,train.seed,data.seed,lora,objective")
    assert sw.swept_values(cfg) == {"n": 100, "train.seed": 1, "data.seed": 2, "swept/lora": "qv",
                                    "swept/objective": "eval/accuracy"}
    monkeypatch.delenv(sw.SWEPT_ENV)
    assert sw.swept_values(cfg) == {}
