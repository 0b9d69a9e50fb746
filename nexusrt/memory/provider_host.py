"""Pages of host memory for the CPU backend's arena: the VMM model, done with mmap.

``reserve`` makes one anonymous private mapping with no swap reservation (the kernel
commits a page only when it is touched, like a reserved VA range); ``unmap`` gives the
physical pages back with ``MADV_DONTNEED`` (later reads see zeros, like a fresh page).
``limit_bytes`` caps how many pages can exist at once, so out-of-memory paths run on
the CPU exactly as they would on a device.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import numpy as np

from .pages import PLAIN, PageOOM

PAGE_BYTES = 2 << 20  # the same 2 MiB granularity as the H100, so the arithmetic matches
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)



def free_physical_bytes() -> int | None:
    """The host's free physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None

class HostPageProvider:
    """Host-memory pages with the page provider interface of :mod:`nexusrt.memory.core`."""

    supports_compression = False

    def __init__(self, page_bytes: int = PAGE_BYTES, limit_bytes: int | None = None):
        self.page_bytes = int(page_bytes)
        self.limit_bytes = limit_bytes
        self._maps: dict[int, tuple[mmap.mmap, np.ndarray]] = {}  # base -> (mapping, bytes view)
        self._next_handle = 1
        self.live_handles = 0
        self.mapped_bytes = 0

    def reserve(self, nbytes: int) -> int:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        mm = mmap.mmap(-1, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        view = np.frombuffer(mm, dtype=np.uint8)
        base = int(view.ctypes.data)
        self._maps[base] = (mm, view)
        return base

    def free_range(self, base: int, nbytes: int) -> None:
        mm, view = self._maps.pop(base)
        mm.madvise(mmap.MADV_DONTNEED, 0, nbytes)
        del view
        try:
            mm.close()
        except BufferError:  # a caller still holds a NumPy view: the mapping goes with it
            pass

    def create(self, kind: str):
        if self.limit_bytes is not None and (self.live_handles + 1) * self.page_bytes > self.limit_bytes:
            raise PageOOM()
        self.live_handles += 1
        self._next_handle += 1
        return self._next_handle, PLAIN

    def release(self, handle) -> None:
        self.live_handles -= 1

    def map(self, addr: int, size: int, handle) -> None:
        self.mapped_bytes += size

    def set_access(self, addr: int, size: int) -> None:
        pass  # host memory is always accessible

    def unmap(self, addr: int, size: int) -> None:
        mm, base = self._find(addr)
        mm.madvise(mmap.MADV_DONTNEED, addr - base, size)
        self.mapped_bytes -= size

    def free_bytes(self) -> int:
        if self.limit_bytes is not None:
            return max(0, self.limit_bytes - self.live_handles * self.page_bytes)
        free = free_physical_bytes()
        return 1 << 40 if free is None else free

    def fill(self, addr: int, nbytes: int, byte: int) -> None:
        self._find(addr)  # only our own memory
        ctypes.memset(addr, byte, nbytes)

    def buffer(self, addr: int, nbytes: int) -> np.ndarray:
        """A uint8 NumPy view of ``nbytes`` at ``addr`` (no copy)."""
        mm, base = self._find(addr)
        return self._maps[base][1][addr - base:addr - base + nbytes]

    def _find(self, addr: int):
        for base, (mm, _) in self._maps.items():
            if base <= addr < base + len(mm):
                return mm, base
        raise ValueError(f"address {addr:#x} is outside every host reservation")
