"""The process communicator for CPU ranks: fp32 collectives through one shared-memory segment.

One rank per process (SPMD), the call NCCL makes on the GPU: each rank calls
``all_reduce(its buffer)`` and gets the sum (the ranks' logits slices need no collective: the
front joins them). The front process creates the segment (:func:`create_segment`)
and unlinks it; every rank attaches by name (:class:`ShmGroup`).

Layout: a header of two int64 per rank (how many barriers it has reached, and the element
count of its current buffer), then one slot of ``slot_bytes`` per rank. A collective moves
its buffer in slot-sized chunks: write the chunk to the own slot, barrier, read every slot,
barrier (so no rank overwrites a slot another has not read yet).

**Bit for bit LocalGroup's.** Every rank sums the slots itself, rank 0 first then ``+= rank
1``, ... in fp32, exactly as :class:`~nexusrt.parallel.LocalGroup` does; chunking does not
change an elementwise sum. So every rank gets the same bits, and a run through processes
equals the in-process lockstep run.

**Bounded waits.** A barrier polls the header until every rank has arrived or ``timeout``
seconds pass; then it raises :class:`CollectiveTimeout` naming the ranks that never came
(a dead or stuck peer), never hangs. After a timeout the group is broken: every later call
raises. Ordering: a rank writes its slot, then its counter; x86-64 keeps stores in order, so a
peer that sees the counter sees the data (a weakly ordered CPU would need a fence here).
"""

from __future__ import annotations

import time
from multiprocessing import shared_memory

import numpy as np

from ..errors import NexusRTError

F32 = np.float32
DEFAULT_SLOT_BYTES = 4 << 20  # per rank; larger buffers go in several chunks
DEFAULT_TIMEOUT = 60.0  # seconds a rank waits for its peers at one barrier


class CollectiveTimeout(NexusRTError):
    """A collective waited ``timeout`` seconds for ranks that never arrived (named in the message)."""


def _header_bytes(size: int) -> int:
    return -(-16 * size // 64) * 64  # two int64 per rank, rounded to a cache line


def create_segment(size: int, slot_bytes: int = DEFAULT_SLOT_BYTES) -> shared_memory.SharedMemory:
    """A zeroed segment for ``size`` ranks; the creator must ``close()`` and ``unlink()`` it."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"group size must be an integer >= 1, got {size!r}")
    if slot_bytes < 4 or slot_bytes % 4:
        raise ValueError(f"slot_bytes must be a positive multiple of 4, got {slot_bytes!r}")
    return shared_memory.SharedMemory(create=True, size=_header_bytes(size) + size * slot_bytes)


class ShmGroup:
    """Rank ``rank`` of ``size`` over the segment named ``name`` (made by :func:`create_segment`
    with the same ``size`` and ``slot_bytes``)."""

    def __init__(self, name: str, rank: int, size: int, slot_bytes: int = DEFAULT_SLOT_BYTES,
                 timeout: float = DEFAULT_TIMEOUT):
        if not 0 <= rank < size:
            raise ValueError(f"rank must be in [0, {size}), got {rank!r}")
        self.rank, self.size, self.timeout = rank, size, float(timeout)
        self._shm = shared_memory.SharedMemory(name=name)
        header = self._shm.buf
        self._arrived = np.ndarray((size,), np.int64, buffer=header, offset=0)
        self._counts = np.ndarray((size,), np.int64, buffer=header, offset=8 * size)
        base, cap = _header_bytes(size), slot_bytes // 4
        self._slots = [np.ndarray((cap,), F32, buffer=header, offset=base + r * slot_bytes) for r in range(size)]
        self._passed = 0  # barriers this rank has passed
        self._broken: str | None = None

    def all_reduce(self, buf: np.ndarray) -> np.ndarray:
        """The elementwise sum of every rank's ``buf`` (fp32, same shape), in rank order (read-only)."""
        flat = self._flat(buf)
        total = np.empty_like(flat)
        for lo, hi in self._chunks(flat, "all_reduce"):
            np.copyto(total[lo:hi], self._slots[0][:hi - lo])
            for slot in self._slots[1:]:
                total[lo:hi] += slot[:hi - lo]
            self._barrier("all_reduce (read)")
        total = total.reshape(buf.shape)
        total.flags.writeable = False
        return total

    def close(self) -> None:
        """Detach from the segment (the creator unlinks it)."""
        self._slots, self._arrived, self._counts = [], None, None
        self._shm.close()

    def _flat(self, buf: np.ndarray) -> np.ndarray:
        if self._broken:
            raise CollectiveTimeout(f"rank {self.rank}: the group is broken ({self._broken})")
        if not isinstance(buf, np.ndarray) or buf.dtype != F32:
            raise TypeError(f"collectives move fp32 arrays, got {getattr(buf, 'dtype', type(buf).__name__)}")
        return np.ascontiguousarray(buf).reshape(-1)

    def _chunks(self, flat: np.ndarray, what: str):
        """Write ``flat`` chunk by chunk; yields each chunk's range once every rank has written its
        own (the caller reads the slots, then passes the second barrier)."""
        self._counts[self.rank] = flat.size
        cap = self._slots[0].size
        for lo in range(0, max(flat.size, 1), cap):
            hi = min(lo + cap, flat.size)
            self._slots[self.rank][:hi - lo] = flat[lo:hi]
            self._barrier(what)
            if lo == 0 and np.any(self._counts != flat.size):  # every rank sees the same counts
                sizes = {r: int(c) for r, c in enumerate(self._counts)}
                raise ValueError(f"rank {self.rank}: {what} buffers differ in size across ranks: {sizes}")
            yield lo, hi

    def _barrier(self, what: str) -> None:
        self._passed += 1
        self._arrived[self.rank] = self._passed
        deadline = time.monotonic() + self.timeout
        polls = 0
        while True:
            missing = np.flatnonzero(self._arrived < self._passed)
            if missing.size == 0:
                return
            if time.monotonic() > deadline:
                self._broken = f"{what} timed out after {self.timeout:g} s waiting for rank(s) {missing.tolist()}"
                raise CollectiveTimeout(f"rank {self.rank}: {self._broken}")
            polls += 1
            # Yield the core at once (peers may share it), then sleep briefly: waits are usually short.
            time.sleep(0 if polls < 200 else 1e-4)
