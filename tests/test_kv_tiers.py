"""The KV host tier's plain logic on the CPU: entry encoding, the budget split and its refusals,
the tiered pool's accounting, and the fault ring (layout, drain, back-pressure) under random
interleavings of many producers and the drain."""

from __future__ import annotations

import numpy as np
import pytest

from nexusrt.errors import OutOfMemory
from nexusrt.kvcache import fault_ring as fr
from nexusrt.kvcache.blocks import BLOCK_SIZE, gather_tokens, pool_shape
from nexusrt.kvcache.tiers import (KvBudgetError, TieredBlockPool, block_bytes, block_copies, encode_host, host_index,
                                   is_host, mem_available, place_oldest_on_host, plan_tiers)

SHAPE = dict(num_layers=4, num_kv_heads=2, head_dim=64)  # 32 KiB per logical block


def test_host_entries_are_negative_and_round_trip():
    assert [encode_host(h) for h in (0, 1, 7)] == [-1, -2, -8]
    assert all(host_index(encode_host(h)) == h for h in range(1000))
    assert not is_host(0) and is_host(-1)
    with pytest.raises(ValueError):
        host_index(3)
    assert np.int32(encode_host(2 ** 31 - 1)) == -(2 ** 31)  # the largest host id still fits int32


def test_plan_splits_the_budget_and_refuses_bad_ones_before_any_work():
    unit = block_bytes(**SHAPE)
    assert unit == 4 * 2 * 2 * BLOCK_SIZE * 64 * 2
    assert plan_tiers(100, None, **SHAPE) == plan_tiers(100, 100 * unit, **SHAPE)
    plan = plan_tiers(100, 60 * unit + unit - 1, **SHAPE, available=1 << 40)
    assert (plan.device_blocks, plan.host_blocks) == (60, 40) and plan.host_bytes == 40 * unit
    with pytest.raises(KvBudgetError, match="below one layer's KV pages"):
        plan_tiers(100, 100 * unit // 4 - 1, **SHAPE)  # one layer = a quarter of the 4 layers
    assert plan_tiers(100, 100 * unit // 4, **SHAPE, available=1 << 40).device_blocks == 25
    with pytest.raises(KvBudgetError, match="pinned memory"):
        plan_tiers(100, 50 * unit, **SHAPE, available=50 * unit - 1)
    with pytest.raises(KvBudgetError, match="byte count"):
        plan_tiers(100, "1G", **SHAPE)


def test_mem_available_reads_meminfo(tmp_path):
    p = tmp_path / "meminfo"
    p.write_text("MemTotal: 100 kB\nMemAvailable:   2048 kB\n")
    assert mem_available(str(p)) == 2048 * 1024
    assert mem_available() > 0


def test_oldest_blocks_go_to_the_host():
    t = place_oldest_on_host(6, 4)
    assert t.dtype == np.int32 and t.tolist() == [-1, -2, -3, -4, 0, 1]
    assert place_oldest_on_host(3, 0).tolist() == [0, 1, 2]
    # A gather through a tiered table reads the right pool: the kernels' meaning in NumPy.
    rng = np.random.default_rng(0)
    dev, host = (rng.standard_normal(pool_shape(n, 2, 8)).astype(np.float32) for n in (2, 4))
    whole = np.concatenate([host, dev])  # logical order: host blocks 0..3, then device 0..1
    remap = np.where(t < 0, ~t, t + 4)
    assert np.array_equal(gather_tokens(whole, remap, 90), gather_tokens(whole, np.arange(6), 90))


def test_tiered_pool_fills_the_device_first_and_audits_both_tiers():
    pool = TieredBlockPool(3, 4)
    a = pool.alloc(2)
    assert all(e >= 0 for e in a)
    b = pool.alloc(4)
    assert sum(e >= 0 for e in b) == 1 and sum(e < 0 for e in b) == 3
    assert pool.audit() == {"device_blocks": 3, "host_blocks": 4, "device_used": 3, "host_used": 3}
    with pytest.raises(OutOfMemory):
        pool.alloc(2)  # one left: all-or-nothing
    assert pool.num_free == 1
    with pytest.raises(ValueError):
        pool.free([b[-1], b[-1]])
    with pytest.raises(ValueError):
        pool.free([a[0], encode_host(3)])  # host block 3 is free: nothing changes
    assert pool.counts()["device_used"] == 3
    pool.free(a + b)
    assert pool.audit()["device_used"] == 0 and pool.audit()["host_used"] == 0
    with pytest.raises(OutOfMemory):
        TieredBlockPool(2, 0).alloc(3)


def test_ring_layout_keeps_counters_on_their_own_lines():
    lay = fr.RingLayout(8, 5)
    w = lay.initial()
    assert (fr.HEAD, fr.TAIL, fr.OVERFLOW, fr.BELL, fr.ENTRIES) == (0, 32, 64, 96, 128) and lay.words == 128 + 8 + 5
    assert (w[fr.ENTRIES:fr.ENTRIES + 8] == fr.EMPTY).all() and (w[lay.requested:] == 0).all()
    assert w[fr.BELL] == 0  # the watch's first wait parks until a post rings
    with pytest.raises(ValueError):
        fr.RingLayout(6, 5)


def _run(model, posts, rng, drain_every):
    """Interleave producers (one generator per post) and the drain at random; returns outcomes."""
    live = [(h, model.producer(h)) for h in posts]
    done, serviced = [], []
    while live:
        if rng.random() < drain_every:
            serviced += model.drain(int(rng.integers(1, 4)))
            continue
        i = int(rng.integers(len(live)))
        h, gen = live[i]
        try:
            next(gen)
        except StopIteration as stop:
            done.append((h, stop.value))
            live.pop(i)
    serviced += model.drain()
    return done, serviced


@pytest.mark.parametrize("seed", range(40))
def test_ring_never_loses_or_repeats_an_id_under_random_interleavings(seed):
    rng = np.random.default_rng(seed)
    cap, hosts = int(rng.choice([1, 2, 4, 8])), int(rng.integers(1, 12))
    model = fr.RingModel(fr.RingLayout(cap, hosts))
    posts = rng.integers(0, hosts, size=int(rng.integers(1, 60))).tolist()
    done, serviced = _run(model, posts, rng, drain_every=float(rng.uniform(0.02, 0.5)))
    posted = sorted(h for h, how in done if how == "posted")
    assert sorted(serviced) == posted  # every posted id serviced exactly once, none invented
    overflow = sum(how == "overflow" for _, how in done)
    assert int(model.words[fr.OVERFLOW]) == overflow
    assert (model.words[model.layout.requested:] == 0).all()  # no block left marked in flight
    w = model.words
    assert w[fr.HEAD] == w[fr.TAIL] == len(posted)
    assert (w[fr.ENTRIES:fr.ENTRIES + cap] == fr.EMPTY).all()


def test_full_ring_refuses_with_back_pressure_and_recovers():
    model = fr.RingModel(fr.RingLayout(2, 8))
    outcomes = [list(_drive(model.producer(h))) for h in (0, 1, 2, 0)]
    assert [o[-1] for o in outcomes] == ["posted", "posted", "overflow", "in_flight"]
    assert int(model.words[fr.OVERFLOW]) == 1
    assert model.drain() == [0, 1]
    assert list(_drive(model.producer(2)))[-1] == "posted"  # the refused block posts again


def _drive(gen):
    try:
        while True:
            yield next(gen)
    except StopIteration as stop:
        yield stop.value


def test_drain_stops_at_a_claimed_but_unwritten_slot():
    model = fr.RingModel(fr.RingLayout(4, 4))
    slow, fast = model.producer(1), model.producer(2)
    for _ in range(4):
        next(slow)  # claimed slot 0, id not stored yet
    assert list(_drive(fast))[-1] == "posted"  # slot 1 written
    assert model.drain() == []  # slot 0 blocks the drain: order kept, nothing skipped
    assert list(_drive(slow))[-1] == "posted"
    assert model.drain() == [1, 2]


def test_copy_plan_moves_to_free_device_blocks_and_rewrites_the_table_and_its_index():
    pool = TieredBlockPool(4, 4)
    pool.alloc(3)  # another table's device blocks
    held = pool.alloc(3)  # one device, two host blocks
    table = np.array(held, dtype=np.int32)
    host_ids = [host_index(e) for e in held if e < 0]
    where = fr.locate_hosts(table, 4)
    assert where.tolist() == [1, 2, -1, -1]
    moves, left = fr.plan_copies(host_ids + [3], pool, where)
    assert moves == [] and left == host_ids + [3]  # the device tier is full (4 of 4 held)
    pool.free([0])
    moves, left = fr.plan_copies(host_ids + [3], pool, where)
    assert moves == [fr.Move(host_ids[0], 0)] and left == host_ids[1:] + [3]  # 3: no table names it
    assert fr.apply_moves(table, where, moves) == [(1, 0)]
    assert table.tolist() == [held[0], 0, held[2]] and encode_host(moves[0].host) not in table
    assert np.array_equal(where, fr.locate_hosts(table, 4))  # the index follows the table
    with pytest.raises(ValueError, match="no table entry names"):
        fr.apply_moves(table, where, moves)
    with pytest.raises(ValueError, match="at most once"):
        fr.locate_hosts(np.array([-1, -1], dtype=np.int32), 4)

def test_block_copies_move_a_device_only_sequence_into_the_tiers_as_few_runs():
    # The kv bench fills a host-tier runner by copying a device-only runner's blocks.
    dst = place_oldest_on_host(10, 4)  # logical 0..3 on host 0..3, 4..9 on device 0..5
    assert block_copies(np.arange(10), dst, 10) == [(0, True, 0, 4), (4, False, 0, 6)]
    assert block_copies(np.arange(10), dst, 3) == [(0, True, 0, 3)]  # only the filled blocks
    assert block_copies(np.arange(10), dst, 0) == []
    # A scattered source (a batch pool's order) breaks runs where either side jumps.
    src = np.array([5, 6, 2, 3, 4, 9])
    assert block_copies(src, place_oldest_on_host(6, 2), 6) == [(5, True, 0, 2), (2, False, 0, 3), (9, False, 3, 1)]
    # Copying it back block by block reproduces the source's bytes at the destination's places.
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((10, 3))
    host, dev = np.zeros((4, 3)), np.zeros((6, 3))
    for s, on_host, d, n in block_copies(np.arange(10), dst, 10):
        (host if on_host else dev)[d:d + n] = pool[s:s + n]
    assert np.array_equal(np.concatenate([host, dev]), pool)


def test_block_copies_refuse_what_cannot_be_copied():
    with pytest.raises(ValueError, match="no host-tier entry"):
        block_copies(place_oldest_on_host(4, 1), place_oldest_on_host(4, 2), 4)
    with pytest.raises(ValueError, match=r"num_blocks must be in 0\.\.4"):
        block_copies(np.arange(4), place_oldest_on_host(4, 2), 5)
    with pytest.raises(ValueError, match="names one block twice"):
        block_copies(np.arange(3), np.array([0, 1, 1]), 3)
