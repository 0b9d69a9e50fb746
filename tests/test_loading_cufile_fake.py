"""The cuFile path's logic on the CPU, through a stand-in for ``cuda.bindings.cufile``.

The stand-in reads with ``os.pread`` into host memory at the address cuFile would write
to, and records every call, so the coalescing, registration, handle lifetime and error
handling run in CI. The real library only ever runs on the CUDA backend (gpu tests).
"""

from __future__ import annotations

import ctypes
import itertools
import os

import numpy as np
import pytest

from nexusrt import memory
from nexusrt.errors import ModelError
from nexusrt.models.safetensors import SafetensorsIndex
from nexusrt.models.streaming import LoadItem, check_items, loader
from nexusrt.models.streaming.cufile_path import CuFileDriver, CuFileFailed, _Descr

from test_loading_cpu import SPEC_A, write_checkpoint


class FakeCuFile:
    """Records calls; ``refuse_register`` and ``fail_read`` (a call number) inject failures."""

    class FileHandleType:
        OPAQUE_FD = 1

    def __init__(self, refuse_register=False, fail_read=None, short_read=None):
        self.refuse_register, self.fail_read, self.short_read = refuse_register, fail_read, short_read
        self.handles, self.registered, self.reads = {}, {}, []
        self.opened = self.closed = 0
        self._ids = itertools.count(100)
        self._n = itertools.count(1)

    def driver_open(self):
        self.opened += 1

    def driver_close(self):
        self.closed += 1

    def handle_register(self, descr_addr):
        d = _Descr.from_address(descr_addr)
        assert d.type == 1 and d.fs_ops is None
        os.fstat(d.handle.fd)  # a real, open descriptor
        h = next(self._ids)
        self.handles[h] = d.handle.fd
        return h

    def handle_deregister(self, fh):
        del self.handles[fh]

    def buf_register(self, addr, n, flags):
        if self.refuse_register:
            raise RuntimeError("CU_FILE_INVALID_MAPPING_SIZE")
        self.registered[addr] = n

    def buf_deregister(self, addr):
        del self.registered[addr]

    def read(self, fh, base, size, file_off, buf_off):
        k = next(self._n)
        if k == self.fail_read:
            raise RuntimeError("CU_FILE_IO_ERROR")
        if self.registered and not self.refuse_register:
            assert base in self.registered and buf_off + size <= self.registered[base]
        data = os.pread(self.handles[fh], size, file_off)
        if k == self.short_read:
            data = data[: size // 2]
        ctypes.memmove(base + buf_off, data, len(data))
        self.reads.append((file_off, size))
        return len(data)


@pytest.fixture
def ckpt(tmp_path):
    vals = write_checkpoint(tmp_path / "a.safetensors", SPEC_A, seed=3)
    return vals, SafetensorsIndex.from_dir(tmp_path)


def _run(rt, items, fake, **kw):
    drv = CuFileDriver(fake)
    drv.open()
    routes = check_items(items)
    return loader._run(rt, items, routes, None, "cufile", drv, None, None, kw.get("workers", 3))


def test_reads_land_byte_exact_and_coalesce_into_fused_destinations(cpu_rt, ckpt):
    vals, index = ckpt
    names = list(SPEC_A)  # file order: embed norm q k ids big32
    total = sum(index.info(n).nbytes for n in names)
    flat = memory.empty((total,), "uint8")  # one destination laid out like the file: one read
    items, pos = [], 0
    for n in names:
        items.append(LoadItem(index.info(n), flat[pos:pos + index.info(n).nbytes]))
        pos += index.info(n).nbytes
    fake = FakeCuFile()
    path, chunks, details, _ = _run(cpu_rt, items, fake)
    assert path == "cufile" and len(chunks) == 1 and fake.reads == [(index.info("embed").offset, total)]
    for it in items:
        assert np.array_equal(it.dst.array, vals[it.info.name].reshape(-1).view(np.uint8))
    assert details["registered_buffers"] == 1 and fake.registered == {} and fake.handles == {}
    flat.free()


def test_separate_destinations_read_separately_and_convert(cpu_rt, ckpt):
    vals, index = ckpt
    items = [LoadItem(index.info("q"), memory.empty((40, 40), "bf16")),
             LoadItem(index.info("k"), memory.empty((20, 40), "bf16")),
             LoadItem(index.info("big32"), memory.empty((129, 33), "bf16"), convert="bf16")]
    fake = FakeCuFile(refuse_register=True)
    _, chunks, details, converted = _run(cpu_rt, items, fake, workers=2)
    assert len(fake.reads) == len(chunks) == 3 and converted == 1
    assert "refused" in details["buf_register"] and details["registered_buffers"] == 0
    assert np.array_equal(items[0].dst.array, vals["q"]) and np.array_equal(items[1].dst.array, vals["k"])
    assert np.array_equal(items[2].dst.array.view(np.uint16), vals["big32"].astype("bfloat16").view(np.uint16))
    assert [a for a in memory.audit() if a["tag"] == "load_scratch"] == []
    for it in items:
        it.dst.free()


@pytest.mark.parametrize("fake,error,message", [
    (FakeCuFile(fail_read=2), CuFileFailed, "CU_FILE_IO_ERROR"),
    (FakeCuFile(short_read=1), ModelError, "short read: .* although the file holds"),
])
def test_failures_release_handles_and_scratch(cpu_rt, ckpt, fake, error, message):
    _, index = ckpt
    items = [LoadItem(i, memory.empty(i.shape, "bf16"), convert="bf16") for i in index.tensors.values()
             if i.dtype in ("F32", "BF16")]
    with pytest.raises(error, match=message) as e:
        _run(cpu_rt, items, fake, workers=1)
    assert "a.safetensors: tensor '" in str(e.value)
    assert fake.handles == {} and fake.registered == {}
    assert [a for a in memory.audit() if a["tag"] == "load_scratch"] == []
    for it in items:
        it.dst.free()
    assert memory.audit() == []


def test_driver_close_only_after_open():
    fake = FakeCuFile()
    drv = CuFileDriver(fake)
    drv.close()
    assert fake.closed == 0
    drv.open()
    assert drv.mode.startswith(("compat", "gds"))
    drv.close()
    drv.close()
    assert fake.closed == 1
