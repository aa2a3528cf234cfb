"""A sweep spread over machines shares one Optuna study in PostgreSQL. The test starts a
real server of its own (initdb + pg_ctl in a temporary folder, listening on 127.0.0.1
only) and runs two sweeper processes, each with its own sweep folder as two machines
would have, on one grid study."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest

from conftest import ROOT
from test_sweep_runs import cells_of, env, sweep_cmd

pytestmark = pytest.mark.slow


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver: pip install -e '.[postgres]'")
    folder = Path(tempfile.mkdtemp(prefix="ftexp-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres account
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()

    def run(*cmd):
        subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)

    run(initdb, "-D", str(data), "-A", "trust", "-U", "ftexp")
    run(pg_ctl, "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="ftexp", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE sweeps")
        conn.close()
        yield f"postgresql+psycopg2://ftexp:not-a-secret@127.0.0.1:{port}/sweeps"
    finally:
        run(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_two_machines_share_one_postgres_study_and_run_each_cell_once(tmp_path, postgres_url):
    axes = ["train.n=16,32", "train.seed=1,2"]
    shared = [f"hydra.sweeper.storage={postgres_url}", "hydra.sweeper.study_name=shared_grid"]
    dirs = [tmp_path / "machine_a", tmp_path / "machine_b"]
    procs = [subprocess.Popen(sweep_cmd(d, *axes, *shared), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for d in dirs]
    outs = [p.communicate(timeout=500)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    study = optuna.load_study(study_name="shared_grid", storage=postgres_url)
    ts = study.get_trials(deepcopy=False)
    assert cells_of(ts) == [(16, 1), (16, 2), (32, 1), (32, 2)]  # every cell COMPLETE exactly once
    trained = [p for d in dirs for p in d.glob("*/train_log.jsonl")]
    assert len(trained) == 4  # no cell trained twice, on either machine
    assert len({p.parent.name for p in trained}) == 4  # and no run folder name used twice
    for d in dirs:  # the password never reaches a file
        written = (d / "optimization_results.yaml").read_text()
        assert "not-a-secret" not in written and "***" in written
