"""The C heap allocator under torch's CPU tensors, and advice on a faster one.

A training pass on a CPU allocates and frees its activations afresh each time, and runs slower
under glibc's malloc, the Linux default, than under tcmalloc (``MEASURED``; docs/performance.md,
"The C heap allocator"). pip cannot install tcmalloc, but a system package and ``LD_PRELOAD``
can. ``current`` says which allocator serves this process's malloc; ``note`` logs it once when a
CPU run starts training, with the command that preloads a faster one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)


# Heap allocators that take over malloc when preloaded, as their library files are named
ALLOCATORS = ("tcmalloc", "jemalloc")
# Libraries LD_PRELOAD can load, best first: tcmalloc (its minimal build has no heap profiler) is
# the one measured on a whole run; jemalloc ran a pass as fast (docs/performance.md)
PRELOADABLE = ("tcmalloc_minimal", "tcmalloc", "jemalloc")
MEASURED = "the SmolLM2 SST-2 preset trained 1.09-1.12x faster with tcmalloc, its peak memory 11-12% lower"
_noted = False


class _DlInfo(ctypes.Structure):
    """dladdr's answer: the shared object that holds an address, and the symbol nearest it."""

    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def malloc_library() -> str | None:
    """Path of the shared library whose ``malloc`` this process's calls reach: the global symbol as
    the dynamic loader resolves it (an ``LD_PRELOAD`` first), located with ``dladdr``. A library
    merely loaded (a wheel's private copy of jemalloc, say) does not count. None where the loader
    cannot say (no ``dladdr``, as on Windows)."""
    try:
        process = ctypes.CDLL(None)
        info = _DlInfo()
        found = process.dladdr(ctypes.cast(process.malloc, ctypes.c_void_p), ctypes.byref(info))
    except (OSError, AttributeError, TypeError):
        return None
    return os.fsdecode(info.dli_fname) if found and info.dli_fname else None


def current(library: Callable[[], str | None] = malloc_library) -> str | None:
    """The heap allocator serving this process's malloc: ``tcmalloc``, ``jemalloc``, ``glibc``, else
    the file name of the library that defines malloc; None when it cannot be told."""
    path = library()
    if not path:
        return None
    name = os.path.basename(path)
    known = next((a for a in ALLOCATORS if name.startswith(f"lib{a}")), None)
    return known or ("glibc" if name.startswith("libc.so") else name)


def preloadable(find: Callable[[str], str | None] = ctypes.util.find_library) -> str | None:
    """The library name of an installed tcmalloc or jemalloc as ``LD_PRELOAD`` takes it (the dynamic
    loader finds it by that name), best first; None when neither is installed."""
    return next((lib for lib in map(find, PRELOADABLE) if lib), None)


def note(device: str, library: Callable[[], str | None] = malloc_library,
         find: Callable[[str], str | None] = ctypes.util.find_library) -> str | None:
    """Log, once per process and for a CPU run only, which heap allocator training runs on and, when
    it is glibc's, the command that preloads tcmalloc or jemalloc (or the package that installs
    tcmalloc). Returns the allocator's name. Only advice: nothing here stops a run."""
    global _noted
    if device != "cpu" or _noted:
        return None
    _noted = True
    try:
        allocator = current(library)
        if allocator != "glibc":
            log.info("heap allocator: %s", allocator or "unknown")
            return allocator
        lib = preloadable(find)
    except Exception as err:  # advice only: a system that cannot be asked still trains
        log.debug("heap allocator: could not tell (%s)", err)
        return None
    if lib:
        preload = ":".join(filter(None, (lib, os.environ.get("LD_PRELOAD"))))
        log.info("heap allocator: glibc's malloc. %s is installed: start with LD_PRELOAD=%s python train.py ... "
                 "(%s; docs/performance.md)", lib, preload, MEASURED)
    else:
        log.info("heap allocator: glibc's malloc. Installing tcmalloc (Debian/Ubuntu: apt-get install "
                 "libtcmalloc-minimal4) and starting with LD_PRELOAD=libtcmalloc_minimal.so.4 trains faster "
                 "on a CPU (%s; docs/performance.md)", MEASURED)
    return allocator
