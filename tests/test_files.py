"""ftexp.files: folders written whole, and the lock a second process waits for or is refused."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ftexp import files


def test_a_folder_written_whole_replaces_the_old_one_and_a_failed_write_leaves_it_as_it_was(tmp_path):
    out = tmp_path / "model"
    with files.atomic_dir(out) as tmp:
        (tmp / "weights").write_text("v1")
        assert not out.exists()  # nothing at the target until the block ends
    assert (out / "weights").read_text() == "v1"
    with pytest.raises(RuntimeError), files.atomic_dir(out) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (out / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left


def test_a_lock_held_by_another_process_refuses_or_waits(tmp_path):
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from ftexp import files
with files.locked({str(lock)!r}) as fh:
    fh.write("pid of the holder"); fh.flush()
    print("held", flush=True)
    time.sleep(3)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(files.Busy, match="held by pid of the holder"):
            with files.locked(lock, wait=False):
                pass
        assert files.hold(lock, wait=False) is None
        start = time.perf_counter()
        with files.locked(lock):  # waits until the holder lets go
            assert time.perf_counter() - start > 1.0
    finally:
        holder.kill()
        holder.wait()
