"""The batch runner's ragged prefill on the CPU (its layout: ``test_cuda_ragged_layout``): the
attention spec's in-place rebind against the launcher, and a whole ragged step
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
from nexusrt.backends.cuda.ragged_layout import bucket_for_rows
from nexusrt.kernels.ops import attention_prefill as attn_pre
from nexusrt.scheduler.graph import TaskGraph
from tests.fakes import FakeKernel, FakeRuntime, tensor
from tests.test_cuda_step_cpu import _FakeLt, _check_kernels_exist, _config, _device_weights, no_occupancy_query  # noqa: F401


def _entries(lens, starts, seed=0):
    """Step entries of ``lens`` ids at ``starts``, each with a shuffled table of pool blocks 0..39."""
    rng = np.random.default_rng(seed)
    out = []
    for n, s in zip(lens, starts):
        blocks = -(-(s + n) // 16)
        out.append(Rows(rng.integers(1, 250, n).astype(np.int32), s, rng.permutation(40)[:blocks].tolist()))
    return out


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
        got = attn_pre.rebind(spec, attn_pre.bind_rows(qs, os_, table, pos))
        assert got is spec
        assert _ptrs(got.args) == _ptrs(fresh.args) and got.grid == fresh.grid and got.name == fresh.name
        assert got.shared == fresh.shared and got.block == fresh.block
    with pytest.raises(ValueError, match="out must have shape"):
        attn_pre.bind_rows(qs, tensor((m + 1, hq * d), "bf16"), table, pos)
    with pytest.raises(ValueError, match="no tensor-core attention"):
        attn_pre.bind_rows(qs, os_, table, pos, block=(2, 2, False))
    fp32 = attn_pre.attention_prefill(rt, q, tensor((512, hq * d), "fp32", 0x900000), block_table=table, pos=pos,
                                      **pools, **heads)
    with pytest.raises(ValueError, match="cannot rebind"):
        attn_pre.rebind(fp32, attn_pre.bind_rows(q, out, table, pos))
    other = attn_pre.attention_prefill(rt, q, out, block_table=table, pos=pos, block=attn_pre.MMA_SHAPES[d][0],
                                       **pools, **heads)
    with pytest.raises(ValueError, match="cannot rebind"):  # made for another block shape
        attn_pre.rebind(other, attn_pre.bind_rows(q, out, table, pos))


# -- a whole ragged step through the real launchers ---------------------------------------------
class _Stream:
    handle = 0

    def __init__(self):
        self.syncs = 0

    def synchronize(self):
        self.syncs += 1


class _RecordingLt(_FakeLt):
    """Plans that record each GEMM run: (m, n, k, y, w, x)."""

    def __init__(self, trace):
        super().__init__()
        self.trace = trace

    def plan(self, problem):
        trace = self.trace
        return self.plans.setdefault(problem, SimpleNamespace(
            problem=problem, run=lambda lt, y, w, x, bias, stream: trace.append(
                ("gemm", (problem.m, problem.n, problem.k), [y, w, x]))))


class _Step:
    """A RaggedPrefill on the CPU arena with a recording fake runtime (max_batch 8, 256 rows)."""

    def __init__(self, variant, deterministic=False, layers=None):
        import dataclasses

        cfg = _config(variant)
        self.cfg = cfg if layers is None else dataclasses.replace(cfg, num_hidden_layers=layers)
        self.rt, self.copies, self.stream = _Rt(), [], _Stream()
        self.w = _device_weights(self.cfg)
        self.pre = RunnerBuffers(self.rt, self.cfg, 300, 256, positions=363, pool_blocks=41)
        self.bb = BatchBuffers(self.rt, self.cfg, 8, 23, 600, self.pre.k_pools, self.pre.v_pools)
        self.lt = _RecordingLt(self.rt.trace)
        self.rp = RaggedPrefill(self.rt, self.cfg, self.w, self.lt, self.pre, self.bb, scratch=40, stream=self.stream,
                                batch_buckets=batch_buckets(8), deterministic=deterministic,
                                h2d=lambda dst, src, n: self.copies.append(("h2d", dst.ptr, src, n)),
                                d2d=lambda dst, src, n: self.copies.append(("d2d", dst, src, n)))

    def free(self):
        for part in (self.rp, self.bb, self.pre, self.w):
            part.free()


@pytest.mark.parametrize("variant", ["llama_tiny", "qwen2_bias", "qwen3_norms_d128"])
@pytest.mark.parametrize("lens", [[37], [2, 90, 5], [2, 17, 2, 40, 63, 2, 9]])
def test_a_ragged_step_launches_each_chunk_on_its_rows(variant, lens, cpu_rt, no_occupancy_query):
    s = _Step(variant)
    cfg, pre, bb, rp = s.cfg, s.pre, s.bb, s.rp
    hq, hkv, d, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    layers = cfg.num_hidden_layers
    try:
        assert rp.buckets == (64, 128, 192, 256)
        # Made once: the all-scratch table row copied in; plans for every row bucket and batch bucket.
        assert s.copies == [("h2d", rp.buf.tables[8].ptr, rp.buf.h_tables.ptr + 8 * 23 * 4, 23 * 4)]
        assert (rp.buf.h_tables.array[8] == 40).all()
        assert {p.m for p in s.lt.plans} == set(rp.buckets) | set(batch_buckets(8))
        s.copies.clear()
        s.rt.trace.clear()
        starts = [16 * (j % 3) + j for j in range(len(lens))]
        entries = _entries(lens, starts)
        rp.run(entries)
        rows = sum(lens)
        m = bucket_for_rows(rows, rp.buckets)
        offsets = np.concatenate([[0], np.cumsum(lens)[:-1]]).tolist()
        # Staged: ids, meta, the chunks' tables and starts, then after the layers one gather per chunk.
        buf = rp.buf
        assert s.copies[:4] == [("h2d", pre.ids.ptr, buf.h_ids.ptr, 4 * m), ("h2d", buf.meta.ptr, buf.h_meta.ptr, 16 * m),
                                ("h2d", buf.tables.ptr, buf.h_tables.ptr, 4 * 23 * len(lens)),
                                ("h2d", buf.starts.ptr, buf.h_starts.ptr, 4 * len(lens))]
        assert s.copies[4:] == [("d2d", bb.hidden.ptr + 4 * h * j, pre.hidden.ptr + 4 * h * (o + n - 1), 4 * h)
                                for j, (o, n) in enumerate(zip(offsets, lens))]
        assert (buf.h_meta.array[rows:m] == (0, 0, 8, 0)).all() and buf.h_starts.array[:len(lens)].tolist() == starts
        # Launched: GEMMs of the bucket's rows, then the LM head of the chunks' batch bucket.
        gemms = [t for t in s.rt.trace if t[0] == "gemm"]
        lm = 1 if len(lens) == 1 else 4 if len(lens) <= 4 else 8
        assert [g[1][0] for g in gemms] == [m] * 4 * layers + [lm]
        assert gemms[-1][2][0] == bb.logits[8].ptr and gemms[-1][1][1] == cfg.vocab_size
        kernels = [t for t in s.rt.trace if t[0] != "gemm"]
        assert kernels[0][0] == "embedding" and kernels[0][1][1] == m
        assert [k[0] for k in kernels if k[0].startswith("rope")] == [f"rope_append_rows_d{d}"] * layers
        attn = [k for k in kernels if k[0].startswith("attention_prefill_mma")]
        assert len(attn) == layers * len(lens)
        for i in range(layers):
            for j, (o, n) in enumerate(zip(offsets, lens)):
                fresh = attn_pre.attention_prefill(s.rt, pre.q[o:o + n], pre.attn[o:o + n], pre.k_pools[i], pre.v_pools[i],
                                                   buf.tables[j], buf.starts[j:j + 1], num_q_heads=hq, num_kv_heads=hkv,
                                                   head_dim=d)
                name, grid, args = attn[i * len(lens) + j]
                assert args == _ptrs(fresh.args) and grid == fresh.grid, (i, j)
                assert args[0] == pre.q.ptr + o * hq * d * 4 and args[6] == n and args[4] == buf.tables.ptr + j * 23 * 4
        # The same step as a stage chain (the per-chunk attention stages in place of the markers).
        per_layer = [[(f"s{j}", attn_pre.attention_prefill(
            s.rt, pre.q[o:o + n], pre.attn[o:o + n], pre.k_pools[i], pre.v_pools[i], buf.tables[j],
            buf.starts[j:j + 1], num_q_heads=hq, num_kv_heads=hkv, head_dim=d))
            for j, (o, n) in enumerate(zip(offsets, lens))] for i in range(layers)]
        stages = steps.ragged_prefill_stages(s.rt, cfg, s.w, pre, buf, m, s.lt, attention=per_layer)
        plan = TaskGraph(stages + steps.chunk_logits_stages(s.rt, cfg, s.w, bb, lm, s.lt), "step").validate()
        # embed; per layer norm, QKV, RoPE, one attention per chunk, the marker, O, norm, gate/up, SiLU, down
        assert len(stages) == 1 + (9 + len(lens)) * layers
        order = [n.split(".", 1)[1] for n in plan.order]
        assert order.index("layer0.attention.s0") > order.index("layer0.rope_append")
        assert order.index(f"layer0.attention.s{len(lens) - 1}") < order.index("layer0.o")
        assert {p.m for p in s.lt.plans} == set(rp.buckets) | set(batch_buckets(8))  # no plan for another row count
        assert s.stream.syncs == 0
    finally:
        s.free()
    _check_kernels_exist(s.rt)
    assert memory.stats()["in_use_bytes"] == 0


def test_a_step_larger_than_the_rows_runs_in_passes(cpu_rt, no_occupancy_query):
    s = _Step("llama_tiny", layers=2)
    h = s.cfg.hidden_size
    try:
        s.copies.clear()
        entries = _entries([300, 2, 200], [5, 0, 60])
        s.rp.run(entries)
        # Pieces (256) | (44, 2, 200): two passes, a synchronize before restaging the second.
        assert s.stream.syncs == 1
        ids = [c for c in s.copies if c[1] == s.pre.ids.ptr]
        assert [c[3] // 4 for c in ids] == [256, 256]
        gathers = [c for c in s.copies if c[0] == "d2d"]
        assert gathers == [("d2d", s.bb.hidden.ptr + 4 * h * j, s.pre.hidden.ptr + 4 * h * row, 4 * h)
                           for j, row in ((0, 43), (1, 45), (2, 245))]
        with pytest.raises(ValueError, match="1..8 prompt chunks"):
            s.rp.run(_entries([2] * 9, [0] * 9))
    finally:
        s.free()


def test_deterministic_steps_pad_to_the_largest_buckets(cpu_rt, no_occupancy_query):
    s = _Step("llama_tiny", deterministic=True, layers=2)
    try:
        s.rt.trace.clear()
        s.rp.run(_entries([2, 3], [0, 0]))
        assert {t[1][0] for t in s.rt.trace if t[0] == "gemm"} == {256, 8}  # all rows; LM head of max_batch rows
    finally:
        s.free()
