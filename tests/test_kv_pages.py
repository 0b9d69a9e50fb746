"""The paged KV cache's page tables (nexusrt.engine.kv_pages): plain logic on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from nexusrt.engine.kv_pages import (PAGE_SIZE, PagePool, SequencePages, gather_tokens, pages_for,
                                     pool_shape, scatter_tokens)
from nexusrt.errors import OutOfMemory


def test_pages_for_rounds_up_to_whole_pages():
    assert [pages_for(n) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        pages_for(-1)


def test_pool_hands_out_pages_in_its_order_and_takes_them_back():
    pool = PagePool(5, order=[3, 0, 4, 1, 2])
    assert pool.alloc(2) == [3, 0] and pool.num_free == 3
    pool.free([0])
    assert pool.alloc(3) == [0, 4, 1]  # a freed page is reused first
    assert pool.alloc(1) == [2]
    with pytest.raises(OutOfMemory):
        pool.alloc(1)
    with pytest.raises(ValueError, match="not allocated"):
        PagePool(3).free([1])


def test_pool_rejects_an_order_that_is_not_a_permutation():
    with pytest.raises(ValueError, match="permutation"):
        PagePool(3, order=[0, 1, 1])


def test_out_of_pages_takes_nothing():
    pool = PagePool(3)
    seq = SequencePages(pool, max_pages=8)
    with pytest.raises(OutOfMemory):
        seq.ensure(4 * PAGE_SIZE)
    assert pool.num_free == 3 and seq.pages == []


def test_sequence_grows_page_by_page_and_locates_tokens():
    rng = np.random.default_rng(3)
    pool = PagePool(10, order=rng.permutation(10))
    seq = SequencePages(pool, max_pages=6)
    assert seq.ensure(1) and len(seq.pages) == 1
    assert not seq.ensure(PAGE_SIZE)  # still one page
    assert seq.ensure(PAGE_SIZE + 1) and len(seq.pages) == 2
    assert seq.locate(PAGE_SIZE + 3) == (seq.pages[1], 3)
    with pytest.raises(IndexError):
        seq.locate(2 * PAGE_SIZE)
    with pytest.raises(ValueError, match="table holds 6"):
        seq.ensure(6 * PAGE_SIZE + 1)
    table = seq.table(fill=-1)
    assert table.dtype == np.int32 and table.shape == (6,)
    assert list(table[:2]) == seq.pages and (table[2:] == -1).all()
    seq.release()
    assert pool.num_free == 10 and seq.capacity == 0


@pytest.mark.parametrize("length", [1, 15, 16, 17, 100])
def test_scatter_then_gather_round_trips_through_shuffled_pages(length):
    rng = np.random.default_rng(length)
    hkv, d = 3, 8
    num_pages = pages_for(length) + 2
    seq = SequencePages(PagePool(num_pages, order=rng.permutation(num_pages)), num_pages)
    seq.ensure(length)
    table = seq.table()
    pool = np.full(pool_shape(num_pages, hkv, d), np.nan, dtype=np.float32)
    values = rng.standard_normal((length, hkv, d), dtype=np.float32)
    split = length // 2  # two appends, as a prefill chunk then decode steps would do
    scatter_tokens(pool, table, 0, values[:split])
    scatter_tokens(pool, table, split, values[split:])
    np.testing.assert_array_equal(gather_tokens(pool, table, length), values)
    # Token t is exactly where locate() says it is.
    for t in (0, length - 1, length // 3):
        page, slot = seq.locate(t)
        np.testing.assert_array_equal(pool[page, :, slot, :], values[t])
    assert np.isnan(pool).sum() == (num_pages * PAGE_SIZE - length) * hkv * d
