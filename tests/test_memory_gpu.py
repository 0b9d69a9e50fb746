"""The VMM arena on a real GPU: page mapping and reuse, bit-exact dtypes, OOM, audit, ilc, copies."""

from __future__ import annotations

import json

import numpy as np
import pytest

import nexusrt as nrt
from nexusrt.errors import OutOfMemory
from nexusrt.driver.calls import call
from nexusrt.memory import DTYPES

pytestmark = pytest.mark.gpu
MiB = 1 << 20


def random_of(dtype: str, shape, seed: int = 0) -> np.ndarray:
    dt = DTYPES[dtype]
    raw = np.random.default_rng(seed).integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
    return raw.view(dt.numpy).reshape(shape)


@pytest.fixture
def own_rt():
    """Boot a CUDA runtime with custom arguments inside the test; always shut down."""
    nrt.firmware.shutdown()
    yield lambda **kw: (nrt.firmware.init(backend="cuda", **kw), nrt.firmware.runtime())[1]
    nrt.firmware.shutdown()


def test_arena_maps_pages_and_reuses_them(gpu_rt):
    st0 = nrt.memory.stats()
    assert st0["page_bytes"] == 2 * MiB and st0["reserved_bytes"] >= gpu_rt.profile.memory_bytes
    data = random_of("uint8", (7 * MiB,), seed=1)
    a = nrt.memory.from_numpy(data, tag="big")
    st1 = nrt.memory.stats()
    assert st1["mapped_bytes"] - st0["mapped_bytes"] == 8 * MiB and a.ptr % (2 * MiB) == 0
    assert a.to_numpy().tobytes() == data.tobytes()
    ptr = a.ptr
    a.free()
    assert nrt.memory.stats()["pool_pages"] >= 4
    b = nrt.memory.alloc((8 * MiB,), "uint8")
    st2 = nrt.memory.stats()
    assert b.ptr == ptr and st2["pages_created"] == st1["pages_created"] and st2["maps"] == st1["maps"]
    b.free()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_every_dtype_round_trips_bit_exactly(gpu_rt, dtype):
    for shape, seed in (((3, 129), 2), ((1536, 1024), 3)):  # a slab block and a multi-page run
        data = random_of(dtype, shape, seed)
        t = nrt.memory.from_numpy(data)
        u = nrt.memory.empty(shape, dtype)
        nrt.memory.copy(u, t)
        assert t.to_numpy().tobytes() == data.tobytes()
        assert u.to_numpy().tobytes() == data.tobytes()
        assert u[1].to_numpy().tobytes() == data[1].tobytes()
        t.free()
        u.free()


def test_more_than_the_range_is_oom_and_the_arena_recovers(gpu_rt):
    total = gpu_rt.profile.memory_bytes
    with pytest.raises(OutOfMemory) as err:
        nrt.memory.alloc((2 * total,), "uint8")
    assert err.value.requested == 2 * total
    with nrt.memory.from_numpy(random_of("fp32", (1024, 1024))) as t:
        assert t.to_numpy().view(np.uint32).any()


