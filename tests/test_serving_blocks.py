"""The serving engine's block manager: tables, accounting, the prefix cache (hits, ref counts,
LRU eviction). Plain logic on the CPU; every test ends with the audit and the pool full."""

from __future__ import annotations

import pytest

from nexusrt.errors import OutOfMemory
from nexusrt.kvcache.blocks import BLOCK_SIZE
from nexusrt.reference.sampling import SamplingParams
from nexusrt.serving import BlockManager, Sequence


def seq(ids, max_new=8):
    return Sequence(list(ids), SamplingParams(), max_new, 4096)


def computed(bm, s, n=None):
    """Pretend the runner computed ``n`` (default: all) ids of ``s``."""
    n = len(s) if n is None else n
    bm.grow(s, n)
    s.num_computed = n
    bm.commit(s)


def full(bm):
    bm.audit()
    return bm.num_free == bm.num_blocks


def test_grow_and_free_return_every_block():
    bm = BlockManager(8, prefix_caching=False)
    a, b = seq(range(40)), seq(range(100, 120))
    bm.grow(a, 40)
    bm.grow(b, 20)
    assert len(a.block_table) == 3 and len(b.block_table) == 2 and bm.num_used == 5
    assert not set(a.block_table) & set(b.block_table)
    with pytest.raises(OutOfMemory):
        bm.grow(b, 100)  # 7 blocks for b: 5 more, only 3 free
    assert len(b.block_table) == 2 and bm.num_free == 3  # nothing taken by the failed grow
    bm.free(a)
    bm.free(b)
    assert full(bm) and a.block_table == [] and a.num_computed == 0


def test_a_shared_prefix_is_reused_with_reference_counts():
    bm = BlockManager(16)
    prompt = list(range(1, 41))  # 40 ids: 2 full blocks + 8
    a = seq(prompt)
    bm.admit(a)
    assert a.num_cached == 0  # nothing cached yet
    computed(bm, a)
    b = seq(prompt + [99])
    bm.admit(b)
    assert b.num_cached == b.num_computed == 2 * BLOCK_SIZE
    assert b.block_table == a.block_table[:2]
    assert [bm.refs[x] for x in b.block_table] == [2, 2]
    assert bm.hits == 2
    bm.free(a)
    assert [bm.refs[x] for x in b.block_table] == [1, 1]  # still in use by b
    bm.free(b)
    assert full(bm) and len(bm.lru) == 2  # keyed blocks wait in the LRU list, counted free


def test_the_last_id_is_always_computed_and_a_different_prefix_misses():
    bm = BlockManager(16)
    a = seq(range(32))  # exactly 2 full blocks
    bm.admit(a)
    computed(bm, a)
    b = seq(range(32))
    bm.admit(b)
    assert b.num_cached == BLOCK_SIZE  # the 2nd block is recomputed: its last id gives the logits
    c = seq([7] + list(range(1, 32)))  # differs in the first block: the chain misses from the start
    bm.admit(c)
    assert c.num_cached == 0
    d = seq(list(range(16)) + [5] * 16 + [1])  # same first block, different second
    bm.admit(d)
    assert d.num_cached == BLOCK_SIZE
    for s in (a, b, c, d):
        bm.free(s)
    assert full(bm)


def test_eviction_takes_the_oldest_unreferenced_block_tail_first():
    bm = BlockManager(6)
    a = seq(range(48))  # 3 full blocks
    bm.admit(a)
    computed(bm, a)
    head, mid, tail = a.block_table
    bm.free(a)
    assert list(bm.lru) == [tail, mid, head]  # tail listed first: evicted first
    b = seq(range(1000, 1064))  # 4 blocks: the 3 never used, then the oldest cached one
    bm.grow(b, 64)
    assert tail in b.block_table and mid not in b.block_table and len(bm.lru) == 2
    c = seq(range(48))
    bm.admit(c)
    assert c.num_cached == 2 * BLOCK_SIZE  # head and mid survived, tail was evicted
    bm.free(b)
    bm.free(c)
    assert full(bm)


def test_twins_computed_side_by_side_keep_one_key():
    bm = BlockManager(8)
    a, b = seq(range(20)), seq(range(20))
    for s in (a, b):
        bm.admit(s)  # both admitted before either computed: no hits
    computed(bm, a)
    computed(bm, b)
    assert len(bm.cached) == 1 and bm.key_of == {a.block_table[0]: bm.key_of[a.block_table[0]]}
    bm.free(a)
    bm.free(b)
    assert full(bm) and len(bm.lru) == 1 and bm.pool.num_free == 7
    bm.clear_cache()
    assert bm.pool.num_free == 8 and not bm.cached


def test_output_blocks_are_cached_too():
    bm = BlockManager(8)
    a = seq(range(10), max_new=30)
    bm.admit(a)
    computed(bm, a)
    a.output_ids = list(range(50, 72))  # 32 ids now
    computed(bm, a)
    assert a.num_keyed == 2
    b = seq(list(range(10)) + list(range(50, 72)) + [3])
    bm.admit(b)
    assert b.num_cached == 2 * BLOCK_SIZE
    bm.free(a)
    bm.free(b)
    assert full(bm)
