"""The arena's bookkeeping on a fake page provider: runs, pool, slabs, kinds, OOM, accounting."""

from __future__ import annotations

import random

import pytest

from nexusrt.errors import OutOfMemory
from nexusrt.memory.core import ArenaCore, DoubleFree
from nexusrt.memory.pages import PLAIN, PageOOM
from nexusrt.memory.pagetable import PageTable
from nexusrt.memory.slab import ALIGN, Slab

PAGE = 2 << 20


class FakeProvider:
    """Counts every page call and checks they make sense; ``limit_pages`` plays device memory."""

    def __init__(self, limit_pages=None, compression=False, compression_real=True):
        self.page_bytes = PAGE
        self.limit_pages = limit_pages
        self.supports_compression = compression
        self.compression_real = compression_real
        self.handles = {}  # live handle -> kind
        self.mapped = {}  # addr -> handle
        self.accessible = set()
        self.calls = {"create": 0, "release": 0, "map": 0, "unmap": 0, "set_access": 0}
        self.fail_map_at = None  # raise on the n-th map call from now
        self.fail_access = False
        self.lie_about_free = False
        self.ranges = {}
        self._next = 0

    def reserve(self, nbytes):
        base = 0x7F00_0000_0000 + len(self.ranges) * (1 << 40)
        self.ranges[base] = nbytes
        return base

    def free_range(self, base, nbytes):
        assert self.ranges.pop(base) == nbytes
        assert not any(base <= a < base + nbytes for a in self.mapped), "range freed while mapped"

    def create(self, kind):
        if self.limit_pages is not None and len(self.handles) >= self.limit_pages:
            raise PageOOM()
        self.calls["create"] += 1
        self._next += 1
        actual = kind if (kind == PLAIN or self.compression_real) else PLAIN
        self.handles[self._next] = actual
        return self._next, actual

    def release(self, handle):
        assert handle in self.handles, f"release of unknown handle {handle}"
        assert handle not in self.mapped.values(), "release of a mapped handle"
        del self.handles[handle]
        self.calls["release"] += 1

    def map(self, addr, size, handle):
        assert size == PAGE and addr not in self.mapped and handle in self.handles
        assert handle not in self.mapped.values(), "handle mapped twice"
        if self.fail_map_at is not None:
            self.fail_map_at -= 1
            if self.fail_map_at == 0:
                raise RuntimeError("injected map failure")
        self.mapped[addr] = handle
        self.calls["map"] += 1

    def set_access(self, addr, size):
        if self.fail_access:
            raise RuntimeError("injected access failure")
        for a in range(addr, addr + size, PAGE):
            assert a in self.mapped
            self.accessible.add(a)
        self.calls["set_access"] += 1

    def unmap(self, addr, size):
        for a in range(addr, addr + size, PAGE):
            del self.mapped[a]
            self.accessible.discard(a)
        self.calls["unmap"] += size // PAGE

    def free_bytes(self):
        if self.lie_about_free or self.limit_pages is None:
            return 1 << 50
        return (self.limit_pages - len(self.handles)) * PAGE

    def fill(self, addr, nbytes, byte):
        pass


def arena(pages=64, **kw):
    high_water = kw.pop("high_water", None)
    p = FakeProvider(**kw)
    return ArenaCore(p, pages * PAGE, high_water), p


def assert_clean(core):
    assert core.verify() == []


def test_small_tensors_share_a_page_aligned_to_256():
    core, p = arena()
    blocks = [core.alloc(n) for n in (1, 100, 256, 257, 4000, 70_000)]
    assert {b.slot for b in blocks} == {0}
    assert all(b.addr % ALIGN == 0 for b in blocks)
    spans = sorted((b.addr, b.addr + b.size) for b in blocks)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert p.calls["create"] == 1 and blocks[3].size == 512
    assert_clean(core)


def test_large_tensor_gets_a_contiguous_run_with_access_set_once():
    core, p = arena()
    b = core.alloc(5 * PAGE + 1)
    assert b.npages == 6 and b.size == 6 * PAGE and b.addr % PAGE == 0
    assert all(core.pages.base + (b.slot + i) * PAGE in p.accessible for i in range(6))
    assert p.calls["set_access"] == 1  # one call over the new run, not one per page
    assert_clean(core)


def test_freed_pages_stay_mapped_and_are_reused_without_driver_calls():
    core, p = arena()
    a = core.alloc(3 * PAGE)
    addr = a.addr
    core.free(a)
    assert core.stats()["mapped_bytes"] == 3 * PAGE and core.pages.pool_bytes() == 3 * PAGE
    before = dict(p.calls)
    b = core.alloc(3 * PAGE)
    assert b.addr == addr and p.calls == before
    assert core.stats()["pages_reused"] == 3
    assert_clean(core)


