"""NcclGroup: the NCCL communicator of one rank per process (nexusrt/parallel/nccl.py).

On the CPU: the calls it makes through a recording stand-in for nccl4py's low-level module
(counts, data types, pointers, stream, the unique id's bytes, NVLS off), and its refusals. On a
GPU with nccl4py: one rank (any single GPU; a sum over one rank is the identity), the
two-process case waits for a machine with two GPUs (issue 17).
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

import nccl_fakes
from nexusrt.parallel import nccl as nccl_mod


class _T:
    def __init__(self, numel, dtype="fp32", device=True, ptr=0x1000):
        self.numel, self.dtype, self.device, self.ptr = numel, dtype, device, ptr


@pytest.fixture
def fake(monkeypatch):
    calls = []
    mods = nccl_fakes.modules(calls)
    for name, m in mods.items():
        monkeypatch.setitem(sys.modules, name, m)
    monkeypatch.delenv(nccl_mod.NVLS_ENV, raising=False)
    return calls, mods["nccl.bindings.nccl"]


def test_collectives_pass_pointers_counts_types_and_the_stream(fake):
    calls, _ = fake
    uid = nccl_mod.unique_id()
    assert uid == bytes(range(128))
    import os

    assert os.environ[nccl_mod.NVLS_ENV] == "0"
    g = nccl_mod.NcclGroup(1, 2, uid)
    stream = types.SimpleNamespace(handle=nccl_fakes.StreamHandle(77))  # a CUstream, not an int
    g.all_reduce(_T(4096, ptr=0xA0), stream)
    g.all_gather(_T(10, "bf16", ptr=0xB0), _T(20, "bf16", ptr=0xC0), stream)
    g.close()
    g.close()  # twice: nothing more
    assert calls == [("init", 2, uid, 1), ("all_reduce", 0xA0, 0xA0, 4096, 7, 0, "comm", 77),
                     ("all_gather", 0xB0, 0xC0, 10, 9, "comm", 77), ("destroy", "comm")]
    with pytest.raises(nccl_mod.NcclError, match="rank 1: the NCCL communicator is closed"):
        g.all_reduce(_T(4), stream)


@pytest.mark.parametrize("args, match", [((2, 2, bytes(128)), "rank 2 is not in a group of 2"),
                                         ((0, 0, bytes(128)), "not in a group of 0"),
                                         ((True, 2, bytes(128)), "rank must be an int"),
                                         ((0, 2, bytes(64)), "128 bytes of unique_id")])
def test_bad_ranks_and_ids_are_refused_before_nccl(fake, args, match):
    calls, _ = fake
    with pytest.raises(ValueError, match=match):
        nccl_mod.NcclGroup(*args)
    assert calls == []


def test_bad_buffers_are_named(fake):
    g = nccl_mod.NcclGroup(0, 2, bytes(128))
    s = types.SimpleNamespace(handle=0)
    with pytest.raises(ValueError, match="all_reduce: NCCL needs a device tensor"):
        g.all_reduce(_T(4, device=False), s)
    with pytest.raises(ValueError, match="dtype 'uint8' is not one NCCL sums here"):
        g.all_reduce(_T(4, "uint8"), s)
    with pytest.raises(ValueError, match=r"recv must be fp32 of 8 elements \(2 ranks x 4\), got fp32 of 6"):
        g.all_gather(_T(4), _T(6), s)


def test_nccl_failures_name_the_call_and_rank_and_abort_works(fake):
    calls, mod = fake

    def boom(*a):
        raise RuntimeError("NCCL_ERROR_REMOTE_ERROR")

    g = nccl_mod.NcclGroup(3, 4, bytes(128))
    mod.all_reduce = boom
    with pytest.raises(nccl_mod.NcclError, match="ncclAllReduce failed on rank 3 of 4: NCCL_ERROR_REMOTE_ERROR"):
        g.all_reduce(_T(4), types.SimpleNamespace(handle=0))
    g.close(abort=True)
    assert calls[-1] == ("abort", "comm")


def test_without_nccl4py_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nccl", None)
    with pytest.raises(nccl_mod.NcclError, match=r"needs nccl4py.*pip install 'nccl4py\[cu13\]'"):
        nccl_mod.unique_id()


# ------------------------------------------------------------------------------------ GPU
def _nccl_or_skip():
    try:
        return nccl_mod.unique_id()
    except nccl_mod.NcclError as e:
        pytest.skip(str(e))


@pytest.mark.gpu
def test_one_rank_collectives_on_one_gpu(gpu_rt):
    import nexusrt as nrt

    uid = _nccl_or_skip()
    g = nccl_mod.NcclGroup(0, 1, uid)
    try:
        rng = np.random.default_rng(17)
        host = rng.standard_normal(4099).astype(np.float32)
        x = nrt.memory.from_numpy(host)
        stream = gpu_rt.streams["compute"]
        g.all_reduce(x, stream)
        out = nrt.memory.from_numpy(np.full(4099, np.nan, np.float32))
        g.all_gather(x, out, stream)
        stream.synchronize()
        assert np.array_equal(x.to_numpy(), host) and np.array_equal(out.to_numpy(), host)
    finally:
        g.close()
