"""The fault ring's host drain between decode steps, as plain logic (no device): the knobs'
checks, the drain's own state (the tail it owns, the counts) and what one service does to the
table. :mod:`nexusrt.backends.cuda.faults` issues the device work this plans.

One sequence holds every block of its table (the one-sequence runner): its own device blocks,
its host blocks (the oldest), and a *reserve* of free device blocks the drain moves host blocks
into. A block is moved only once it is **sealed**: every slot of it lies below the tokens the
steps enqueued so far write, so no later kernel appends to it; the copy of a block still being
appended to could miss a row written between the copy and the table write.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .blocks import BLOCK_SIZE, pair_runs
from .fault_ring import (ENTRIES, HEAD, OVERFLOW, TAIL, Move, RingLayout, _u32, apply_moves, drain, locate_hosts,
                         plan_copies, slot_runs)
from .tiers import KvBudgetError, TierPlan, TieredBlockPool, encode_host

RING_SLOTS = 4096  # default capacity (16 KiB): the host half of a 128k context posts in one step
MAX_RING_SLOTS = 1 << 20


@dataclass(frozen=True)
class FaultConfig:
    """The fault ring of a runner: ``reserve_blocks`` free device blocks to fill, ``ring_slots``."""

    reserve_blocks: int
    ring_slots: int


def plan_faults(plan: TierPlan, kv_fault_reserve, ring_slots: int = RING_SLOTS) -> FaultConfig | None:
    """The fault ring for tier split ``plan`` with ``kv_fault_reserve`` bytes of device KV kept
    free for blocks it moves in (None: no ring, host blocks stay zero-copy). Refused with
    :class:`KvBudgetError`, before any work: a reserve that is not a byte count, below one block
    (``plan.block_bytes``, every layer's K and V), above the host tier (it could never fill), or
    given without a host tier; a ring that is not a positive power of two up to 2**20 slots."""
    if kv_fault_reserve is None:
        return None
    if isinstance(kv_fault_reserve, bool) or not isinstance(kv_fault_reserve, (int, np.integer)):
        raise KvBudgetError(f"kv_fault_reserve must be a byte count (int), got {kv_fault_reserve!r}")
    reserve = int(kv_fault_reserve)
    if not plan.host_blocks:
        raise KvBudgetError("kv_fault_reserve needs a host tier: give a kv_gpu_budget below the context's KV")
    if reserve < plan.block_bytes:
        raise KvBudgetError(f"kv_fault_reserve {reserve} bytes is below one KV block ({plan.block_bytes} bytes: "
                            f"every layer's K and V of {BLOCK_SIZE} tokens)")
    if reserve > plan.host_bytes:
        raise KvBudgetError(f"kv_fault_reserve {reserve} bytes is more than the host tier holds ({plan.host_bytes} "
                            f"bytes, {plan.host_blocks} blocks): the rest could never fill; give at most that")
    if isinstance(ring_slots, bool) or not isinstance(ring_slots, (int, np.integer)) or ring_slots > MAX_RING_SLOTS:
        raise KvBudgetError(f"the fault ring's slots must be an int up to {MAX_RING_SLOTS}, got {ring_slots!r}")
    try:
        RingLayout(int(ring_slots), plan.host_blocks)
    except ValueError as exc:
        raise KvBudgetError(f"fault ring: {exc}") from None
    return FaultConfig(reserve // plan.block_bytes, int(ring_slots))


def spans(values) -> list[tuple[int, int]]:
    """Distinct ints (a list or an array) as ``(first, count)`` runs of consecutive values,
    ascending: one driver call (a memset or a copy) per run instead of one per value."""
    v = np.unique(np.asarray(values, dtype=np.int64).reshape(-1))
    if not v.size:
        return []
    starts = np.flatnonzero(np.diff(v, prepend=v[0] - 2) != 1)  # where a run begins
    counts = np.diff(np.append(starts, v.size))
    return list(zip(v[starts].tolist(), counts.tolist()))


def split_sealed(ids, where: np.ndarray, written_tokens: int) -> tuple[list[int], list[int]]:
    """Host ids whose block lies wholly below ``written_tokens`` (movable), and the others (still
    appended to). ``where`` is the drain's :func:`~.fault_ring.locate_hosts`; an id no entry names
    counts as sealed (:func:`plan_copies` leaves it)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    index = where[ids]
    open_ = (index >= 0) & ((index + 1) * BLOCK_SIZE > written_tokens)
    return ids[~open_].tolist(), ids[open_].tolist()


@dataclass
class FaultCounts:
    """The ``kv`` report's fault figures: posts the kernels made (``posted``), refused for a full
    ring (``overflow``), moved into HBM (``serviced``), drained but left on the host (``left``,
    once per drain: not sealed yet, posted again by a later read while the reserve has room; or
    no free device block, then never posted again; a drained id no entry names any more, a stale
    post of a block already moved, is not counted), bytes copied, and blocks moved ahead of any
    post (``prefetched``, :meth:`FaultDrain.prefetch`; their bytes are in ``bytes_moved``). ``posted`` and ``overflow``
    are as of the last snapshot: none is taken once nothing can move (:attr:`FaultDrain.exhausted`).
    ``move_ms``: the device time of the moves (each service's copies and table writes, between two
    events on the control stream), summed over the services seen complete: ``bytes_moved`` over it
    is the link's rate while faulting."""

    posted: int = 0
    overflow: int = 0
    serviced: int = 0
    left: int = 0
    bytes_moved: int = 0
    prefetched: int = 0
    move_ms: float = 0.0

    KEYS = ("faults_posted", "faults_serviced", "faults_overflow", "faults_left", "bytes_moved", "blocks_prefetched",
            "move_ms")

    def report(self) -> dict:
        """The figures under the ``kv`` report's names (:data:`KEYS`; all 0 for no fault ring)."""
        return dict(zip(self.KEYS, (self.posted, self.serviced, self.overflow, self.left, self.bytes_moved,
                                    self.prefetched, self.move_ms)))


@dataclass(frozen=True)
class Service:
    """One service's device work, in this order: store EMPTY at the ``slots`` runs (``(first
    word, count)``, at most two), store ``tail``; per move copy the host block's K and V of
    every layer to its device block, then store ``table_writes`` (logical block, device block);
    then clear ``requested`` of every id in ``cleared`` or, with ``park``, store 1 into all of it."""

    slots: list[tuple[int, int]]
    tail: int
    moves: list[Move]
    table_writes: list[tuple[int, int]]
    cleared: list[int]
    park: bool = False


@dataclass
class FaultDrain:
    """The drain's state over one sequence's ``table`` (a host copy of the device table, kept in
    step with it), ``where`` (:func:`~.fault_ring.locate_hosts` of it) and ``pool`` (its device
    blocks plus the reserve, its host blocks held).

    :meth:`service` reads a snapshot of the ring words; the drain owns ``tail`` (no kernel writes
    it), so it keeps its own copy instead of trusting the snapshot's."""

    layout: RingLayout
    pool: TieredBlockPool
    table: np.ndarray
    where: np.ndarray
    block_bytes: int
    tail: int = 0
    counts: FaultCounts = field(default_factory=FaultCounts)
    _head: int = 0

    @classmethod
    def for_sequence(cls, layout: RingLayout, table: np.ndarray, reserve_blocks: int, block_bytes: int) -> "FaultDrain":
        """The drain of a one-sequence ``table`` (``tiers.place_oldest_on_host``: device blocks
        ``0 ..`` and host blocks ``0 ..``) with ``reserve_blocks`` free device blocks after its own."""
        device = int((table >= 0).sum())
        pool = TieredBlockPool(device + reserve_blocks, layout.host_blocks)
        if pool.device.alloc(device) != table[table >= 0].tolist():
            raise ValueError("the table's device blocks must be 0 .. n-1 in order")
        if pool.alloc_host(layout.host_blocks) != table[table < 0].tolist():
            raise ValueError("the table's host blocks must be every host block in order")
        table = table.copy()
        return cls(layout, pool, table, locate_hosts(table, layout.host_blocks), block_bytes)

    @property
    def host_entries(self) -> int:
        """Table entries still naming a host block (read zero-copy by every step)."""
        return int((self.where >= 0).sum())

    @property
    def exhausted(self) -> bool:
        """Nothing can move any more: no entry names a host block, or the reserve has no free
        block (the drain never frees one: a moved block stays in HBM for the runner's life)."""
        return self.pool.device.num_free == 0 or not (self.where >= 0).any()

    def service(self, snapshot: np.ndarray, written_tokens: int) -> Service:
        """Drain ``snapshot`` (the ring's words up to the entries, read from the device; consumed
        in place, as the drain rule stores into the ring) and plan the moves of the sealed ids
        below ``written_tokens`` into free reserve blocks.

        ``requested``: while the reserve keeps a free block every drained id is cleared (moved:
        after its table write; not sealed: posted again and moved once sealed). The service that
        exhausts the reserve instead parks every host block (``park``): nothing can move it any
        more, so no kernel should post it again (re-posting every host block each step was a
        drain of thousands of ids per token, forever, with a reserve below the host tier)."""
        words = snapshot[:ENTRIES + self.layout.capacity]
        head = _u32(words[HEAD])
        self.counts.posted += (head - self._head) & 0xFFFFFFFF
        self._head = head
        self.counts.overflow = _u32(words[OVERFLOW])
        start = self.tail
        words[TAIL] = np.uint32(start).view(np.int32)
        ids = drain(words, self.layout)
        self.tail = (start + ids.size) & 0xFFFFFFFF
        sealed, open_ = split_sealed(ids, self.where, written_tokens)
        # Host order, not ring order: the splits of a step post concurrently, so the ring holds
        # consecutive blocks interleaved (split 0's first page, split 1's first, ...). Moved in
        # that order each block got its own copy per layer and K/V (65,536 copies of 32 KiB for
        # the 1,024 blocks of an 8B model's 16k host tokens); sorted, the reserve's in-order
        # blocks make them one run, one copy per layer and K/V (:meth:`runs`).
        moves, left = plan_copies(sorted(sealed), self.pool, self.where)
        writes = apply_moves(self.table, self.where, moves)
        self.counts.serviced += len(moves)
        self.counts.left += int((self.where[np.asarray(left, dtype=np.int64)] >= 0).sum()) + len(open_)
        self.counts.bytes_moved += len(moves) * self.block_bytes
        park = self.exhausted
        return Service(slot_runs(start, ids.size, self.layout), self.tail, moves, writes,
                       [] if park else sorted(ids.tolist()), park)

    def prefetch(self, written_tokens: int, limit: int | None = None) -> Service:
        """Moves, ahead of any post, of the sealed host blocks the table still names, the
        sequence's oldest first, into free reserve blocks (at most ``limit``; None: as many as
        the reserve takes): a decode step reads every block, so each of them is read by the next
        step anyway, and moved now it is read from HBM by that step instead of zero-copy.

        Consumes no ring slot and clears no ``requested`` word: a kernel that posts one of these
        blocks before its table write lands has that post drained later as stale (no entry names
        the id any more: cleared, not counted as left)."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        logical = np.flatnonzero(self.table < 0)  # ascending: the oldest blocks first
        sealed = logical[(logical + 1) * BLOCK_SIZE <= written_tokens]
        if limit is not None:
            sealed = sealed[:limit]
        moves, _ = plan_copies((~self.table[sealed]).astype(np.int64), self.pool, self.where)
        writes = apply_moves(self.table, self.where, moves)
        self.counts.prefetched += len(moves)
        self.counts.bytes_moved += len(moves) * self.block_bytes
        park = bool(moves) and self.exhausted
        return Service([], self.tail, moves, writes, [], park)

    def runs(self, moves: list[Move]) -> list[tuple[int, int, int]]:
        """``moves`` as copies ``(host block, device block, count)``: consecutive host blocks going to
        consecutive device blocks share one copy per layer and K/V (ring order is mostly split order,
        and the reserve hands out blocks in order), so a service of many blocks is few driver calls."""
        return pair_runs((m.host, m.device) for m in moves)

    def release(self, hosts) -> None:
        """Return moved host blocks to the host tier (once no kernel can still read them)."""
        self.pool.free([encode_host(h) for h in hosts])
