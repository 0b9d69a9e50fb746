"""``CudaBatchRunner``'s host tier on the CPU, over the fake GPU of ``tests/cuda_batch_fakes.py``:
the pinned pools, the swap copies (device to host, then host to device; a run of consecutive
blocks is one copy per layer and K/V) and their refusals. The engine's side: ``test_serving_swap``."""

from __future__ import annotations

import numpy as np
import pytest

from tests.cuda_batch_fakes import dev, no_occupancy_query  # noqa: F401


def _blocks(pools, blocks) -> list[np.ndarray]:
    """Each layer's K and V bytes of ``blocks`` (uint16 views of the bf16 pools), copied."""
    return [p.array.view(np.uint16)[list(blocks)].copy() for p in pools]


def test_swapped_blocks_go_to_the_host_and_come_back_into_fresh_blocks(dev):
    r = dev.runner(host_blocks=5)
    pools = r.pre.k_pools + r.pre.v_pools
    rng = np.random.default_rng(3)
    for p in pools:
        p.array.view(np.uint16)[...] = rng.integers(1, 60000, p.array.shape, dtype=np.uint16)
    layers = len(r.pre.k_pools)
    before = _blocks(pools, [3, 4, 9])
    r.swap_blocks([(3, 0), (4, 1), (9, 2)], [])
    host = r.swapper.k_host + r.swapper.v_host
    assert all((got == want).all() for got, want in zip(_blocks(host, [0, 1, 2]), before))
    d2h = [e for e in dev.log if e[0] == "d2h"]
    assert len(d2h) == 2 * 2 * layers  # runs (3, 4 -> 0, 1) and (9 -> 2), per layer and K/V
    assert sorted({e[3] for e in d2h}) == [r.swapper.block_bytes, 2 * r.swapper.block_bytes]
    for p in pools:  # the device blocks are handed to others and overwritten
        p.array.view(np.uint16)[[3, 4, 9]] = 0
    dev.log.clear()
    r.swap_blocks([], [(0, 20), (1, 21), (2, 5)])
    assert all((got == want).all() for got, want in zip(_blocks(pools, [20, 21, 5]), before))
    assert len([e for e in dev.log if e[0] == "h2d"]) == 2 * 2 * layers and not dev.overwritten


def test_outs_are_issued_before_ins(dev):
    r = dev.runner(host_blocks=2)
    r.swap_blocks([(7, 0)], [(1, 7)])  # block 7 leaves for the host, then host block 1 fills it
    kinds = [e[0] for e in dev.log]
    assert kinds == ["d2h"] * kinds.count("d2h") + ["h2d"] * kinds.count("h2d") and "h2d" in kinds


@pytest.mark.parametrize("outs, ins", [([(60, 0)], []), ([(0, 2)], []), ([], [(-1, 0)]), ([], [(0, 60)])],
                         ids=["scratch-block", "host-past-end", "negative", "device-past-end"])
def test_a_pair_outside_its_pool_is_refused_before_any_copy(dev, outs, ins):
    r = dev.runner(host_blocks=2)
    with pytest.raises(ValueError, match="outside its pool"):
        r.swap_blocks([(1, 1)] + outs, ins)
    assert not dev.log


def test_a_runner_without_a_host_tier_refuses_to_swap_and_bad_counts_are_refused(dev):
    r = dev.runner()
    assert r.swapper is None and r.host_blocks == 0
    with pytest.raises(ValueError, match="no host tier"):
        r.swap_blocks([(1, 0)], [])
    for bad in (-1, True, 2.0):
        with pytest.raises(ValueError, match="host_blocks"):
            dev.runner(host_blocks=bad)


def test_the_host_pools_are_laid_out_as_the_device_pools_and_freed(dev):
    r = dev.runner(host_blocks=3)
    host = r.swapper.k_host + r.swapper.v_host
    assert len(host) == 2 * len(r.pre.k_pools) and all(t.is_live for t in host)
    assert sum(t.nbytes for t in host) == r.swapper.nbytes == 2 * len(host) // 2 * 3 * r.swapper.block_bytes
    assert host[0].array.shape == (3, *r.pre.k_pools[0].array.shape[1:]) and host[0].dtype == r.pre.k_pools[0].dtype
    r.close()
    assert r.swapper is None and not any(t.is_live for t in host)
