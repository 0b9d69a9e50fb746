"""Hostile input to the runtime's public calls: init from many threads at once, wrong types and
values for init, the memory API, captured graphs and the KV block pools. Each gets a clear
TypeError/ValueError (or OutOfMemory) naming the argument, and a failed call changes nothing."""

from __future__ import annotations

import importlib
import threading
import time

import numpy as np
import pytest

import nexusrt as nrt
from nexusrt.errors import NexusRTError, OutOfMemory
from nexusrt.kvcache.blocks import BlockPool, SequenceBlocks
from nexusrt.kvcache.tiers import TieredBlockPool, encode_host, plan_tiers

SHAPE = dict(num_layers=4, num_kv_heads=2, head_dim=64)
# The module, not the function nexusrt.firmware re-exports under the same name.
boot_mod = importlib.import_module("nexusrt.firmware.boot")


# -- init ------------------------------------------------------------------------------------
def test_init_from_many_threads_at_once_boots_one_runtime(monkeypatch):
    """Without a lock every thread saw "not running" and booted its own runtime; all but the
    last were never shut down, and the audit could not see their tensors."""
    nrt.firmware.shutdown()
    opened = []
    real_open = boot_mod.open_arena

    def slow_open(rt, arena_bytes=None):
        time.sleep(0.05)  # widen the window between the check and the boot
        opened.append(rt)
        return real_open(rt, arena_bytes)

    monkeypatch.setattr(boot_mod, "open_arena", slow_open)
    start = threading.Barrier(8)
    devices, errors = [], []

    def worker():
        start.wait()
        try:
            devices.append(nrt.firmware.init(backend="cpu"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert not errors and len(devices) == 8
        assert len(opened) == 1 and all(d is devices[0] for d in devices)
        assert nrt.firmware.runtime().device is devices[0]
    finally:
        nrt.firmware.shutdown()
    assert nrt.memory.audit() == []


def test_boot_refuses_a_second_runtime(cpu_rt):
    """boot() under init: called directly while one is up it would replace (and leak) it."""
    with pytest.raises(NexusRTError, match="already up"):
        boot_mod.boot(backend="cpu")
    assert nrt.firmware.runtime() is cpu_rt


@pytest.mark.parametrize("kwargs, exc, message", [
    ({"backend": 5}, TypeError, "backend must be 'cpu', 'cuda' or None, got int 5"),
    ({"backend": ""}, ValueError, "unknown backend '' \\(backend=\\)"),
    ({"device": -1}, ValueError, "device must be >= 0"),
    ({"device": "x"}, TypeError, "device must be a device ordinal \\(int\\), got str 'x'"),
    ({"device": True}, TypeError, "device .* got bool True"),
    ({"device": 1.0}, TypeError, "device .* got float"),
    ({"device": 2**70}, ValueError, f"device={2**70} does not exist: the cpu backend has 1 device"),
    ({"device": 1}, ValueError, "device=1 does not exist"),
    ({"arena_bytes": 2**70}, ValueError, "arena_bytes must be a positive int .* at most 2\\*\\*63-1"),
    ({"arena_bytes": True}, TypeError, "arena_bytes .* got bool True"),
    ({"arena_bytes": 1.5}, TypeError, "arena_bytes .* got float 1.5"),
    ({"profile": None}, TypeError, "profile must be a string"),
])
def test_init_refuses_bad_arguments_by_name(kwargs, exc, message):
    nrt.firmware.shutdown()
    with pytest.raises(exc, match=message):
        nrt.firmware.init(**{"backend": "cpu", **kwargs})
    assert not nrt.runtime.is_initialized()


def test_init_checks_types_before_comparing_with_the_running_one(cpu_rt):
    """A wrong type on a second call is a TypeError, not a "conflicts with the running" error."""
    with pytest.raises(TypeError, match="device .* got bool"):
        nrt.firmware.init(device=True)
    assert nrt.firmware.init(device=np.int64(0)) is cpu_rt.device  # NumPy integers are ints


def test_init_takes_numpy_integers_and_a_huge_arena_is_out_of_memory():
    nrt.firmware.shutdown()
    dev = nrt.firmware.init(backend="cpu", device=np.int32(0), arena_bytes=np.int64(8 << 20))
    assert dev.ordinal == 0 and type(dev.ordinal) is int
    assert nrt.firmware.runtime().boot_args["arena_bytes"] == 8 << 20
    nrt.firmware.shutdown()
    # At the 2**63-1 bound the page-rounded size no longer fits mmap's ssize_t: still OutOfMemory.
    with pytest.raises(OutOfMemory, match="host address space"):
        nrt.firmware.init(backend="cpu", arena_bytes=2**63 - 1)
    assert not nrt.runtime.is_initialized()


# -- memory ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value, exc", [(None, TypeError), ("x", TypeError), (1.5, TypeError),
                                        (True, TypeError), (-5, ValueError)])
def test_trim_refuses_what_is_not_a_byte_count(cpu_rt, value, exc):
    with pytest.raises(exc, match="keep_bytes must be a non-negative int"):
        nrt.memory.trim(value)
    assert nrt.memory.trim(np.int64(0)) == 0


def test_set_high_water_takes_numpy_ints_not_bools(cpu_rt):
    """It took True (as 1 byte) and refused np.int64(5): the other way round."""
    with pytest.raises(TypeError, match="nbytes .* got bool True"):
        nrt.memory.set_high_water(True)
    with pytest.raises(ValueError, match="nbytes must be a non-negative int"):
        nrt.memory.set_high_water(-1)
    assert nrt.memory.stats()["high_water_bytes"] is None  # the refusals changed nothing
    nrt.memory.set_high_water(np.int64(5))
    assert nrt.memory.stats()["high_water_bytes"] == 5
    nrt.memory.set_high_water(None)


@pytest.mark.parametrize("flag", ["ilc", "device", "pinned"])
def test_alloc_flags_must_be_bools(cpu_rt, flag):
    """``device="no"`` was truthy, so it meant device memory."""
    with pytest.raises(TypeError, match=f"{flag} must be True or False, got str 'no'"):
        nrt.memory.alloc((4,), "fp32", **{flag: "no"})
    assert nrt.memory.audit() == []
    nrt.memory.alloc((4,), "fp32", device=np.bool_(False)).free()


def test_copy_async_checks_its_stream_on_the_cpu_too(cpu_rt):
    a, b = nrt.memory.zeros((4,), "fp32"), nrt.memory.from_numpy(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="unknown stream 'nope': streams are compute"):
        nrt.memory.copy_async(a, b, stream="nope")
    with pytest.raises(TypeError, match="stream must be a role name or a Stream, got int"):
        nrt.memory.copy_async(a, b, stream=3)
    assert not a.array.any()  # refused before copying anything
    nrt.memory.copy_async(a, b, stream="h2d").synchronize()
    nrt.memory.copy_async(a, b, stream=nrt.firmware.stream("d2h")).synchronize()
    assert a.array.tolist() == [1, 1, 1, 1]
    a.free()
    b.free()


def test_reshape_refuses_a_non_shape_by_name(cpu_rt):
    with nrt.memory.zeros((2, 3), "fp32") as t:
        for bad in (None, 1.5, object()):
            with pytest.raises(TypeError, match="reshape: shape must be ints or a tuple of ints"):
                t.reshape(bad)
        with pytest.raises(TypeError, match=r"reshape: shape\[0\] must be an int, got 'x'"):
            t.reshape("x", -1)
        with pytest.raises(TypeError, match=r"shape\[1\] must be an int, got True"):
            t.reshape(6, True)
        assert t.reshape(np.int64(3), -1).shape == (3, 2)


def test_alloc_refuses_more_dimensions_than_numpy_holds(cpu_rt):
    """100 dims allocated, then tensor.array failed at NumPy's limit: refused at alloc now."""
    from nexusrt.memory.dtypes import MAX_NDIM

    with pytest.raises(ValueError, match=f"shape has 100 dimensions; at most {MAX_NDIM}"):
        nrt.memory.alloc((1,) * 100, "fp32")
    assert nrt.memory.audit() == []
    with nrt.memory.zeros((1,) * MAX_NDIM, "fp32") as t:  # the limit itself works end to end
        assert t.array.ndim == MAX_NDIM and t.to_numpy().sum() == 0
        with pytest.raises(ValueError, match="dimensions"):
            t.reshape((1,) * (MAX_NDIM + 1))


def test_host_allocation_too_large_is_out_of_memory(cpu_rt):
    """device=False went straight to NumPy, whose MemoryError says neither side's bytes."""
    with pytest.raises(OutOfMemory, match="pageable host memory .*requested 4611686018427387904 bytes") as err:
        nrt.memory.alloc((2**62,), "uint8", device=False)
    assert err.value.requested == 2**62 and err.value.available >= 0
    assert nrt.memory.audit() == []
    nrt.memory.alloc((16,), "uint8", device=False).free()  # smaller requests still work


# -- captured graphs ---------------------------------------------------------------------------
def test_replay_refuses_an_unknown_stream_on_the_cpu(cpu_rt):
    ran = []
    g = nrt.scheduler.graph([nrt.scheduler.stage("tick", kernel=lambda: ran.append(1))])
    cap = nrt.scheduler.capture(g)
    with pytest.raises(ValueError, match="unknown stream 'nonsense': streams are compute, compute_high"):
        cap.replay(stream="nonsense")
    with pytest.raises(TypeError, match="stream must be a role name or a Stream"):
        cap.replay(stream=1)
    nrt.scheduler.wait_barrier()
    assert ran == []  # nothing was queued by the refused replays
    cap.replay(stream="compute")
    nrt.scheduler.wait_barrier()
    assert ran == [1]
    cap.close()


# -- KV block pools ----------------------------------------------------------------------------
def test_tiered_free_with_a_bad_host_entry_frees_nothing():
    """The device block was freed before host.free refused the entry past the host pool."""
    pool = TieredBlockPool(4, 4)
    held = pool.alloc(6)  # 4 device blocks, 2 host ones
    before = pool.counts()
    for bad in ([held[0], encode_host(100)], [held[-1], 100], [held[0], held[0]], [held[0], 0.5]):
        with pytest.raises((ValueError, TypeError)):
            pool.free(bad)
        assert pool.counts() == before
    pool.free(held)
    assert pool.audit()["device_used"] == pool.audit()["host_used"] == 0


@pytest.mark.parametrize("kwargs, exc, message", [
    ({"num_layers": 0}, ValueError, "num_layers must be positive, got 0"),
    ({"num_kv_heads": 0}, ValueError, "num_kv_heads must be positive, got 0"),
    ({"num_kv_heads": -1}, ValueError, "num_kv_heads must be positive, got -1"),
    ({"head_dim": 2.0}, TypeError, "head_dim must be an int, got float"),
    ({"total_blocks": 10.5}, TypeError, "total_blocks must be an int, got float 10.5"),
    ({"total_blocks": True}, TypeError, "total_blocks must be an int, got bool"),
])
def test_plan_tiers_refuses_bad_sizes_by_name(kwargs, exc, message):
    args = {"total_blocks": 10, "kv_gpu_budget": None, **SHAPE, **kwargs}
    with pytest.raises(exc, match=message):
        plan_tiers(args.pop("total_blocks"), args.pop("kv_gpu_budget"), **args)
    with pytest.raises(exc, match=message):  # and with a budget, where it divided by zero
        plan_tiers(**{"total_blocks": 10, "kv_gpu_budget": 10**9, "available": 10**12, **SHAPE, **kwargs})
    assert plan_tiers(np.int64(10), None, **SHAPE).device_blocks == 10


@pytest.mark.parametrize("make, exc, message", [
    (lambda: BlockPool(1.5), TypeError, "num_blocks must be an int, got float 1.5"),
    (lambda: BlockPool("5"), TypeError, "num_blocks must be an int, got str '5'"),
    (lambda: BlockPool(0), ValueError, "num_blocks must be positive"),
    (lambda: BlockPool(2, order=[0.0, 1.0]), TypeError, "order must hold ints"),
    (lambda: TieredBlockPool(2, "3"), TypeError, "host_blocks must be an int"),
    (lambda: SequenceBlocks(BlockPool(2), 2.5), TypeError, "max_blocks must be an int"),
    (lambda: encode_host(1.5), TypeError, "host block index must be an int, got float"),
    (lambda: encode_host(True), TypeError, "host block index must be an int, got bool"),
])
def test_pool_construction_refuses_bad_sizes(make, exc, message):
    with pytest.raises(exc, match=message):
        make()


def test_block_pool_alloc_and_free_refuse_non_int_blocks():
    """alloc(True) took a block; free([0.7]) freed block 0."""
    pool = BlockPool(4)
    held = pool.alloc(2)
    for bad in (True, 1.0, "1", None):
        with pytest.raises(TypeError, match="n must be an int"):
            pool.alloc(bad)
    with pytest.raises(TypeError, match="blocks must hold ints .* got float 0.7"):
        pool.free([held[0] + 0.7])
    with pytest.raises(TypeError, match="blocks must hold ints .* got bool"):
        pool.free([held[0], True])
    with pytest.raises(TypeError, match="blocks must be an iterable"):
        pool.free(held[0])
    assert pool.num_free == 2
    pool.free(np.array(held, dtype=np.int32))  # NumPy integers are block indices
    assert pool.num_free == 4
    tiered = TieredBlockPool(2, 2)
    with pytest.raises(TypeError, match="n must be an int"):
        tiered.alloc(True)
    assert tiered.num_free == 4
    with pytest.raises(TypeError, match="tokens must be an int"):
        SequenceBlocks(pool, 4).ensure(1.5)


def test_kv_pool_out_of_memory_counts_blocks_not_bytes():
    with pytest.raises(OutOfMemory, match="KV block pool: requested 7 blocks, 2 blocks available") as err:
        SequenceBlocks(BlockPool(2), 8).ensure(100)
    assert (err.value.requested, err.value.available, err.value.unit) == (7, 2, "blocks")
    with pytest.raises(OutOfMemory, match="requested 9 blocks, 6 blocks available"):
        TieredBlockPool(4, 2).alloc(9)
    with pytest.raises(OutOfMemory, match="KV host tier: requested 1 blocks, 0 blocks available"):
        TieredBlockPool(1, 0).alloc_host(1)
    assert OutOfMemory(5, 3).unit == "bytes" and "requested 5 bytes, 3 bytes available" in str(OutOfMemory(5, 3))
