"""Page-locked host buffers (``cuMemHostAlloc``): the host end of fast, asynchronous copies.

Pageable host memory makes the driver stage every copy through its own pinned buffer
and serialises it with the host; page-locked memory lets the copy engines read and write
it directly while the host carries on. Every buffer is tracked so that shutdown frees
what is left and the audit can name it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from ..errors import CudaError, OutOfMemory
from ..driver.calls import call, cu
from .core import retire


@dataclass(eq=False)
class HostBlock:
    """One pinned buffer of ``nbytes`` at host address ``ptr``."""

    id: int
    ptr: int
    nbytes: int
    tag: str | None
    state: str = "live"

    compressed = False

    def view(self) -> np.ndarray:
        """The buffer as a uint8 NumPy array (no copy; dangles once freed)."""
        return np.ctypeslib.as_array((ctypes.c_uint8 * self.nbytes).from_address(self.ptr))


class PinnedHost:
    """Allocates, tracks and frees page-locked host buffers (CUDA backend only)."""

    def __init__(self):
        self.live: dict[int, HostBlock] = {}
        self._next_id = 1
        self.peak = 0

    def alloc(self, nbytes: int, tag: str | None = None) -> HostBlock:
        # PORTABLE: the buffer is pinned for every context, not only the current one.
        try:
            ptr = int(call("cuMemHostAlloc", nbytes, cu().CU_MEMHOSTALLOC_PORTABLE))
        except CudaError as exc:
            if exc.code == 2:  # CUDA_ERROR_OUT_OF_MEMORY
                raise OutOfMemory(nbytes, 0, "pinned host memory") from None
            raise
        block = HostBlock(self._next_id, ptr, nbytes, tag)
        self._next_id += 1
        self.live[block.id] = block
        self.peak = max(self.peak, self.bytes())
        return block

    def free(self, block: HostBlock) -> None:
        retire(self.live, block, "pinned buffer")
        call("cuMemFreeHost", block.ptr)

    def bytes(self) -> int:
        return sum(b.nbytes for b in self.live.values())

    def close(self) -> list[HostBlock]:
        """Free every buffer still live; returns them (leaked at shutdown)."""
        leaked = list(self.live.values())
        errors = []
        for b in leaked:
            b.state = "released_at_shutdown"
            try:
                call("cuMemFreeHost", b.ptr)
            except CudaError as exc:  # keep freeing the rest
                errors.append(exc)
        self.live.clear()
        if errors:
            raise errors[0]
        return leaked