def test_compressed_and_plain_pages_never_share_a_run_or_a_slab():
    core, p = arena(compression=True)
    c = core.alloc(2 * PAGE, compressed=True)
    s = core.alloc(1000, compressed=True)
    n = core.alloc(1000)
    assert c.compressed and s.compressed and not n.compressed
    assert s.slot != n.slot
    core.free(c)
    plain = core.alloc(2 * PAGE)  # lands on the window of the compressed pages: remapped
    assert not plain.compressed and plain.slot == c.slot
    assert {p.handles[h] for h in (core.pages.table.handle[plain.slot], core.pages.table.handle[plain.slot + 1])} == {PLAIN}
    assert core.stats()["spare_pages"] == 2  # the compressed pages wait as spare handles
    again = core.alloc(2 * PAGE, compressed=True)
    assert again.compressed and core.stats()["spare_pages"] == 0 and p.calls["create"] == 6
    assert_clean(core)


def test_ilc_without_device_support_is_plain_and_counted():
    core, _ = arena(compression=False)
    b = core.alloc(3 * PAGE, compressed=True)
    st = core.stats()
    assert not b.compressed
    assert (st["ilc_requested"], st["ilc_uncompressed"], st["ilc_uncompressed_bytes"]) == (1, 1, 3 * PAGE)
    assert st["compressed_bytes"] == 0


def test_driver_handing_back_plain_pages_turns_compression_off_honestly():
    core, p = arena(compression=True, compression_real=False)
    b = core.alloc(2 * PAGE, compressed=True)
    assert not b.compressed and not core.pages.compression_ok
    assert core.stats()["ilc_uncompressed"] == 1
    assert all(k == PLAIN for k in p.handles.values())
    assert_clean(core)
    core.close()
    assert p.handles == {} and p.mapped == {}


def test_high_water_returns_pages_to_the_driver():
    core, p = arena(high_water=2 * PAGE)
    a = core.alloc(6 * PAGE)
    core.free(a)
    assert core.pages.pool_bytes() == 2 * PAGE and len(p.handles) == 2
    assert core.stats()["pages_released"] == 4
    core.set_high_water(0)
    assert p.handles == {} and p.mapped == {}
    assert_clean(core)


def test_trim_keeps_the_lowest_pages_and_reports_bytes():
    core, p = arena()
    keep = core.alloc(PAGE)
    gone = core.alloc(4 * PAGE)
    core.free(gone)
    assert core.trim(PAGE) == 3 * PAGE
    assert len(p.handles) == 2 and core.pages.table.handle[keep.slot] is not None
    assert_clean(core)


def test_oom_from_the_device_states_bytes_and_rolls_back():
    core, p = arena(limit_pages=4)
    a = core.alloc(3 * PAGE)
    with pytest.raises(OutOfMemory) as err:
        core.alloc(3 * PAGE)
    assert err.value.requested == 3 * PAGE and err.value.available == PAGE
    assert "requested 6291456 bytes" in str(err.value)
    assert len(p.handles) == 3 and core.stats()["oom"] == 1
    b = core.alloc(PAGE)  # a smaller request still works
    assert b.addr == a.addr + 3 * PAGE
    assert_clean(core)


def test_oom_midway_through_a_run_releases_every_page_it_created():
    core, p = arena(limit_pages=5)
    p.lie_about_free = True  # get past the early check so cuMemCreate fails midway
    core.alloc(2 * PAGE)
    handles, mapped = dict(p.handles), dict(p.mapped)
    with pytest.raises(OutOfMemory):
        core.alloc(6 * PAGE)
    assert p.handles == handles and p.mapped == mapped
    assert_clean(core)
    assert core.alloc(3 * PAGE).npages == 3


def test_oom_gives_pooled_pages_back_before_failing():
    core, p = arena(limit_pages=4, compression=True)
    a = core.alloc(2 * PAGE, compressed=True)
    core.alloc(2 * PAGE)
    core.free(a)
    c = core.alloc(2 * PAGE)  # needs the compressed pool pages turned into plain ones
    assert not c.compressed and c.slot == a.slot and len(p.handles) == 4
    assert_clean(core)


def test_virtual_range_exhaustion_and_fragmentation_raise_oom():
    core, _ = arena(pages=8)
    with pytest.raises(OutOfMemory, match="virtual range"):
        core.alloc(9 * PAGE)
    runs = [core.alloc(PAGE) for _ in range(8)]
    for b in runs[::2]:
        core.free(b)
    with pytest.raises(OutOfMemory) as err:
        core.alloc(2 * PAGE)
    assert err.value.available == PAGE  # the largest contiguous hole
    assert core.alloc(PAGE).slot == 0
    assert_clean(core)


