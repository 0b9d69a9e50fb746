"""Physical device pages through the CUDA virtual memory API.

One reserved virtual range (``cuMemAddressReserve``); one ``cuMemCreate`` handle per
page; ``cuMemMap`` + ``cuMemSetAccess`` to put a page under a slot, ``cuMemUnmap`` +
``cuMemRelease`` to give it back. Compressible pages are the same calls with
``CU_MEM_ALLOCATION_COMP_GENERIC`` in the properties; the driver may still hand back a
plain page, so every compressible page is checked with
``cuMemGetAllocationPropertiesFromHandle`` and reported as what it really is.
"""

from __future__ import annotations

import math

from ..errors import CudaError
from ..driver.calls import call, cu
from .pages import COMPRESSED, PLAIN, PageOOM

_OOM_CODE = 2  # CUDA_ERROR_OUT_OF_MEMORY


class CudaPageProvider:
    """Device pages for the arena (see :mod:`nexusrt.memory.core` for the interface)."""

    def __init__(self, ordinal: int = 0, compression: bool = False):
        d = cu()
        self.ordinal = int(ordinal)
        self._props = {PLAIN: self._prop(False)}
        minimum = d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        recommended = d.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
        self.granularity = int(call("cuMemGetAllocationGranularity", self._props[PLAIN], minimum))
        page = max(self.granularity, int(call("cuMemGetAllocationGranularity", self._props[PLAIN], recommended)))
        self.supports_compression = False
        if compression:
            prop = self._prop(True)
            try:
                comp = int(call("cuMemGetAllocationGranularity", prop, recommended))
            except CudaError:  # the attribute said yes but the driver will not size it: treat as no
                comp = 0
            if comp:
                self._props[COMPRESSED] = prop
                self.supports_compression = True
                page = page * comp // math.gcd(page, comp)
        self.page_bytes = page
        access = d.CUmemAccessDesc()
        access.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = self.ordinal
        access.flags = d.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = [access]
        self.live_handles = 0
        self.mapped_bytes = 0

    def _prop(self, compressed: bool):
        d = cu()
        prop = d.CUmemAllocationProp()
        prop.type = d.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = d.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.ordinal
        if compressed:
            prop.allocFlags.compressionType = d.CUmemAllocationCompType.CU_MEM_ALLOCATION_COMP_GENERIC
        return prop

    # -- the virtual range --------------------------------------------------------------
    def reserve(self, nbytes: int) -> int:
        return int(call("cuMemAddressReserve", nbytes, self.page_bytes, 0, 0))

    def free_range(self, base: int, nbytes: int) -> None:
        call("cuMemAddressFree", base, nbytes)

    # -- physical pages ------------------------------------------------------------------
    def create(self, kind: str):
        """A new page handle and the kind the driver really gave (compressible or plain)."""
        prop = self._props.get(kind, self._props[PLAIN])
        try:
            handle = call("cuMemCreate", self.page_bytes, prop, 0)
        except CudaError as exc:
            if exc.code == _OOM_CODE:
                raise PageOOM() from None
            if kind != COMPRESSED:
                raise
            # Compressible memory refused for another reason (e.g. not supported in this
            # mode): hand out a plain page; the arena stops asking for compression.
            self.supports_compression = False
            return self.create(PLAIN)
        self.live_handles += 1
        actual = PLAIN
        if kind == COMPRESSED:
            got = call("cuMemGetAllocationPropertiesFromHandle", handle)
            generic = int(cu().CUmemAllocationCompType.CU_MEM_ALLOCATION_COMP_GENERIC)
            actual = COMPRESSED if int(got.allocFlags.compressionType) == generic else PLAIN
            if actual == PLAIN:
                self.supports_compression = False
        return handle, actual

    def release(self, handle) -> None:
        call("cuMemRelease", handle)
        self.live_handles -= 1

    def map(self, addr: int, size: int, handle) -> None:
        call("cuMemMap", addr, size, 0, handle, 0)
        self.mapped_bytes += size

    def set_access(self, addr: int, size: int) -> None:
        call("cuMemSetAccess", addr, size, self._access, 1)

    def unmap(self, addr: int, size: int) -> None:
        call("cuMemUnmap", addr, size)
        self.mapped_bytes -= size

    def free_bytes(self) -> int:
        free, _total = call("cuMemGetInfo")
        return int(free)

    def fill(self, addr: int, nbytes: int, byte: int) -> None:
        # Streams are non-blocking, so the legacy-stream memset would not wait for them:
        # synchronise around it (this is a test and debug helper, not a hot path).
        call("cuCtxSynchronize")
        call("cuMemsetD8", addr, byte, nbytes)
        call("cuCtxSynchronize")
