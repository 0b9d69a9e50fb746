"""Physical pages under the reserved range: runs, the free-page pool, kinds. No driver here.

:class:`PagePool` drives a *page provider* (the CUDA VMM one, the host one, or a fake in
tests) through a handful of calls — ``reserve``, ``free_range``, ``create(kind) ->
(handle, actual_kind)``, ``release``, ``map``, ``set_access``, ``unmap``, ``free_bytes`` —
and keeps every decision here, where the CPU tests reach it:

* a run of ``n`` pages goes to the first free window needing the fewest (re)maps;
* freed pages stay mapped (the next run over them costs no driver call); pages unmapped
  to make room for a run of the other kind wait as *spare* handles;
* compressible and plain pages never share a run;
* when the device refuses a page, the pool is flushed back to the driver and the page
  asked for once more; a run that still fails undoes every page it mapped.
"""

from __future__ import annotations

from .pagetable import PageTable
from .slab import round_up

PLAIN, COMPRESSED = "plain", "compressed"
KINDS = (PLAIN, COMPRESSED)


class PageOOM(Exception):
    """Raised by a provider's ``create`` when the device has no physical page left."""


class KindRefused(Exception):
    """A compressible page came back plain: compression is off for the rest of the run."""


class PagePool:
    """The page slots of one reserved range and the physical pages behind them."""

    def __init__(self, provider, reserve_bytes: int):
        self.provider = provider
        self.page = int(provider.page_bytes)
        self.reserve_bytes = round_up(int(reserve_bytes), self.page)
        self.base = int(provider.reserve(self.reserve_bytes))
        self.table = PageTable(self.reserve_bytes // self.page)
        self.spare: dict[str, list] = {k: [] for k in KINDS}
        self.compression_ok = bool(getattr(provider, "supports_compression", False))
        self.counters = dict(created=0, released=0, maps=0, unmaps=0, reused=0)

    def addr(self, slot: int) -> int:
        return self.base + slot * self.page

    # -- runs ----------------------------------------------------------------------------
    def choose_window(self, npages: int, kind: str) -> tuple[int | None, int]:
        """First free window of ``npages`` with the fewest slots to (re)map, and that count."""
        best, best_cost = None, npages + 1
        t = self.table
        for start, length in t.extents():
            if length < npages:
                continue
            cost = sum(1 for s in range(start, start + npages) if t.kind[s] != kind)
            if cost == 0:
                return start, 0
            if cost < best_cost:
                best, best_cost = start, cost
        return best, best_cost

    def spare_count(self, kind: str | None = None) -> int:
        return sum(len(self.spare[k]) for k in (KINDS if kind is None else (kind,)))

    def fill_window(self, start: int, npages: int, kind: str) -> None:
        """Map a page of ``kind`` under every slot of the window and mark it used.

        Raises PageOOM or KindRefused (or a provider error) after undoing what it mapped.
        """
        t, p = self.table, self.provider
        window = range(start, start + npages)
        fresh: list[tuple[int, bool]] = []  # (slot, handle created by this call)
        try:
            for s in window:
                if t.kind[s] == kind:
                    self.counters["reused"] += 1
                    continue
                if t.handle[s] is not None:  # a pooled page of the other kind
                    self.unmap(s, s + 1)
                    self.spare[t.kind[s]].append(t.clear_mapped(s))
                handle, created = self._page(kind, window)
                try:
                    p.map(self.addr(s), self.page, handle)
                except BaseException:
                    self._put_back(handle, created, kind)
                    raise
                self.counters["maps"] += 1
                t.set_mapped(s, handle, kind)
                fresh.append((s, created))
            for run_start, run_len in runs([s for s, _ in fresh]):
                p.set_access(self.addr(run_start), run_len * self.page)
        except BaseException:
            for s, created in reversed(fresh):
                self.unmap(s, s + 1)
                self._put_back(t.clear_mapped(s), created, kind)
            raise
        t.take(start, npages)

    def _page(self, kind: str, window: range):
        """A handle of ``kind``: a spare one, else a new one. Returns (handle, created)."""
        if self.spare[kind]:
            self.counters["reused"] += 1
            return self.spare[kind].pop(), False
        while True:
            try:
                handle, actual = self.provider.create(kind)
                break
            except PageOOM:
                # Spares and free pages outside the window are memory the driver can hand
                # out again: give them all back (one flush), then ask once more.
                if not self.release_pool(keep=window):
                    raise
        self.counters["created"] += 1
        if actual != kind:
            self.spare[actual].append(handle)
            self.compression_ok = False
            raise KindRefused()
        return handle, True

    def _put_back(self, handle, created: bool, kind: str) -> None:
        if created:
            self.release(handle)
        else:
            self.spare[kind].append(handle)

    # -- giving pages back -------------------------------------------------------------------
    def trim(self, keep_bytes: int = 0) -> int:
        """Release pooled pages (spares first, then from the top) until at most ``keep_bytes`` stay."""
        released = 0
        for kind in KINDS:
            while self.spare[kind] and self.pool_bytes() > keep_bytes:
                self.release(self.spare[kind].pop())
                released += self.page
        for s in list(self.table.unused_mapped_from_top()):
            if self.pool_bytes() <= keep_bytes:
                break
            self.unmap(s, s + 1)
            self.release(self.table.clear_mapped(s))
            released += self.page
        return released

    def release_pool(self, keep: range = range(0)) -> int:
        """Release every pooled page (spares, free mapped slots outside ``keep``); returns how many."""
        released = 0
        for kind in KINDS:
            while self.spare[kind]:
                self.release(self.spare[kind].pop())
                released += 1
        for s in list(self.table.unused_mapped_from_top()):
            if s not in keep:
                self.unmap(s, s + 1)
                self.release(self.table.clear_mapped(s))
                released += 1
        return released

    def close(self) -> None:
        """Unmap and release every page, used or not, and free the range."""
        t = self.table
        t.used[:] = bytes(t.n_slots)
        t.used_count = 0
        for run_start, run_len in runs(t.mapped_slots()):
            self.unmap(run_start, run_start + run_len)
            for s in range(run_start, run_start + run_len):
                self.release(t.clear_mapped(s))
        self.release_pool()
        self.provider.free_range(self.base, self.reserve_bytes)

    # -- provider calls, counted ------------------------------------------------------------
    def unmap(self, first: int, end: int) -> None:
        self.provider.unmap(self.addr(first), (end - first) * self.page)
        self.counters["unmaps"] += end - first

    def release(self, handle) -> None:
        self.provider.release(handle)
        self.counters["released"] += 1

    # -- figures ------------------------------------------------------------------------------
    def pool_bytes(self) -> int:
        """Physical pages held but not in use: mapped free slots plus spare handles."""
        t = self.table
        return (t.mapped_count - t.used_count + self.spare_count()) * self.page

    def available_bytes(self) -> int:
        """What a new allocation could still get: free range, bounded by pool plus device."""
        free_va = (self.table.n_slots - self.table.used_count) * self.page
        return min(free_va, self.pool_bytes() + int(self.provider.free_bytes()))


def runs(slots: list[int]):
    """Consecutive runs in ``slots`` as (start, length), ascending."""
    run_start = prev = None
    for s in sorted(slots):
        if prev is not None and s == prev + 1:
            prev = s
            continue
        if run_start is not None:
            yield run_start, prev - run_start + 1
        run_start = prev = s
    if run_start is not None:
        yield run_start, prev - run_start + 1
