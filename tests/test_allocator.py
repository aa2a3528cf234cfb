"""The heap allocator a CPU run trains on, and the advice it logs (ftexp/allocator.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from ftexp import allocator

GLIBC, TCMALLOC = "/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


@pytest.fixture(autouse=True)
def not_noted_yet(monkeypatch):
    monkeypatch.setattr(allocator, "_noted", False)


def test_the_allocator_is_named_by_the_library_that_defines_malloc():
    assert allocator.current(lambda: GLIBC) == "glibc"
    assert allocator.current(lambda: TCMALLOC) == "tcmalloc"
    assert allocator.current(lambda: "/usr/lib/libjemalloc.so.2") == "jemalloc"
    assert allocator.current(lambda: "/lib/ld-musl-x86_64.so.1") == "ld-musl-x86_64.so.1"  # no glibc advice
    assert allocator.current(lambda: None) is None


def test_tcmalloc_is_preferred_and_absence_is_none():
    installed = {"jemalloc": "libjemalloc.so.2", "tcmalloc_minimal": "libtcmalloc_minimal.so.4"}
    assert allocator.preloadable(installed.get) == "libtcmalloc_minimal.so.4"
    assert allocator.preloadable({"jemalloc": "libjemalloc.so.2"}.get) == "libjemalloc.so.2"
    assert allocator.preloadable(lambda name: None) is None


def test_a_cpu_run_on_glibc_is_told_the_preload_command_once(caplog, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "libmine.so")
    find = {"jemalloc": "libjemalloc.so.2"}.get
    with caplog.at_level(logging.INFO, logger="ftexp.allocator"):
        assert allocator.note("cpu", lambda: GLIBC, find) == "glibc"
        allocator.note("cpu", lambda: GLIBC, find)  # a sweep's second trial in the same process
    hints = [r.getMessage() for r in caplog.records]
    assert len(hints) == 1
    assert "LD_PRELOAD=libjemalloc.so.2:libmine.so python train.py" in hints[0]  # the user's preload kept


def test_no_advice_on_a_gpu_nor_when_a_faster_allocator_serves(caplog):
    with caplog.at_level(logging.INFO, logger="ftexp.allocator"):
        assert allocator.note("cuda", lambda: GLIBC) is None
        assert allocator.note("cpu", lambda: TCMALLOC, lambda name: "libtcmalloc.so.4") == "tcmalloc"
    assert [r.getMessage() for r in caplog.records] == ["heap allocator: tcmalloc"]


def test_without_an_installed_allocator_the_advice_names_the_package(caplog):
    with caplog.at_level(logging.INFO, logger="ftexp.allocator"):
        allocator.note("cpu", lambda: GLIBC, lambda name: None)
    assert "apt-get install libtcmalloc-minimal4" in caplog.text


def test_a_failing_lookup_never_stops_a_run(caplog):
    def broken():
        raise RuntimeError("no loader here")

    with caplog.at_level(logging.DEBUG, logger="ftexp.allocator"):
        assert allocator.note("cpu", broken) is None
    assert "could not tell" in caplog.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="dladdr on a glibc Linux")
def test_malloc_is_located_where_the_loader_resolves_it():
    """The process's own malloc, and a child's with an allocator preloaded: the library defining
    the resolved symbol, which a merely loaded copy would not change."""
    own = os.path.basename(allocator.malloc_library() or "")
    assert own.startswith(("libc.so", "libtcmalloc", "libjemalloc")), own
    lib = allocator.preloadable()
    if lib is None:
        pytest.skip("neither tcmalloc nor jemalloc is installed")
    code = "from ftexp import allocator; print(allocator.malloc_library())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LD_PRELOAD": lib},
                         capture_output=True, text=True, check=True)
    assert os.path.basename(out.stdout.strip()).startswith(lib)
