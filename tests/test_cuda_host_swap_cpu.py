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


def _host_blocks(swapper, blocks) -> list[np.ndarray]:
    """The same of host blocks ``blocks``, from their slabs, in the order of ``k_pools + v_pools``."""
    s = swapper.slab_blocks
    return [np.stack([swapper.slabs[h // s].array.view(np.uint16)[2 * layer + kv, h % s] for h in blocks])
            for kv in (0, 1) for layer in range(swapper.layers)]


def _fill(pools, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for p in pools:
        p.array.view(np.uint16)[...] = rng.integers(1, 60000, p.array.shape, dtype=np.uint16)


def test_swapped_blocks_go_to_the_host_and_come_back_into_fresh_blocks(dev):
    r = dev.runner(host_blocks=5)
    pools = r.pre.k_pools + r.pre.v_pools
    _fill(pools, 3)
    layers = len(r.pre.k_pools)
    before = _blocks(pools, [3, 4, 9])
    assert r.swapper.nbytes == 0  # nothing pinned before the first swap-out
    r.swap_blocks([(3, 0), (4, 1), (9, 2)], [])
    assert r.swapper.slab_blocks == 5 and r.swapper.nbytes == 5 * 2 * layers * r.swapper.block_bytes
    assert all((got == want).all() for got, want in zip(_host_blocks(r.swapper, [0, 1, 2]), before))
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


def test_slabs_are_pinned_when_first_written_and_runs_are_cut_at_their_edges(dev):
    from nexusrt.backends.cuda.host_swap import HostSwapPools

    r = dev.runner()
    pools = r.pre.k_pools + r.pre.v_pools
    layers = len(r.pre.k_pools)
    one = 2 * layers * r.pre.k_pools[0].array[0].nbytes  # a block's K and V in every layer
    sw = HostSwapPools(r.config, r.pre.k_pools, r.pre.v_pools, num_blocks=r.num_blocks, host_blocks=7,
                       memcpy=r._memcpy, slab_bytes=2 * one)
    try:
        assert (sw.slab_blocks, len(sw.slabs), sw.nbytes) == (2, 4, 0)
        _fill(pools, 5)
        before = _blocks(pools, [10, 11, 12])
        dev.log.clear()
        sw.copy([(10, 1), (11, 2), (12, 3)], [])  # host 1 | 2, 3: slabs 0 and 1, two runs
        assert [s is not None for s in sw.slabs] == [True, True, False, False] and sw.nbytes == 2 * 2 * one
        assert len(dev.log) == 2 * 2 * layers
        assert all((got == want).all() for got, want in zip(_host_blocks(sw, [1, 2, 3]), before))
        assert sw.slabs[0].array.shape == (2 * layers, 2, *r.pre.k_pools[0].array.shape[1:])
        with pytest.raises(ValueError, match="no swap-out wrote"):
            sw.copy([], [(6, 0)])  # slab 3 was never pinned
        sw.copy([], [(1, 40), (2, 41), (3, 42)])
        assert all((got == want).all() for got, want in zip(_blocks(pools, [40, 41, 42]), before))
        slabs = [s for s in sw.slabs if s is not None]
    finally:
        sw.free()
    assert not any(s.is_live for s in slabs) and sw.nbytes == 0


def test_the_runner_frees_its_slabs_on_close(dev):
    r = dev.runner(host_blocks=3)
    r.swap_blocks([(2, 0)], [])
    (slab,) = [s for s in r.swapper.slabs if s is not None]
    assert slab.is_live and slab.dtype == r.pre.k_pools[0].dtype
    r.close()
    assert r.swapper is None and not slab.is_live


def test_with_batched_copies_each_direction_is_one_driver_call(dev):
    dev.batch_copies = True  # the driver has cuMemcpyBatchAsync (CUDA 12.8+)
    r = dev.runner(host_blocks=5)
    pools = r.pre.k_pools + r.pre.v_pools
    _fill(pools, 11)
    layers = len(r.pre.k_pools)
    before = _blocks(pools, [3, 4, 9])
    r.swap_blocks([(3, 0), (4, 1), (9, 2)], [])
    (batch,) = [e for e in dev.log if e[0] == "batch"]
    assert not [e for e in dev.log if e[0] in ("d2h", "h2d")]
    assert len(batch[1]) == 2 * 2 * layers  # runs (3, 4 -> 0, 1) and (9 -> 2), per layer and K/V
    assert all((got == want).all() for got, want in zip(_host_blocks(r.swapper, [0, 1, 2]), before))
    for p in pools:
        p.array.view(np.uint16)[[3, 4, 9]] = 0
    dev.log.clear()
    # Block 20 leaves for the host while the three come back: outs, then ins, two calls in that order.
    r.swap_blocks([(20, 3)], [(0, 20), (1, 21), (2, 5)])
    batches = [e for e in dev.log if e[0] == "batch"]
    assert len(batches) == 2 and len(batches[0][1]) == 2 * layers and len(batches[1][1]) == 2 * 2 * layers
    slab = r.swapper.slabs[0]
    assert all(slab.ptr <= dst < slab.ptr + slab.nbytes for dst, _, _ in batches[0][1])  # the outs write the host
    assert all((got == want).all() for got, want in zip(_blocks(pools, [20, 21, 5]), before))


@pytest.mark.parametrize("batched", [False, True], ids=["per-copy", "batched"])
def test_a_destination_named_twice_is_refused_before_any_copy(dev, batched):
    dev.batch_copies = batched
    r = dev.runner(host_blocks=4)
    with pytest.raises(ValueError, match="block 1 is the destination of two swap-out pairs"):
        r.swap_blocks([(3, 1), (5, 0), (4, 1)], [])
    r.swap_blocks([(3, 0), (4, 1)], [])
    dev.log.clear()
    with pytest.raises(ValueError, match="block 30 is the destination of two swap-in pairs"):
        r.swap_blocks([], [(0, 30), (1, 30)])
    assert not dev.log


def test_queue_copy_batch_builds_one_driver_call_of_the_bindings_types(monkeypatch):
    import importlib

    driver = pytest.importorskip("cuda.bindings.driver")
    copy_mod = importlib.import_module("nexusrt.memory.copy")  # (nexusrt.memory.copy is also a function)

    calls = []
    monkeypatch.setattr(copy_mod, "call", lambda name, *args: calls.append((name, args)))
    copy_mod.queue_copy_batch([], 5)
    assert not calls  # nothing to copy: no call
    copy_mod.queue_copy_batch([(0x1000, 0x2000, 64), (0x3000, 0x4000, 128)], 5)
    (name, (dsts, srcs, sizes, count, attrs, idxs, nattrs, stream)), = calls
    assert name == "cuMemcpyBatchAsync" and (count, idxs, nattrs, stream) == (2, [0], 1, 5)
    assert all(isinstance(p, driver.CUdeviceptr) for p in dsts + srcs)
    assert [int(p) for p in dsts] == [0x1000, 0x3000] and [int(p) for p in srcs] == [0x2000, 0x4000]
    assert sizes == [64, 128]
    assert attrs[0].srcAccessOrder == driver.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
