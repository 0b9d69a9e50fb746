"""The fault ring's host half: its layout in device memory, the producer rule the kernels must
follow, the drain loop with back-pressure, and the copy plan (host block -> free device block).

Plain logic, no device. The producers are the decode attention kernels' ``_host_fault`` twins
(``kernels/cu/fault_ring.cuh``; :class:`DeviceRing` is the ring as their launcher takes it); the
drain between decode steps is :mod:`.fault_plan` (what to do) and
:mod:`nexusrt.backends.cuda.faults` (the device work). :class:`RingModel` runs both halves step by step over one
int32 array laid out as the device ring is, so tests can interleave them at random.

Layout (int32 words; each counter in its own 128-byte line so the producers' atomics and the
drain's stores never share a line):

=========  ========================================================================
word 0     ``head``: slots claimed by producers (monotonic, wraps mod 2**32)
word 32    ``tail``: slots the drain has consumed (monotonic)
word 64    ``overflow``: posts refused because the ring was full (back-pressure count)
word 96..  ``entries[capacity]``: the host block id of each claimed slot, EMPTY when free
then       ``requested[host_blocks]``: 1 while a host block is posted and not yet serviced
=========  ========================================================================

Producer rule (what a kernel thread does for host block ``h`` it is about to read):

1. ``atomicCAS(requested[h], 0, 1)``; if it was already 1 the block is in flight: read it
   zero-copy and post nothing (so one id is never queued twice).
2. Loop: read ``tail`` then ``head``; if ``head - tail >= capacity`` the ring is **full**:
   ``atomicAdd(overflow, 1)``, store ``requested[h] = 0`` (a later read may post again) and
   read the block zero-copy. Never wait for the drain: the drain needs the control stream,
   and a kernel spinning on it could hold the SMs the drain's stream needs. Back-pressure
   costs bandwidth, never a hang or a wrong value. Otherwise ``atomicCAS(head, head,
   head + 1)``; retry from the reads if it lost the race.
3. Store ``h`` into ``entries[head % capacity]`` with release semantics (``st.release.gpu``,
   or ``__threadfence()`` then a volatile store), then read the block zero-copy anyway: the
   fault only asks that the *next* reads find it in HBM.

Drain rule (the control stream's loop, woken by the doorbell the kernel rings): from
``tail`` on, read ``entries[tail % capacity]``; EMPTY means the slot is claimed but its
store has not landed yet: stop there (the next wake resumes). Otherwise take ``h``, store
EMPTY, ``tail += 1`` (release), and service ``h``: :func:`plan_copies` moves it to a free
device block, or, with none free, leaves it on the host; either way ``requested[h] = 0`` is
stored only after the table no longer names ``~h`` or the block was left on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tiers import TieredBlockPool, encode_host

EMPTY = np.int32(-(2 ** 31))  # no block id is this; entries are host block indices >= 0
LINE_WORDS = 32  # 128 bytes
HEAD, TAIL, OVERFLOW, ENTRIES = 0, LINE_WORDS, 2 * LINE_WORDS, 3 * LINE_WORDS


@dataclass(frozen=True)
class RingLayout:
    """Word offsets of a ring of ``capacity`` slots (a power of two) for ``host_blocks`` ids."""

    capacity: int
    host_blocks: int

    def __post_init__(self):
        if self.capacity <= 0 or self.capacity & (self.capacity - 1):
            raise ValueError(f"capacity must be a positive power of two, got {self.capacity}")
        if self.host_blocks <= 0:
            raise ValueError(f"host_blocks must be positive, got {self.host_blocks}")

    @property
    def requested(self) -> int:
        return ENTRIES + self.capacity

    @property
    def words(self) -> int:
        return self.requested + self.host_blocks

    @property
    def nbytes(self) -> int:
        return 4 * self.words

    def initial(self) -> np.ndarray:
        """The ring's words as the runtime uploads them before the first launch."""
        w = np.zeros(self.words, dtype=np.int32)
        w[ENTRIES:ENTRIES + self.capacity] = EMPTY
        return w


