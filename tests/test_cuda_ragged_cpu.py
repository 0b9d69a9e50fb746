"""The batch runner's ragged prefill on the CPU: the layout of a step's prompt chunks (pure
logic), the attention spec's in-place rebind against the launcher, and a whole ragged step
run through the real launchers with a fake kernel cache that records every launch and copy:
the step's stage chain validates as a task graph for 1, 3 and 7 chunks, each chunk's attention
reads exactly its rows, table and start word, the LM head reads each chunk's last row, every
kernel asked for exists in its source and GEMM plans are made only for bucket row counts.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from nexusrt import memory
from nexusrt.backends.base import Rows
from nexusrt.backends.cuda import step as steps
from nexusrt.backends.cuda.batch_buffers import BatchBuffers, batch_buckets
from nexusrt.backends.cuda.buffers import RunnerBuffers
from nexusrt.backends.cuda.ragged import RaggedPrefill
from nexusrt.backends.cuda.ragged_layout import (Piece, Staging, bucket_for_rows, cut_pieces, group_passes, lay_out,
                                                 row_buckets)
from nexusrt.kernels.ops import attention_prefill as attn_pre
from nexusrt.scheduler.graph import TaskGraph
from tests.fakes import FakeKernel, FakeRuntime, tensor
from tests.test_cuda_step_cpu import _FakeLt, _check_kernels_exist, _config, _device_weights, no_occupancy_query  # noqa: F401


def _entries(lens, starts, width=23, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n, s in zip(lens, starts):
        blocks = -(-(s + n) // 16)
        out.append(Rows(rng.integers(1, 250, n).astype(np.int32), s, rng.permutation(40)[:blocks].tolist()))
    return out


def _staging(rows=256, slots=8, width=23):
    return Staging(np.full(rows, -7, np.int32), np.full((rows, 4), -7, np.int32),
                   np.full((slots + 1, width), -7, np.int32), np.full(slots, -7, np.int32))


# -- layout (pure) -----------------------------------------------------------------------------
def test_row_buckets_pad_little_and_end_at_the_largest():
    b = row_buckets(2048)
    assert b[:3] == (64, 128, 192) and b[15:18] == (1024, 1152, 1280) and b[-1] == 2048 and len(b) == 24
    for n in range(1, 2049):
        pad = bucket_for_rows(n, b) - n
        assert 0 <= pad <= max(63, n // 8), n
    assert row_buckets(256) == (64, 128, 192, 256) and row_buckets(40) == (40,) and row_buckets(100) == (64, 100)
    with pytest.raises(ValueError, match="exceed the largest"):
        bucket_for_rows(2049, b)
    for bad in (0, True, 64.0):
        with pytest.raises(ValueError, match="max_rows"):
            row_buckets(bad)


@pytest.mark.parametrize("align", [1, 64])
def test_layout_of_mixed_chunks(align):
    entries = _entries([2, 37, 90, 2, 5], [0, 16, 3, 200, 31])
    pieces = cut_pieces(entries, 512)
    out = _staging(rows=512)
    lay = lay_out(entries, pieces, row_buckets(512), scratch=41, scratch_row=8, out=out, align=align)
    want_offsets, row = [], 0
    for e in entries:
        row = -(-row // align) * align
        want_offsets.append(row)
        row += len(e.token_ids)
    assert lay.offsets == tuple(want_offsets) and lay.lengths == (2, 37, 90, 2, 5) and lay.rows == row
    assert lay.bucket == (192 if align == 1 else 384) == bucket_for_rows(row, row_buckets(512))
    real = np.zeros(lay.bucket, bool)
    for j, (e, off) in enumerate(zip(entries, lay.offsets)):
        n = len(e.token_ids)
        real[off:off + n] = True
        assert (out.ids[off:off + n] == e.token_ids).all()
        pos = np.arange(e.start, e.start + n)
        assert (out.meta[off:off + n, 0] == pos).all() and (out.meta[off:off + n, 1] == pos).all()
        assert (out.meta[off:off + n, 2] == j).all() and (out.meta[off:off + n, 3] == 0).all()
        assert out.tables[j, :len(e.table)].tolist() == e.table and (out.tables[j, len(e.table):] == 41).all()
        assert out.starts[j] == e.start
        assert lay.last_rows[j] == off + n - 1
    # Padding (and, aligned, the gaps): id 0, slot 0 of the all-scratch table row.
    assert (out.ids[:lay.bucket][~real] == 0).all()
    assert (out.meta[:lay.bucket][~real] == (0, 0, 8, 0)).all()
    assert (~real).sum() == lay.bucket - sum(lay.lengths)
    assert (out.ids[lay.bucket:] == -7).all() and (out.starts[5:] == -7).all()  # nothing past the pass
    assert (out.tables[8] == -7).all()  # the scratch row is the runner's, written once at start


def test_fixed_bucket_and_refusals():
    entries = _entries([2, 3], [0, 0])
    out = _staging()
    assert lay_out(entries, cut_pieces(entries, 256), row_buckets(256), 41, 8, out, fixed_bucket=True).bucket == 256
    assert lay_out(entries, cut_pieces(entries, 256), row_buckets(256), 41, 8, out).bucket == 64
    with pytest.raises(ValueError, match="table rows"):
        lay_out(_entries([2] * 9, [0] * 9), cut_pieces(_entries([2] * 9, [0] * 9), 256), row_buckets(256), 41, 8,
                _staging())
    with pytest.raises(ValueError, match="exceed"):
        lay_out(_entries([200, 100], [0, 0]), cut_pieces(_entries([200, 100], [0, 0]), 256), row_buckets(256), 41,
                8, _staging())


def test_long_chunks_are_cut_and_passes_fit():
    entries = _entries([300, 10, 250, 2], [5, 0, 0, 40])
    pieces = cut_pieces(entries, 256)
    assert pieces[:3] == [Piece(0, 0, 256, 5), Piece(0, 256, 44, 261), Piece(1, 0, 10, 0)]
    assert sum(p.count for p in pieces) == 562
    passes = group_passes(pieces, 256)
    assert [[(p.owner, p.count) for p in g] for g in passes] == [[(0, 256)], [(0, 44), (1, 10)], [(2, 250), (3, 2)]]
    aligned = group_passes(pieces, 256, align=64)
    for g in aligned:
        rows = 0
        for p in g:
            rows = -(-rows // 64) * 64 + p.count
        assert rows <= 256
    assert len(aligned) == 4  # (44, 10) still fits; (250, 2) does not once 2 starts at row 256


# -- rebind --------------------------------------------------------------------------------------
class _ListKernel(FakeKernel):
    """Packs into a list (rebind rewrites it in place, as it does an ArgPack) and records launches."""

    trace: list | None = None

    def pack(self, *values):
        return list(values)

    def launch(self, grid, block, args, stream=None, shared=0, pdl=False):
        self.trace.append((self.name, tuple(grid), [getattr(a, "ptr", a) for a in args]))


class _Rt(FakeRuntime):
    def __init__(self):
        super().__init__()
        self.trace = []

    def _get(self, source, name, signature):
        self.asked.append((source, name, signature))
        k = _ListKernel(name)
        k.trace = self.trace
        return k


def _ptrs(values):
    return [getattr(v, "ptr", v) for v in values]


@pytest.mark.parametrize("d,hq,hkv", [(64, 8, 2), (128, 32, 8)])
def test_rebind_equals_a_fresh_launch_of_the_slice(d, hq, hkv):
    rt = _Rt()
    q, out = tensor((512, hq, d), "fp32", 0x10000), tensor((512, hq * d), "bf16", 0x900000)
    pools = dict(k_pool=tensor((40, hkv, 16, d), "bf16", 0x5000000), v_pool=tensor((40, hkv, 16, d), "bf16", 0x6000000))
    heads = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
    spec = attn_pre.attention_prefill(rt, q, out, block_table=tensor((23,), "int32", 0x100), pos=tensor((1,), "int32", 0x200),
                                      **pools, **heads)
    for off, m in ((0, 1), (3, 2), (70, 127), (100, 128), (200, 129), (0, 512)):
        qs = tensor((m, hq, d), "fp32", 0x10000 + off * hq * d * 4)
        os_ = tensor((m, hq * d), "bf16", 0x900000 + off * hq * d * 2)
        table, pos = tensor((23,), "int32", 0x300 + off), tensor((1,), "int32", 0x400 + off)
        fresh = attn_pre.attention_prefill(rt, qs, os_, block_table=table, pos=pos, **pools, **heads)
        got = attn_pre.rebind(spec, qs, os_, table, pos)
        assert got is spec
        assert _ptrs(got.args) == _ptrs(fresh.args) and got.grid == fresh.grid and got.name == fresh.name
        assert got.shared == fresh.shared and got.block == fresh.block
    with pytest.raises(ValueError, match="out must have shape"):
        attn_pre.rebind(spec, qs, tensor((m + 1, hq * d), "bf16"), table, pos)
    fp32 = attn_pre.attention_prefill(rt, q, tensor((512, hq * d), "fp32", 0x900000), block_table=table, pos=pos,
                                      **pools, **heads)
    with pytest.raises(ValueError, match="tensor-core spec"):
        attn_pre.rebind(fp32, q, out, table, pos)