def test_device_refusing_pages_midway_rolls_back(own_rt):
    total = own_rt().profile.memory_bytes
    nrt.firmware.shutdown()
    rt = own_rt(arena_bytes=2 * total)  # more range than memory: cuMemCreate is what fails
    provider = rt.arena.provider
    free_before = provider.free_bytes()
    with pytest.raises(OutOfMemory):  # the early check refuses without touching the driver
        nrt.memory.alloc((total + total // 2,), "uint8")
    provider.free_bytes = lambda: 1 << 62  # now get past it: pages are created until the device says no
    with pytest.raises(OutOfMemory) as err:
        nrt.memory.alloc((total + total // 2,), "uint8")
    assert "requested" in str(err.value) and provider.live_handles == 0 and provider.mapped_bytes == 0
    del provider.free_bytes
    assert provider.free_bytes() >= free_before - 64 * MiB
    data = random_of("bf16", (4096, 4096), seed=4)
    with nrt.memory.from_numpy(data) as t:
        assert t.to_numpy().tobytes() == data.tobytes()
    assert nrt.memory.stats()["oom"] == 2
    nrt.firmware.shutdown()
    assert nrt.memory.audit() == []


def test_leak_audit_after_many_cycles(own_rt):
    rt = own_rt()
    provider = rt.arena.provider
    rng = np.random.default_rng(7)
    live = []
    for i in range(400):
        if live and rng.random() < 0.5:
            live.pop(int(rng.integers(len(live)))).free()
        elif i % 10 == 0:
            live.append(nrt.memory.pinned((int(rng.integers(1, 3 * MiB)),), "uint8", tag="pin"))
        else:
            n = int(rng.choice([rng.integers(1, 9000), rng.integers(MiB, 9 * MiB)]))
            live.append(nrt.memory.alloc((n,), "uint8", tag=f"t{i % 4}", ilc=bool(i % 3 == 0)))
    for t in live:
        t.free()
    st = nrt.memory.stats()
    assert st["live_allocations"] == 0 and st["pinned_bytes"] == 0 and st["by_tag"] == {}
    nrt.firmware.shutdown()
    assert nrt.memory.audit() == []
    assert provider.live_handles == 0 and provider.mapped_bytes == 0


def test_ilc_is_compressed_only_where_the_device_gives_it(gpu_rt):
    data = random_of("bf16", (2048, 2048), seed=5)
    t = nrt.memory.from_numpy(data, ilc=True, tag="ilc")
    st = nrt.memory.stats()
    if not gpu_rt.profile.features.get("compressible_memory"):
        assert not t.compressed and st["ilc_uncompressed"] == 1
    elif t.compressed:
        # The provider read the page properties back: COMP_GENERIC really was granted.
        assert st["compressed_bytes"] >= t.nbytes and st["compression_supported"]
        h = gpu_rt.arena.core.pages.table.handle[t._storage.block.slot]
        props = call("cuMemGetAllocationPropertiesFromHandle", h)
        assert int(props.allocFlags.compressionType) == 1
    else:
        assert st["ilc_uncompressed"] == 1 and not st["compression_supported"]
    assert t.to_numpy().tobytes() == data.tobytes()
    plain = nrt.memory.empty((2048, 2048), "bf16")
    nrt.memory.copy(plain, t)
    assert plain.to_numpy().tobytes() == data.tobytes() and not plain.compressed
    print(f"ilc: feature={gpu_rt.profile.features.get('compressible_memory')} compressed={t.compressed}")
    t.free()
    plain.free()


def test_async_copies_through_pinned_memory_with_events(gpu_rt):
    data = random_of("fp16", (2048, 1024), seed=6)
    src = nrt.memory.pinned(data.shape, "fp16")
    assert src.pinned and not src.device
    src.array[...] = data
    dev1, dev2 = nrt.memory.empty(data.shape, "fp16"), nrt.memory.empty(data.shape, "fp16")
    out = nrt.memory.pinned(data.shape, "fp16")
    up = nrt.memory.copy_async(dev1, src)  # h2d stream
    up.wait_by(gpu_rt.streams["compute"])
    across = nrt.memory.copy_async(dev2, dev1)  # compute stream
    across.wait_by(gpu_rt.streams["d2h"])
    down = nrt.memory.copy_async(out, dev2)  # d2h stream
    down.synchronize()
    assert up.query() and across.query() and out.array.tobytes() == data.tobytes()
    dev1.free()  # waits for its pending copy, if any, before the block can be reused
    for t in (src, dev2, out):
        t.free()
    assert nrt.memory.stats()["pinned_bytes"] == 0


def test_debug_mode_poisons_freed_device_memory(own_rt, monkeypatch):
    monkeypatch.setenv("NEXUSRT_DEBUG", "1")
    own_rt()
    t = nrt.memory.from_numpy(random_of("fp32", (1000,), seed=8))
    ptr, nbytes = t.ptr, t.nbytes
    t.free()
    stale = np.empty(nbytes, np.uint8)
    call("cuMemcpyDtoH", stale.ctypes.data, ptr, nbytes)  # the page stays mapped in the pool
    assert (stale == 0xFF).all()


def test_bench_memory_stage_reports_fractions(capsys):
    from nexusrt.bench.main import main

    nrt.firmware.shutdown()
    assert main(["--stage", "memory", "--json", "--backend", "cuda", "--mem-size-mib", "128",
                 "--mem-reps", "10", "--mem-alloc-reps", "50"]) == 0
    r = json.loads(capsys.readouterr().out)
    print(json.dumps(r, indent=1))
    rows = {b["copy"]: b for b in r["bandwidth"]}
    assert 0.3 < rows["device->device"]["of_peak_bandwidth"] < 1.05
    assert rows["host->device (pinned)"]["of_pcie"] > 0.2
    assert rows["host->device (pinned)"]["gb_s"] > rows["host->device (pageable)"]["gb_s"] * 0.9
    assert all(a["peer"] == "cuMemAlloc/cuMemFree" for a in r["alloc"])
    assert r["pages"]["page_bytes"] == 2 * MiB and r["pages"]["create_us"] > 0