def _u32(x) -> int:
    return int(x) & 0xFFFFFFFF


def drain(words: np.ndarray, layout: RingLayout, limit: int | None = None) -> list[int]:
    """Consume published entries from ``tail`` on (at most ``limit``); returns the host block
    ids in ring order. Stops at the first claimed-but-unwritten slot."""
    out = []
    while limit is None or len(out) < limit:
        tail = _u32(words[TAIL])
        if tail == _u32(words[HEAD]):
            break
        slot = ENTRIES + tail % layout.capacity
        h = words[slot]
        if h == EMPTY:
            break  # a producer claimed the slot and has not stored its id yet
        out.append(int(h))
        words[slot] = EMPTY
        words[TAIL] = np.int32(np.uint32((tail + 1) & 0xFFFFFFFF).view(np.int32))
    return out


@dataclass(frozen=True)
class DeviceRing:
    """The ring as a launcher takes it: ``words`` int32 ``[layout.words]`` in device memory, laid
    out by ``layout`` and uploaded from :meth:`RingLayout.initial` before the first launch."""

    words: object
    layout: RingLayout


@dataclass(frozen=True)
class Move:
    """One serviced fault: host block ``host`` -> device block ``device`` (every layer, K and V)."""

    host: int
    device: int


def plan_copies(ids, pool: TieredBlockPool, tables: list[np.ndarray]) -> tuple[list[Move], list[int]]:
    """For each drained host id: a free device block if there is one. Returns the moves and the
    ids left on the host (no free device block, or no table names them any more).

    Each move's work, in this order, on the control stream: one host-to-device copy per layer
    of K and of V (``Hkv * BLOCK_SIZE * D * 2`` bytes each; the blocks of a batch coalesce into
    as many copies as there are runs), an event, then the table write (:func:`apply_moves`)
    in stream order after that event, so a kernel reads either ``~h`` (the host copy, still
    valid) or ``d`` (already filled); the host block is freed only after the compute stream
    has passed an event recorded after the table write.
    """
    moves, left = [], []
    for h in ids:
        entry = encode_host(h)
        if not any((t == entry).any() for t in tables) or pool.device.num_free == 0:
            left.append(h)
            continue
        moves.append(Move(h, pool.device.alloc(1)[0]))
    return moves, left


def apply_moves(tables: list[np.ndarray], moves: list[Move]) -> None:
    """Point every table entry ``~h`` of a move at its device block (in place)."""
    for m in moves:
        entry = encode_host(m.host)
        for t in tables:
            t[t == entry] = m.device


class RingModel:
    """Both halves over one word array, one atomic step at a time (tests interleave them).

    :meth:`producer` is a generator for one post of host block ``h``: each ``yield`` is a point
    where another agent may run; it ends with ``"posted"``, ``"in_flight"`` or ``"overflow"``.
    """

    def __init__(self, layout: RingLayout):
        self.layout = layout
        self.words = layout.initial()

    def producer(self, h: int):
        w, lay = self.words, self.layout
        req = lay.requested + h
        if w[req] != 0:  # atomicCAS(requested[h], 0, 1) failed
            return "in_flight"
        w[req] = 1
        yield
        while True:
            tail = _u32(w[TAIL])
            yield
            head = _u32(w[HEAD])
            if (head - tail) & 0xFFFFFFFF >= lay.capacity:
                w[OVERFLOW] += 1
                w[req] = 0
                return "overflow"
            yield
            if _u32(w[HEAD]) != head:  # atomicCAS(head, head, head + 1) lost: retry
                continue
            w[HEAD] = np.int32(np.uint32((head + 1) & 0xFFFFFFFF).view(np.int32))
            break
        yield  # claimed, not yet stored: the drain must wait here
        w[ENTRIES + head % lay.capacity] = h
        return "posted"

    def drain(self, limit: int | None = None) -> list[int]:
        """The drain rule, servicing immediately: ids come back and ``requested`` is cleared."""
        ids = drain(self.words, self.layout, limit)
        for h in ids:
            self.words[self.layout.requested + h] = 0
        return ids
