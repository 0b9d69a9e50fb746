"""The page cache, for honest cold and warm read figures.

:func:`evict` drops files from the page cache per file with ``posix_fadvise(DONTNEED)``
after a flush, or (asked explicitly, and root only) through ``/proc/sys/vm/drop_caches`` (any user; clean pages only, hence the flush). :func:`resident_fraction` asks
``mincore`` how much of the files is cached, so a report can say whether a "cold" read
really was cold. :func:`filesystem_of` names the file system (a tmpfs "disk" is RAM).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path

import numpy as np

DROP_CACHES = "/proc/sys/vm/drop_caches"


def evict(paths, drop_caches: str | None = None) -> str:
    """Drop ``paths`` from the page cache; returns how (``drop_caches``, ``fadvise`` or why not).

    Per file with ``posix_fadvise`` unless ``drop_caches`` names the kernel's switch (pass
    :data:`DROP_CACHES`): writing it empties the page cache of the whole machine, which
    slows every other process on it, so only an explicit request (``--drop-caches``) uses it.
    """
    paths = [Path(p) for p in paths]
    os.sync()  # dirty pages cannot be dropped: write them out first
    if drop_caches is not None:
        try:
            with open(drop_caches, "w") as f:
                f.write("3\n")
            return "drop_caches"
        except OSError:
            pass
    failures = []
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError as exc:
            failures.append(f"{p}: {exc.strerror}")
            continue
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            failures.append(f"{p}: {exc.strerror}")
        finally:
            os.close(fd)
    return "fadvise" if not failures else "failed: " + "; ".join(failures)


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    lib = ctypes.CDLL(name, use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return lib


def resident_fraction(paths) -> float | None:
    """Fraction of the files' pages in the page cache now (None where mincore is unavailable)."""
    lib = _libc()
    if lib is None:
        return None
    page = mmap.PAGESIZE
    total = resident = 0
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                npages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * npages)()
                if lib.mincore(addr, size, vec) != 0:
                    return None
                resident += int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1))
                total += npages
            finally:
                lib.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else None


def filesystem_of(path) -> str:
    """The file system type holding ``path`` (from /proc/self/mounts; ``unknown`` elsewhere)."""
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind
