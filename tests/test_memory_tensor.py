"""The public memory API on the CPU backend: tensors, views, dtypes, bad input, faults, audit."""

from __future__ import annotations

import ctypes
import gc

import ml_dtypes
import numpy as np
import pytest

import nexusrt as nrt
from nexusrt.errors import NotInitialized, OutOfMemory
from nexusrt.memory import DTYPES, DoubleFree, UseAfterFree

MiB = 1 << 20


def random_of(dtype: str, shape, seed: int = 0) -> np.ndarray:
    """Random bit patterns of ``dtype`` (NaNs and all: round trips must be bit-exact)."""
    dt = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
    return raw.view(dt.numpy).reshape(shape)


@pytest.fixture
def small_rt():
    """A CPU runtime whose arena holds only 8 MiB, for out-of-memory paths."""
    nrt.firmware.shutdown()
    nrt.firmware.init(backend="cpu", arena_bytes=8 * MiB)
    yield nrt.firmware.runtime()
    nrt.firmware.shutdown()


@pytest.mark.parametrize("call", [
    lambda: nrt.memory.alloc((2,), "fp32"), lambda: nrt.memory.empty((2,), "fp32"),
    lambda: nrt.memory.zeros((2,), "fp32"), lambda: nrt.memory.from_numpy(np.ones(2, np.float32)),
    lambda: nrt.memory.pinned((2,), "fp32"), nrt.memory.stats, nrt.memory.trim,
    lambda: nrt.memory.set_high_water(0), nrt.memory.reset_peak,
    lambda: nrt.memory.copy(None, None), lambda: nrt.memory.copy_async(None, None),
])
def test_every_call_needs_init(call):
    nrt.firmware.shutdown()
    with pytest.raises(NotInitialized, match="nrt.memory"):
        call()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_every_dtype_round_trips_bit_exactly(cpu_rt, dtype):
    data = random_of(dtype, (37, 19), seed=len(dtype))
    t = nrt.memory.from_numpy(data, tag="rt")
    assert (t.shape, t.dtype, t.nbytes, t.itemsize, t.numel) == ((37, 19), dtype, data.nbytes,
                                                                   DTYPES[dtype].itemsize, 37 * 19)
    out = t.to_numpy()
    assert out.dtype == data.dtype and out.tobytes() == data.tobytes()
    u = nrt.memory.empty((37, 19), dtype)
    u.copy_from(out)
    assert u.to_numpy().tobytes() == data.tobytes()
    t.free()
    u.free()


def test_bf16_maps_to_ml_dtypes_and_converts_only_when_asked(cpu_rt):
    x = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
    t = nrt.memory.empty((8, 4), "bf16")
    with pytest.raises(ValueError, match="convert=True"):
        t.copy_from(x)
    t.copy_from(x, convert=True)
    assert t.to_numpy().dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(t.to_numpy(), x.astype(ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match="shape"):
        t.copy_from(x[:4], convert=True)
    conv = nrt.memory.from_numpy(x, dtype="bf16")
    assert conv.to_numpy().tobytes() == x.astype(ml_dtypes.bfloat16).tobytes()
    with pytest.raises(ValueError, match="dtype="):
        nrt.memory.from_numpy(x.astype(np.float64))


@pytest.mark.parametrize("kwargs, word", [
    (dict(shape=(4,), dtype="float128"), "dtype"),
    (dict(shape=(4, 0), dtype="fp32"), r"shape\[1\]"),
    (dict(shape=(-3,), dtype="fp32"), r"shape\[0\]"),
    (dict(shape=(2.5,), dtype="fp32"), r"shape\[0\]"),
    (dict(shape="abc", dtype="fp32"), r"shape\[0\]"),
    (dict(shape=(2**40, 2**40), dtype="fp32"), "overflows"),
    (dict(shape=(4,), dtype="fp32", tag=3), "tag"),
    (dict(shape=(4,), dtype="fp32", pinned=True), "pinned"),
    (dict(shape=(4,), dtype="fp32", ilc=True, device=False), "ilc"),
])
def test_bad_input_names_the_argument(cpu_rt, kwargs, word):
    with pytest.raises(ValueError, match=word):
        nrt.memory.alloc(**kwargs)
    assert nrt.memory.stats()["live_allocations"] == 0


def test_bad_arena_bytes_fails_boot():
    nrt.firmware.shutdown()
    with pytest.raises(ValueError, match="arena_bytes"):
        nrt.firmware.init(backend="cpu", arena_bytes=-5)
    assert not nrt.runtime.is_initialized()


def test_out_of_memory_states_bytes_and_recovers(small_rt):
    with pytest.raises(OutOfMemory) as err:
        nrt.memory.alloc((16 * MiB,), "uint8")
    assert err.value.requested == 16 * MiB and "requested 16777216 bytes" in str(err.value)
    held = nrt.memory.alloc((5 * MiB,), "uint8")  # 3 of the 4 pages
    with pytest.raises(OutOfMemory) as err:
        nrt.memory.alloc((4 * MiB,), "uint8")
    assert err.value.available == 2 * MiB
    with nrt.memory.alloc((2 * MiB,), "uint8") as last:
        last.array[:] = 7
    held.free()
    nrt.firmware.shutdown()
    assert nrt.memory.audit() == []


def test_double_free_and_use_after_free_raise(cpu_rt):
    t = nrt.memory.from_numpy(random_of("fp32", (4, 4)))
    v = t[1:3]
    t.free()
    with pytest.raises(DoubleFree):
        t.free()
    for use in (lambda: t.ptr, t.to_numpy, lambda: v.to_numpy(), lambda: v.array, lambda: t[0]):
        with pytest.raises(UseAfterFree, match="was freed"):
            use()
    assert "freed" in repr(t)


def test_views_share_memory_and_never_free_the_base(cpu_rt):
    data = random_of("int32", (6, 4, 2), seed=5)
    t = nrt.memory.from_numpy(data)
    row, rows, last = t[2], t[1:3], t[-1]
    assert row.shape == (4, 2) and row.ptr == t.ptr + 2 * 4 * 2 * 4
    assert rows.shape == (2, 4, 2) and last.ptr == t.ptr + 5 * 32
    np.testing.assert_array_equal(rows.to_numpy(), data[1:3])
    flat = t.reshape(-1)
    assert flat.shape == (48,) and flat.ptr == t.ptr
    np.testing.assert_array_equal(t.reshape(3, -1).to_numpy(), data.reshape(3, -1))
    as_bytes = t.view("uint8")
    assert as_bytes.shape == (6, 4, 8)
    np.testing.assert_array_equal(as_bytes.to_numpy(), data.view(np.uint8))
    rows.array[...] = -1  # writes through the view land in the base
    assert (t.to_numpy()[1:3] == -1).all() and (t.to_numpy()[0] == data[0]).all()
    with pytest.raises(ValueError, match="view cannot free"):
        rows.free()
    with rows:
        pass  # leaving a view's block does not free the base
    assert t.is_live
    for bad, exc in ((lambda: t[::2], ValueError), (lambda: t[3:3], ValueError), (lambda: t[6], IndexError),
                     (lambda: t.reshape(5, -1), ValueError), (lambda: t.reshape(7, 7), ValueError),
                     (lambda: t.view("bogus"), ValueError), (lambda: t[1.5], TypeError)):
        with pytest.raises(exc):
            bad()
    odd = nrt.memory.empty((3,), "int8")
    with pytest.raises(ValueError, match="multiple"):
        odd.view("int32")
    t.free()
    odd.free()


def test_context_manager_frees(cpu_rt):
    with nrt.memory.alloc((1000,), "fp16", tag="tmp") as t:
        assert nrt.memory.stats()["by_tag"] == {"tmp": 2048}
    assert not t.is_live and nrt.memory.stats()["by_tag"] == {}


def test_large_tensors_reuse_pooled_pages(cpu_rt):
    a = nrt.memory.alloc((3 * MiB,), "uint8")
    ptr = a.ptr
    created = nrt.memory.stats()["pages_created"]
    a.free()
    st = nrt.memory.stats()
    assert st["pool_pages"] == 2 and st["mapped_bytes"] == 4 * MiB and st["in_use_bytes"] == 0
    b = nrt.memory.alloc((4 * MiB,), "uint8")
    assert b.ptr == ptr and nrt.memory.stats()["pages_created"] == created
    b.free()


def test_zeros_really_clear_reused_memory(cpu_rt):
    a = nrt.memory.alloc((300, 7), "fp32")
    a.array[...] = random_of("fp32", (300, 7), seed=9)
    ptr = a.ptr
    a.free()
    z = nrt.memory.zeros((300, 7), "fp32")
    assert z.ptr == ptr and not z.to_numpy().view(np.uint32).any()
    h = nrt.memory.zeros((5,), "int64", device=False)
    assert not h.device and not h.to_numpy().any()
    z.free()


def test_stats_count_tags_peak_and_ilc(cpu_rt):
    w = nrt.memory.alloc((2 * MiB,), "uint8", tag="weights")
    k = nrt.memory.alloc((100,), "bf16", tag="kv", ilc=True)
    st = nrt.memory.stats()
    assert st["by_tag"] == {"weights": 2 * MiB, "kv": 256}
    assert not k.compressed and st["ilc_requested"] == 1 and st["ilc_uncompressed"] == 1
    assert st["ilc_uncompressed_bytes"] == 256 and st["compression_supported"] is False
    assert st["reserved_bytes"] >= cpu_rt.profile.memory_bytes // 2
    w.free()
    st = nrt.memory.stats()
    assert st["peak_bytes"] == 2 * MiB + 256 and st["in_use_bytes"] == 256
    nrt.memory.reset_peak()
    assert nrt.memory.stats()["peak_bytes"] == 256
    assert nrt.memory.trim() == 2 * MiB and nrt.memory.stats()["mapped_bytes"] == 2 * MiB
    k.free()


def test_high_water_env_returns_pages(monkeypatch):
    nrt.firmware.shutdown()
    monkeypatch.setenv("NEXUSRT_ARENA_HIGH_WATER", str(2 * MiB))
    nrt.firmware.init(backend="cpu")
    try:
        nrt.memory.alloc((8 * MiB,), "uint8").free()
        st = nrt.memory.stats()
        assert st["mapped_bytes"] == 2 * MiB and st["pages_released"] == 3
    finally:
        nrt.firmware.shutdown()


def test_leak_audit_after_many_cycles_is_empty():
    nrt.firmware.shutdown()
    nrt.firmware.init(backend="cpu")
    rng = np.random.default_rng(11)
    live = []
    for i in range(300):
        if live and rng.random() < 0.5:
            live.pop(int(rng.integers(len(live)))).free()
        else:
            n = int(rng.choice([rng.integers(1, 5000), rng.integers(MiB, 5 * MiB)]))
            live.append(nrt.memory.alloc((n,), "uint8", tag=f"t{i % 3}", ilc=bool(i % 2)))
    assert len(nrt.memory.audit()) == len(live) and all(e["state"] == "live" for e in nrt.memory.audit())
    for t in live:
        t.free()
    provider = nrt.firmware.runtime().arena.provider
    nrt.firmware.shutdown()
    assert nrt.memory.audit() == []
    assert provider.live_handles == 0 and provider.mapped_bytes == 0


def test_tensors_alive_at_shutdown_are_released_and_reported(cpu_rt):
    kept = nrt.memory.alloc((3 * MiB,), "uint8", tag="forgotten")
    small = nrt.memory.alloc((10,), "fp32", tag="also")
    nrt.firmware.shutdown()
    report = nrt.memory.audit()
    assert sorted((e["tag"], e["nbytes"], e["state"]) for e in report) == [
        ("also", 40, "leaked_at_shutdown"), ("forgotten", 3 * MiB, "leaked_at_shutdown")]
    with pytest.raises(UseAfterFree, match="released at shutdown"):
        kept.to_numpy()
    kept.free()  # not the caller's double free: a no-op
    small.free()


def test_collected_tensors_are_freed(cpu_rt):
    nrt.memory.alloc((MiB,), "uint8")
    v = nrt.memory.alloc((64,), "fp32")[3:5]  # the view keeps its base's memory alive
    gc.collect()
    st = nrt.memory.stats()
    assert st["live_allocations"] == 1 and st["in_use_bytes"] == 256
    del v
    gc.collect()
    assert nrt.memory.stats()["live_allocations"] == 0


@pytest.mark.parametrize("debug", [False, True])
def test_debug_mode_poisons_freed_memory(monkeypatch, debug):
    nrt.firmware.shutdown()
    monkeypatch.setenv("NEXUSRT_DEBUG", "1" if debug else "0")
    nrt.firmware.init(backend="cpu")
    try:
        data = random_of("uint8", (4096,), seed=2)
        t = nrt.memory.from_numpy(data)
        ptr = t.ptr
        t.free()
        stale = np.frombuffer(ctypes.string_at(ptr, 4096), np.uint8)  # a kernel holding the old pointer
        if debug:
            assert (stale == 0xFF).all()
        else:
            np.testing.assert_array_equal(stale, data)
    finally:
        nrt.firmware.shutdown()


def test_host_and_pinned_tensors_and_copies(cpu_rt):
    data = random_of("fp16", (64, 8), seed=4)
    host = nrt.memory.pinned((64, 8), "fp16")
    assert not host.device and host.pinned is False  # the CPU backend has nothing to page-lock
    host.array[...] = data
    dev = nrt.memory.empty((64, 8), "fp16")
    ev = nrt.memory.copy_async(dev, host, "h2d")
    ev.synchronize()
    assert ev.query()
    back = nrt.memory.alloc((64, 8), "fp16", device=False)
    nrt.memory.copy(back, dev)
    assert back.array.tobytes() == data.tobytes()
    other = nrt.memory.empty((512,), "fp16")
    nrt.memory.copy(other, dev)  # same element count, another shape: a byte copy
    assert other.to_numpy().tobytes() == data.tobytes()
    with pytest.raises(ValueError, match="dtype and element count"):
        nrt.memory.copy(nrt.memory.empty((64, 8), "fp32"), dev)
    with pytest.raises(TypeError, match="Tensor"):
        nrt.memory.copy(dev, data)
    dev.copy_from(nrt.memory.from_numpy(data[::-1].copy()))
    assert dev.to_numpy().tobytes() == data[::-1].tobytes()
    for t in (host, dev, back, other):
        t.free()


def test_audit_before_any_runtime_is_not_initialized(monkeypatch):
    nrt.firmware.shutdown()
    monkeypatch.setattr(nrt.memory.arena, "LAST_AUDIT", None)
    with pytest.raises(NotInitialized):
        nrt.memory.audit()
