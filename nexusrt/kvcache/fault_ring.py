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
word 96    ``bell``: the doorbell, set to 1 after a post publishes its id; the drain's
           watch stream waits in ``cuStreamWaitValue32`` for it, clears it, then reads
word 128.. ``entries[capacity]``: the host block id of each claimed slot, EMPTY when free
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
4. Ring the doorbell: a system-scope fence (the copy engine, not an SM, reads the entries
   next), then store 1 into ``bell``. A plain store, not a count: the watch only needs to
   know that something was published since it last cleared the word, and a store racing
   the clear is harmless, because the clear comes before the copy that reads the entries.

Doorbell (the snapshot's trigger, :class:`~nexusrt.backends.cuda.faults.FaultService`): a watch
stream of the drain's own waits in ``cuStreamWaitValue32(bell, 1, AND)``, then stores 0 into
``bell`` and copies the words up to the entries into a pinned mirror. The first post of a step
rings it while the step still runs, instead of the copy waiting for the compute stream's whole
queue. The compute stream rings it too, behind the work queued when the snapshot was armed, so
the watch never waits for work not queued yet: a wait only a post could end would hold every
whole-device wait (``cuCtxSynchronize``) forever once the steps stop posting.

Drain rule (run between decode steps by :class:`~nexusrt.backends.cuda.faults.FaultService` on
each snapshot the doorbell triggered): from
``tail`` on, read ``entries[tail % capacity]``; EMPTY means the slot is claimed but its store
has not landed yet: stop there (the next service resumes). Otherwise take ``h``, store EMPTY,
``tail += 1`` (release), and service ``h``: :func:`plan_copies` moves it to a free device block
or leaves it on the host. ``requested[h]`` is then either cleared, only after the table no
longer names ``~h`` or the block was left (a later read posts it again: an unsealed block, moved
once sealed), or, once the drain has no free device block left (it never frees one), stored 1
for *every* host block: nothing can move any more, so the kernels stop posting (each read finds
the block in flight and posts nothing) and the drain stops reading the ring.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tiers import TieredBlockPool

EMPTY = np.int32(-(2 ** 31))  # no block id is this; entries are host block indices >= 0
LINE_WORDS = 32  # 128 bytes
HEAD, TAIL, OVERFLOW, BELL, ENTRIES = 0, LINE_WORDS, 2 * LINE_WORDS, 3 * LINE_WORDS, 4 * LINE_WORDS


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


def drain(words: np.ndarray, layout: RingLayout, limit: int | None = None) -> np.ndarray:
    """Consume published entries from ``tail`` on (at most ``limit``); returns the host block
    ids in ring order (int64). Stops at the first claimed-but-unwritten slot.

    One pass over the claimed slots with array operations, not a Python step per slot: a
    service drains up to a whole ring (4,096 ids by default) between two decode steps."""
    tail = _u32(words[TAIL])
    n = min((_u32(words[HEAD]) - tail) & 0xFFFFFFFF, layout.capacity)  # the rule never claims more
    if limit is not None:
        n = min(n, int(limit))
    slots = ENTRIES + (tail + np.arange(n, dtype=np.int64)) % layout.capacity
    ids = words[slots].astype(np.int64)
    unwritten = np.flatnonzero(ids == EMPTY)
    if unwritten.size:  # a producer claimed this slot and has not stored its id yet
        slots, ids = slots[:unwritten[0]], ids[:unwritten[0]]
    words[slots] = EMPTY
    words[TAIL] = np.uint32((tail + ids.size) & 0xFFFFFFFF).view(np.int32)
    return ids


def slot_runs(tail: int, count: int, layout: RingLayout) -> list[tuple[int, int]]:
    """The words of the ``count`` slots consumed from ``tail`` as ``(first word, count)`` runs:
    consecutive mod ``capacity``, so one run, or two where they wrap past the ring's end."""
    first = tail % layout.capacity
    before_end = min(count, layout.capacity - first)
    runs = [(ENTRIES + first, before_end)] if before_end else []
    if count > before_end:
        runs.append((ENTRIES, count - before_end))
    return runs


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


def locate_hosts(table: np.ndarray, host_blocks: int) -> np.ndarray:
    """``where[h]``: the index of the entry of ``table`` naming host block ``h`` (``~h``), -1 where
    none does. The drain keeps it beside its table (:func:`apply_moves` updates both), so a drained
    id is found with one array lookup instead of a scan of the whole table. Refused where one host
    block is named twice (the one-sequence table names each once)."""
    where = np.full(int(host_blocks), -1, dtype=np.int64)
    index = np.flatnonzero(table < 0)
    hosts = ~table[index].astype(np.int64)
    if hosts.size and (hosts.max() >= host_blocks or np.unique(hosts).size != hosts.size):
        raise ValueError(f"the table must name each of host blocks 0 .. {host_blocks - 1} at most once")
    where[hosts] = index
    return where


def plan_copies(ids, pool: TieredBlockPool, where: np.ndarray) -> tuple[list[Move], list[int]]:
    """For each drained host id, in order: a free device block if there is one. Returns the moves
    and the ids left on the host (no free device block, or, ``where[h] < 0``, no table entry
    names them any more).

    Each move's work, in this order, on the control stream (one stream, so its order is the
    order the device sees): one host-to-device copy per layer of K and of V (``Hkv * BLOCK_SIZE
    * D * 2`` bytes each; the blocks of a batch coalesce into as many copies as there are runs),
    then the table write (:func:`apply_moves`), so a kernel reads either ``~h`` (the host copy,
    still valid) or ``d`` (already filled); the host block is freed only after the compute stream
    has passed an event recorded after the table write.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    named = where[ids] >= 0
    movable = named & (np.cumsum(named) <= pool.device.num_free)  # the first named ids, up to the free blocks
    hosts = ids[movable].tolist()
    moves = [Move(h, d) for h, d in zip(hosts, pool.device.alloc(len(hosts)))]
    return moves, ids[~movable].tolist()


def apply_moves(table: np.ndarray, where: np.ndarray, moves: list[Move]) -> list[tuple[int, int]]:
    """Point the table entry ``~h`` of each move at its device block and drop ``h`` from ``where``
    (both in place); returns the writes ``(entry index, device block)``, the device table's."""
    if not moves:
        return []
    hosts = np.array([m.host for m in moves], dtype=np.int64)
    devices = np.array([m.device for m in moves], dtype=np.int64)
    index = where[hosts]
    if (index < 0).any():
        raise ValueError(f"moves of host blocks no table entry names: {hosts[index < 0].tolist()}")
    table[index] = devices
    where[hosts] = -1
    return list(zip(index.tolist(), devices.tolist()))


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
        yield  # published, the bell not rung yet: a snapshot now already holds the id
        w[BELL] = 1
        return "posted"

    def drain(self, limit: int | None = None) -> list[int]:
        """The drain rule, servicing immediately: ids come back and ``requested`` is cleared."""
        ids = drain(self.words, self.layout, limit)
        self.words[self.layout.requested + ids] = 0
        return ids.tolist()