@pytest.mark.parametrize("fault", ["map", "access"])
def test_driver_failure_while_mapping_leaves_the_arena_as_it_was(fault):
    core, p = arena()
    core.alloc(PAGE)
    before_handles, before_mapped = dict(p.handles), dict(p.mapped)
    if fault == "map":
        p.fail_map_at = 3
    else:
        p.fail_access = True
    with pytest.raises(RuntimeError, match="injected"):
        core.alloc(4 * PAGE)
    assert p.handles == before_handles and p.mapped == before_mapped
    p.fail_map_at, p.fail_access = None, False
    assert core.alloc(4 * PAGE).npages == 4
    assert_clean(core)


def test_double_free_and_foreign_blocks_raise():
    core, _ = arena()
    other, _ = arena()
    b = core.alloc(1000, tag="kv")
    core.free(b)
    with pytest.raises(DoubleFree, match="already freed"):
        core.free(b)
    with pytest.raises(DoubleFree):
        core.free(other.alloc(1000))
    assert_clean(core)


def test_per_tag_bytes_in_use_and_peak():
    core, _ = arena()
    w = core.alloc(3 * PAGE, tag="weights")
    k = core.alloc(1000, tag="kv")
    k2 = core.alloc(300, tag="kv")
    st = core.stats()
    assert st["by_tag"] == {"weights": 3 * PAGE, "kv": 1024 + 512}
    assert st["in_use_bytes"] == 3 * PAGE + 1536 and st["requested_bytes"] == 3 * PAGE + 1300
    core.free(w)
    core.free(k)
    st = core.stats()
    assert st["by_tag"] == {"kv": 512} and st["peak_bytes"] == 3 * PAGE + 1536
    core.reset_peak()
    assert core.stats()["peak_bytes"] == 512
    core.free(k2)
    assert core.stats()["by_tag"] == {}


def test_empty_slab_returns_its_page_to_the_pool():
    core, _ = arena()
    small = [core.alloc(10_000) for _ in range(5)]
    assert core.stats()["slab_pages"] == 1
    for b in small:
        core.free(b)
    st = core.stats()
    assert st["slab_pages"] == 0 and st["pool_pages"] == 1 and st["in_use_bytes"] == 0
    assert_clean(core)


def test_close_releases_live_blocks_and_every_page():
    core, p = arena(compression=True)
    live = [core.alloc(3 * PAGE, tag="w"), core.alloc(100, compressed=True)]
    gone = core.alloc(PAGE)
    core.free(gone)
    leaked = core.close()
    assert {b.id for b in leaked} == {b.id for b in live}
    assert all(b.state == "released_at_shutdown" for b in leaked)
    assert p.handles == {} and p.mapped == {} and p.ranges == {}
    with pytest.raises(DoubleFree, match="released at shutdown"):
        core.free(live[0])


def test_random_alloc_free_cycles_keep_every_invariant():
    rng = random.Random(1234)
    core, p = arena(pages=48, limit_pages=40, compression=True)
    live = []
    for step in range(600):
        if live and (rng.random() < 0.45 or len(live) > 40):
            core.free(live.pop(rng.randrange(len(live))))
        else:
            nbytes = rng.choice([rng.randint(1, 4096), rng.randint(4096, PAGE), rng.randint(PAGE, 6 * PAGE)])
            try:
                live.append(core.alloc(nbytes, compressed=rng.random() < 0.3, tag=rng.choice("abc")))
            except OutOfMemory:
                pass
        if step % 25 == 0:
            assert_clean(core)
        spans = sorted((b.addr, b.addr + b.size) for b in live)
        assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:])), f"overlap at step {step}"
        assert all(b.nbytes <= b.size for b in live)
    assert_clean(core)
    core.close()
    assert p.handles == {} and p.mapped == {}


def test_page_table_extents_merge_back_to_one():
    t = PageTable(10)
    for s in range(10):
        t.set_mapped(s, s + 100, PLAIN)
    t.take(2, 3)
    t.take(7, 2)
    assert t.extents() == [(0, 2), (5, 2), (9, 1)]
    t.give(7, 2)
    t.give(2, 3)
    assert t.extents() == [(0, 10)] and t.verify() == []
    with pytest.raises(AssertionError):
        t.give(0, 1)


def test_slab_first_fit_split_and_coalesce():
    s = Slab(0, PLAIN, 4096)
    offs = [s.alloc(1024) for _ in range(4)]
    assert offs == [0, 1024, 2048, 3072] and s.alloc(256) is None
    s.free(1024, 1024)
    s.free(2048, 1024)
    assert s.largest_hole == 2048 and s.alloc(2048) == 1024
    for off in (0, 1024, 3072):
        s.free(off, 2048 if off == 1024 else 1024)
    assert s.empty and s.largest_hole == 4096 and s.verify() == []
    with pytest.raises(AssertionError):
        s.free(0, 1024)

