"""The runtime's arena: the bookkeeping core over a page provider, plus pinned host memory.

Boot calls :func:`open_arena` in its ``memory_arena`` phase and ``rt.arena.close()`` at
shutdown. ``close`` releases every page and buffer — tensors still alive included, which
the audit then names as leaked at shutdown — and checks with the provider's own
counters that nothing is left mapped.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import deque

from ..errors import OutOfMemory
from ..driver.calls import call
from .core import ArenaCore, Block
from .pinned_host import HostBlock, PinnedHost

POISON_BYTE = 0xFF  # NaN in every float dtype, -1 in the signed ints: hard to miss in a test

# The audit of the last arena closed, so nrt.memory.audit() still answers after shutdown.
LAST_AUDIT: list[dict] | None = None


class Arena:
    """Device memory of one runtime (see the module docstring)."""

    def __init__(self, rt, provider, reserve_bytes: int, *, high_water_bytes: int | None = None,
                 debug: bool = False):
        self.backend = rt.backend
        self._device = rt.device
        self.provider = provider
        self.core = ArenaCore(provider, reserve_bytes, high_water_bytes)
        self.pinned = PinnedHost() if rt.is_cuda else None
        self.debug = debug
        self.closed = False
        self._deferred: deque = deque()  # (block, pending event) dropped by the collector
        self._lock = threading.RLock()

    # -- blocks ----------------------------------------------------------------------------
    def alloc(self, nbytes: int, compressed: bool = False, tag: str | None = None) -> Block:
        with self._lock:
            self._drain()
            return self.core.alloc(nbytes, compressed, tag)

    def alloc_pinned(self, nbytes: int, tag: str | None = None) -> HostBlock:
        with self._lock:
            self._drain()
            return self.pinned.alloc(nbytes, tag)

    def free(self, block, pending=None) -> None:
        """Return an arena or pinned block, after the copy in flight on it (``pending``) ends."""
        with self._lock:
            self._free_now(block, pending)
            self._drain()

    def defer_free(self, block, pending=None) -> None:
        """Free later (safe from ``__del__``: only appends)."""
        self._deferred.append((block, pending))

    def _free_now(self, block, pending) -> None:
        if pending is not None:
            pending.synchronize()
        if isinstance(block, HostBlock):
            if self.debug and block.state == "live":
                ctypes.memset(block.ptr, POISON_BYTE, block.nbytes)
            self.pinned.free(block)
            return
        if self.debug and block.state == "live" and not self.closed:
            self.provider.fill(block.addr, block.size, POISON_BYTE)
        self.core.free(block)

    def _drain(self) -> None:
        while self._deferred:
            block, pending = self._deferred.popleft()
            if block.state == "live" and not self.closed:
                self._free_now(block, pending)

    # -- bytes -------------------------------------------------------------------------------
    def host_view(self, block: Block):
        """A uint8 NumPy view of an arena block where the host can reach it (CPU), else None."""
        buffer = getattr(self.provider, "buffer", None)
        return buffer(block.addr, block.size) if buffer is not None else None

    def fill(self, addr: int, nbytes: int, byte: int) -> None:
        self.provider.fill(addr, nbytes, byte)

    def read(self, host_addr: int, device_addr: int, nbytes: int) -> None:
        """Device -> host, synchronously, after all work queued on the device."""
        self._copy_sync("cuMemcpyDtoH", host_addr, device_addr, nbytes)

    def write(self, device_addr: int, host_addr: int, nbytes: int) -> None:
        """Host -> device, synchronously, after all work queued on the device."""
        self._copy_sync("cuMemcpyHtoD", device_addr, host_addr, nbytes)

    def _copy_sync(self, fn: str, dst: int, src: int, nbytes: int) -> None:
        if self.backend != "cuda":
            ctypes.memmove(dst, src, nbytes)
            return
        # Our streams do not synchronise with the legacy stream: wait for everything first.
        self._device.synchronize()
        call(fn, dst, src, nbytes)
        self._device.synchronize()

    # -- figures ----------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            self._drain()
            s = self.core.stats()
            s["backend"] = self.backend
            s["debug_poison"] = self.debug
            s["pinned_bytes"] = self.pinned.bytes() if self.pinned else 0
            s["pinned_allocations"] = len(self.pinned.live) if self.pinned else 0
            s["pinned_peak_bytes"] = self.pinned.peak if self.pinned else 0
            return s

    def audit(self) -> list[dict]:
        """Live allocations now (state ``live``); after close, what close had to release."""
        if self.closed:
            return list(LAST_AUDIT or [])
        with self._lock:
            self._drain()
            blocks = list(self.core.live.values()) + (list(self.pinned.live.values()) if self.pinned else [])
            return [_entry(b, "live") for b in blocks]

    def trim(self, keep_bytes: int = 0) -> int:
        with self._lock:
            self._drain()
            return self.core.trim(keep_bytes)

    def set_high_water(self, nbytes: int | None) -> None:
        with self._lock:
            self.core.set_high_water(nbytes)

    # -- shutdown -------------------------------------------------------------------------
    def close(self) -> None:
        """Release everything; record the audit (tensors alive now count as leaked)."""
        global LAST_AUDIT
        if self.closed:
            return
        report: list[dict] = []
        try:
            with self._lock:
                self._drain()
                self.closed = True
                report += [_entry(b, "leaked_at_shutdown") for b in self.core.close()]
                if self.pinned is not None:
                    report += [_entry(b, "leaked_at_shutdown") for b in self.pinned.close()]
        finally:
            residue = {"mapped_bytes": getattr(self.provider, "mapped_bytes", 0),
                       "page_handles": getattr(self.provider, "live_handles", 0)}
            report += [{"what": k, "nbytes" if k == "mapped_bytes" else "count": v, "tag": None,
                        "state": "still held after shutdown"} for k, v in residue.items() if v]
            LAST_AUDIT = report


def _entry(block, state: str) -> dict:
    return {"what": "pinned" if isinstance(block, HostBlock) else "device",
            "addr": block.ptr if isinstance(block, HostBlock) else block.addr,
            "nbytes": block.nbytes, "tag": block.tag, "state": state}


def _env_bytes(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of bytes, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative, got {value}")
    return value


def open_arena(rt, arena_bytes: int | None = None) -> Arena:
    """Reserve the runtime's range (default: the device memory) and return its arena.

    ``NEXUSRT_DEBUG=1`` poisons freed memory with 0xFF bytes; ``NEXUSRT_ARENA_HIGH_WATER``
    (bytes) caps the free pages the pool keeps before it returns pages to the driver.
    """
    if arena_bytes is not None and (isinstance(arena_bytes, bool) or not isinstance(arena_bytes, int)
                                    or arena_bytes <= 0):
        raise ValueError(f"arena_bytes must be a positive int (bytes), got {arena_bytes!r}")
    debug = os.environ.get("NEXUSRT_DEBUG", "").strip() not in ("", "0")
    high_water = _env_bytes("NEXUSRT_ARENA_HIGH_WATER")
    if rt.is_cuda:
        from .provider_cuda import CudaPageProvider

        provider = CudaPageProvider(rt.device.ordinal, bool(rt.profile.features.get("compressible_memory")))
        return Arena(rt, provider, arena_bytes or rt.profile.memory_bytes,
                     high_water_bytes=high_water, debug=debug)
    from .provider_host import HostPageProvider

    reserve = arena_bytes or rt.profile.memory_bytes or (1 << 30)
    while True:
        try:
            return Arena(rt, HostPageProvider(limit_bytes=arena_bytes), reserve,
                         high_water_bytes=high_water, debug=debug)
        except (OSError, OverflowError):
            # A host that refuses a lazy reservation of its own RAM size (strict
            # overcommit): the default shrinks, an explicit size is an error. OverflowError:
            # a size past what mmap takes (ssize_t) once rounded up to whole pages.
            if arena_bytes is not None or reserve <= (64 << 20):
                raise OutOfMemory(reserve, 0, "host address space (CPU arena reservation)") from None
            reserve //= 2
