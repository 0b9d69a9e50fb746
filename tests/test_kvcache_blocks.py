"""The paged KV cache's block tables (nexusrt.kvcache.blocks): plain logic on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from nexusrt.errors import OutOfMemory
from nexusrt.kvcache.blocks import (BLOCK_SIZE, BlockPool, SequenceBlocks, blocks_for, gather_tokens,
                                    pool_shape, scatter_tokens)


def test_blocks_for_rounds_up_to_whole_blocks():
    assert [blocks_for(n) for n in (0, 1, 15, 16, 17, 32, 33)] == [0, 1, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        blocks_for(-1)


def test_pool_hands_out_blocks_in_its_order_and_takes_them_back():
    pool = BlockPool(5, order=[3, 0, 4, 1, 2])
    assert pool.alloc(2) == [3, 0] and pool.num_free == 3
    pool.free([0])
    assert pool.alloc(3) == [0, 4, 1]  # a freed page is reused first
    assert pool.alloc(1) == [2]
    with pytest.raises(OutOfMemory):
        pool.alloc(1)
    with pytest.raises(ValueError, match="not allocated"):
        BlockPool(3).free([1])


def test_pool_rejects_an_order_that_is_not_a_permutation():
    with pytest.raises(ValueError, match="permutation"):
        BlockPool(3, order=[0, 1, 1])


def test_out_of_blocks_takes_nothing():
    pool = BlockPool(3)
    seq = SequenceBlocks(pool, max_blocks=8)
    with pytest.raises(OutOfMemory):
        seq.ensure(4 * BLOCK_SIZE)
    assert pool.num_free == 3 and seq.blocks == []


def test_sequence_grows_block_by_block_and_locates_tokens():
    rng = np.random.default_rng(3)
    pool = BlockPool(10, order=rng.permutation(10))
    seq = SequenceBlocks(pool, max_blocks=6)
    assert seq.ensure(1) and len(seq.blocks) == 1
    assert not seq.ensure(BLOCK_SIZE)  # still one page
    assert seq.ensure(BLOCK_SIZE + 1) and len(seq.blocks) == 2
    assert seq.locate(BLOCK_SIZE + 3) == (seq.blocks[1], 3)
    with pytest.raises(IndexError):
        seq.locate(2 * BLOCK_SIZE)
    with pytest.raises(ValueError, match="table holds 6"):
        seq.ensure(6 * BLOCK_SIZE + 1)
    table = seq.table(fill=-1)
    assert table.dtype == np.int32 and table.shape == (6,)
    assert list(table[:2]) == seq.blocks and (table[2:] == -1).all()
    seq.release()
    assert pool.num_free == 10 and seq.capacity == 0


@pytest.mark.parametrize("length", [1, 15, 16, 17, 100])
def test_scatter_then_gather_round_trips_through_shuffled_blocks(length):
    rng = np.random.default_rng(length)
    hkv, d = 3, 8
    num_blocks = blocks_for(length) + 2
    seq = SequenceBlocks(BlockPool(num_blocks, order=rng.permutation(num_blocks)), num_blocks)
    seq.ensure(length)
    table = seq.table()
    pool = np.full(pool_shape(num_blocks, hkv, d), np.nan, dtype=np.float32)
    values = rng.standard_normal((length, hkv, d), dtype=np.float32)
    split = length // 2  # two appends, as a prefill chunk then decode steps would do
    scatter_tokens(pool, table, 0, values[:split])
    scatter_tokens(pool, table, split, values[split:])
    np.testing.assert_array_equal(gather_tokens(pool, table, length), values)
    # Token t is exactly where locate() says it is.
    for t in (0, length - 1, length // 3):
        page, slot = seq.locate(t)
        np.testing.assert_array_equal(pool[page, :, slot, :], values[t])
    assert np.isnan(pool).sum() == (num_blocks * BLOCK_SIZE - length) * hkv * d
