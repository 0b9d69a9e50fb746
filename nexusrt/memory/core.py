"""The arena's bookkeeping: blocks, slabs, per-tag accounting, peak, high water. No driver here.

:class:`ArenaCore` hands out blocks over a :class:`~nexusrt.memory.pages.PagePool`:

* large tensors (over half a page) get a contiguous run of whole pages;
* small ones a block in a slab page of their kind, aligned to 256 bytes;
* a block freed returns its pages (or its slab's page, once empty) to the pool, and
  above ``high_water_bytes`` of pooled pages the extra pages go back to the driver;
* every failure leaves the arena as it was, so a smaller request still succeeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import NexusRTError, OutOfMemory
from .pages import COMPRESSED, KINDS, PLAIN, KindRefused, PageOOM, PagePool
from .slab import ALIGN, Slab, round_up

__all__ = ["ArenaCore", "Block", "DoubleFree", "UseAfterFree", "PageOOM", "PLAIN", "COMPRESSED", "retire"]


class DoubleFree(NexusRTError, ValueError):
    """A tensor or block was freed twice."""


class UseAfterFree(NexusRTError, ValueError):
    """A freed tensor (or a view of one) was used."""


@dataclass(eq=False)
class Block:
    """One allocation: ``size`` bytes at ``addr`` (``nbytes`` of them asked for)."""

    id: int
    addr: int
    size: int
    nbytes: int
    kind: str
    tag: str | None
    slot: int  # first page slot of the run, or the slab's slot
    npages: int = 0  # pages of the run; 0 for a slab block
    slab: Slab | None = field(default=None, repr=False)
    offset: int = 0  # inside the slab
    state: str = "live"  # live | freed | released_at_shutdown

    @property
    def compressed(self) -> bool:
        return self.kind == COMPRESSED


class ArenaCore:
    """Blocks over ``reserve_bytes`` of virtual range from ``provider``."""

    def __init__(self, provider, reserve_bytes: int, high_water_bytes: int | None = None):
        self.pages = PagePool(provider, reserve_bytes)
        self.page = self.pages.page
        self.small_max = self.page // 2  # above this a tensor gets whole pages
        self.slabs: dict[str, list[Slab]] = {k: [] for k in KINDS}
        self.live: dict[int, Block] = {}
        self.high_water_bytes = high_water_bytes
        self.closed = False
        self._next_id = 1
        self.in_use = 0
        self.requested = 0
        self.peak = 0
        self.by_tag: dict[str, int] = {}
        self.counters = dict(oom=0, ilc_requested=0, ilc_uncompressed=0, ilc_uncompressed_bytes=0)

    # -- allocation ----------------------------------------------------------------------
    def alloc(self, nbytes: int, compressed: bool = False, tag: str | None = None) -> Block:
        """A block of at least ``nbytes`` bytes (ALIGN-aligned); raises OutOfMemory."""
        if self.closed:
            raise NexusRTError("the arena is closed (the runtime was shut down)")
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        if compressed:
            self.counters["ilc_requested"] += 1
        kind = COMPRESSED if compressed and self.pages.compression_ok else PLAIN
        try:
            block = self._alloc_kind(nbytes, kind, tag)
        except KindRefused:
            block = self._alloc_kind(nbytes, PLAIN, tag)
        if compressed and not block.compressed:
            # Asked for compression and did not get it: counted, never claimed.
            self.counters["ilc_uncompressed"] += 1
            self.counters["ilc_uncompressed_bytes"] += block.size
        self.live[block.id] = block
        self.in_use += block.size
        self.requested += nbytes
        self.peak = max(self.peak, self.in_use)
        key = tag or "untagged"
        self.by_tag[key] = self.by_tag.get(key, 0) + block.size
        return block

    def _alloc_kind(self, nbytes: int, kind: str, tag) -> Block:
        if nbytes <= self.small_max:
            size = round_up(nbytes, ALIGN)
            slab, off = self._slab_block(size, kind, nbytes)
            return self._block(slab.slot, size, nbytes, kind, tag, slab=slab, offset=off)
        npages = -(-nbytes // self.page)
        start = self._map_run(npages, kind, nbytes)
        return self._block(start, npages * self.page, nbytes, kind, tag, npages=npages)

    def _block(self, slot, size, nbytes, kind, tag, **kw) -> Block:
        b = Block(self._next_id, self.pages.addr(slot) + kw.get("offset", 0), size, nbytes, kind, tag, slot, **kw)
        self._next_id += 1
        return b

    def _slab_block(self, size: int, kind: str, nbytes: int) -> tuple[Slab, int]:
        for slab in self.slabs[kind]:
            if slab.largest_hole >= size:
                return slab, slab.alloc(size)
        slot = self._map_run(1, kind, nbytes)
        slab = Slab(slot, kind, self.page)
        self.slabs[kind].append(slab)
        return slab, slab.alloc(size)

    def _map_run(self, npages: int, kind: str, nbytes: int) -> int:
        pages = self.pages
        start, cost = pages.choose_window(npages, kind)
        if start is None:
            self.counters["oom"] += 1
            raise OutOfMemory(nbytes, pages.table.largest_free() * self.page,
                              "device arena (no free contiguous virtual range that large)")
        # Refuse at once what the device plainly cannot hold, before mapping anything.
        need = max(0, cost - pages.spare_count(kind)) * self.page
        if need > pages.provider.free_bytes() + pages.pool_bytes():
            self.counters["oom"] += 1
            raise OutOfMemory(nbytes, pages.available_bytes())
        try:
            pages.fill_window(start, npages, kind)
        except PageOOM:
            self.counters["oom"] += 1
            raise OutOfMemory(nbytes, pages.available_bytes()) from None
        return start

    # -- freeing -----------------------------------------------------------------------
    def free(self, block: Block) -> None:
        """Return ``block``; its pages stay in the pool. A second free raises DoubleFree."""
        retire(self.live, block, "block")
        self.in_use -= block.size
        self.requested -= block.nbytes
        key = block.tag or "untagged"
        self.by_tag[key] -= block.size
        if not self.by_tag[key]:
            del self.by_tag[key]
        if block.slab is not None:
            slab = block.slab
            slab.free(block.offset, block.size)
            if slab.empty:
                self.slabs[slab.kind].remove(slab)
                self.pages.table.give(slab.slot, 1)
        else:
            self.pages.table.give(block.slot, block.npages)
        self._apply_high_water()

    def set_high_water(self, nbytes: int | None) -> None:
        """Keep at most ``nbytes`` of free pages pooled (None: keep them all)."""
        self.high_water_bytes = nbytes
        self._apply_high_water()

    def _apply_high_water(self) -> None:
        if self.high_water_bytes is not None and self.pages.pool_bytes() > self.high_water_bytes:
            self.pages.trim(self.high_water_bytes)

    def trim(self, keep_bytes: int = 0) -> int:
        """Give pooled pages back to the driver until at most ``keep_bytes`` stay; returns bytes released."""
        return self.pages.trim(keep_bytes)

    def close(self) -> list[Block]:
        """Release everything (live blocks included, returned); unmap, release, free the range."""
        leaked = list(self.live.values())
        for b in leaked:
            b.state = "released_at_shutdown"
        self.live.clear()
        self.slabs = {k: [] for k in KINDS}
        self.closed = True
        self.in_use = self.requested = 0
        self.by_tag.clear()
        self.pages.close()
        return leaked

    # -- figures ------------------------------------------------------------------------
    def stats(self) -> dict:
        pages, t = self.pages, self.pages.table
        return {
            "page_bytes": self.page,
            "reserved_bytes": pages.reserve_bytes,
            "mapped_bytes": t.mapped_count * self.page,
            "in_use_bytes": self.in_use,
            "requested_bytes": self.requested,
            "peak_bytes": self.peak,
            "pool_bytes": pages.pool_bytes(),
            "pool_pages": pages.pool_bytes() // self.page,
            "spare_pages": pages.spare_count(),
            "slab_pages": sum(len(v) for v in self.slabs.values()),
            "live_allocations": len(self.live),
            "by_tag": dict(self.by_tag),
            "compressed_bytes": sum(b.size for b in self.live.values() if b.compressed),
            "compression_supported": pages.compression_ok,
            "high_water_bytes": self.high_water_bytes,
            "largest_free_run_bytes": t.largest_free() * self.page,
            **{f"pages_{k}" if k in ("created", "released", "reused") else k: v
               for k, v in pages.counters.items()},
            **self.counters,
        }

    def reset_peak(self) -> None:
        self.peak = self.in_use

    def verify(self) -> list[str]:
        """Invariant violations across the table, slabs, blocks and counters (tests)."""
        t = self.pages.table
        problems = t.verify()
        slab_slots = {s.slot for k in KINDS for s in self.slabs[k]}
        run_slots = set()
        for b in self.live.values():
            if b.slab is None:
                run_slots.update(range(b.slot, b.slot + b.npages))
                if any(t.kind[s] != b.kind for s in range(b.slot, b.slot + b.npages)):
                    problems.append(f"block {b.id} runs over pages of another kind")
        used = {s for s in range(t.n_slots) if t.used[s]}
        if used != slab_slots | run_slots or slab_slots & run_slots:
            problems.append("used slots disagree with the live runs and slabs")
        for k in KINDS:
            for s in self.slabs[k]:
                problems += s.verify()
                if t.kind[s.slot] != k:
                    problems.append(f"slab {s.slot} of kind {k} sits on a {t.kind[s.slot]} page")
        if self.in_use != sum(b.size for b in self.live.values()):
            problems.append("in_use disagrees with the live blocks")
        if sum(self.by_tag.values()) != self.in_use:
            problems.append("per-tag bytes disagree with in_use")
        return problems


def retire(live: dict, block, what: str) -> None:
    """Take ``block`` out of the ``live`` registry (by id) and mark it freed; DoubleFree if it is not there."""
    if block.state != "live" or live.get(block.id) is not block:
        why = (f"was already {block.state.replace('_', ' ')}" if block.state != "live"
               else "does not belong to this arena")
        raise DoubleFree(f"{what} {block.id} ({block.nbytes} bytes, tag {block.tag!r}) {why}")
    del live[block.id]
    block.state = "freed"

