"""attention_decode and attention_prefill kernels: NVRTC builds and launcher checks on the
CPU; on a GPU, results against nexusrt.reference.ops.attention over a paged cache whose
blocks are scattered through a shuffled page table."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest

from nexusrt.kernels.compiler import compile_file
from nexusrt.kernels.ops import attention_decode as dec
from nexusrt.kernels.ops.common import ceil_div
from nexusrt.kernels.ops import attention_prefill as pre
from nexusrt.kvcache.blocks import (BLOCK_SIZE, BlockPool, SequenceBlocks, blocks_for, pool_shape,
                                    scatter_tokens)

from fakes import FakeRuntime, tensor

BF16 = ml_dtypes.bfloat16


# ------------------------------------------------------------------------ CPU: always run
@pytest.mark.parametrize("source", ["attention_decode", "attention_prefill"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_compiles_with_every_kernel_the_launcher_names(source, arch):
    cubin = compile_file(source, arch, use_cache=False).cubin
    if source == "attention_decode":
        names = {dec.kernel_name(d, g, rows) for d in dec.HEAD_DIMS for g in range(1, dec.MAX_GROUP + 1)
                 for rows in (False, True)}
        assert len(names) == 24  # exact 1, 2, 4, 8 and bounded 4, 8 per head dim, one-sequence and rows
    else:
        names = [f"attention_prefill_d{d}" for d in pre.HEAD_DIMS]
    for name in names:
        assert name.encode() in cubin, f"{name} missing from {source}.cu for {arch}"


@pytest.mark.parametrize("seq_len", [1, 15, 16, 17, 31, 32, 33, 1000, 4097, 8192, 131072])
@pytest.mark.parametrize("max_splits", [1, 3, 33, 128])
@pytest.mark.parametrize("step", [16, 32, 64])
def test_split_plan_covers_the_sequence_once(seq_len, max_splits, step):
    chunk, nsplit = dec.split_plan(seq_len, max_splits, step)
    assert chunk % step == 0 and 1 <= nsplit <= max_splits
    assert (nsplit - 1) * chunk < seq_len <= nsplit * chunk  # no empty working split


@pytest.mark.parametrize("step", [16, 32, 64])
def test_split_plan_runs_a_short_context_as_one_split(step):
    short = dec.ONE_SPLIT_STEPS * step
    for seq_len in (1, step + 1, short):
        assert dec.split_plan(seq_len, dec.MAX_SPLITS, step)[1] == 1
    # One token more and the usual rule applies: one step per split when the cap allows it.
    assert dec.split_plan(short + 1, dec.MAX_SPLITS, step) == (step, dec.ONE_SPLIT_STEPS + 1)
    assert dec.split_plan(short + 1, 2, step)[1] == 2


@pytest.mark.parametrize("step", [16, 32, 64])
def test_split_plan_of_the_cluster_kernels_is_one_step_per_split_up_to_the_cluster(step):
    for seq_len in (1, step, step + 1, 5 * step - 3, dec.CLUSTER_SIZE * step):
        chunk, nsplit = dec.split_plan(seq_len, 3, step, cluster=True)  # whatever max_splits
        assert chunk == step and nsplit == -(-seq_len // step) <= dec.CLUSTER_SIZE
    longer = dec.CLUSTER_SIZE * step + 1  # then the workspace path's rule
    assert dec.split_plan(longer, 33, step, cluster=True) == dec.split_plan(longer, 33, step)


def test_compiles_the_cluster_kernels_for_sm90_only():
    names = {dec.kernel_name(d, g).replace("attention_decode", "attention_decode_cluster", 1)
             for d in dec.HEAD_DIMS for g in range(1, dec.MAX_GROUP + 1)}
    assert len(names) == 12
    cubin = compile_file(dec.CLUSTER_SOURCE, "sm_90a", use_cache=False).cubin
    for name in names:
        assert name.encode() in cubin, name
    sm80 = compile_file(dec.CLUSTER_SOURCE, "sm_80", use_cache=False).cubin
    assert not any(name.encode() in sm80 for name in names)  # no clusters before sm_90


def test_cluster_launch_fills_whole_clusters_and_refuses_what_it_does_not_cover():
    spec = dec.attention_decode(FakeRuntime(), **_decode_args(splits=3), num_q_heads=32, num_kv_heads=8,
                                head_dim=128, cluster=True)
    assert spec.kernel.name == "attention_decode_cluster_d128_g4"
    assert spec.grid == (8, dec.CLUSTER_SIZE, 1) and spec.cluster == (1, dec.CLUSTER_SIZE, 1)
    assert spec.args[11] == 3  # max_splits is the workspace's: the longer contexts' rule
    wide = dec.attention_decode(FakeRuntime(), **_decode_args(splits=33), num_q_heads=32, num_kv_heads=8,
                                head_dim=128, cluster=True)
    assert wide.grid == (8, 40, 1)
    with pytest.raises(ValueError, match="one-sequence, device blocks only"):
        host = (tensor((4, 8, BLOCK_SIZE, 128), "bf16"), tensor((4, 8, BLOCK_SIZE, 128), "bf16"))
        dec.attention_decode(FakeRuntime(), **_decode_args(), num_q_heads=32, num_kv_heads=8, head_dim=128,
                             host_pools=host, cluster=True)


def test_compiles_the_mma_kernels_for_sm80_and_sm90():
    names = {dec.kernel_name(d, g, rows, host=host, fault=fault).replace("attention_decode", "attention_decode_mma", 1)
             for d in dec.HEAD_DIMS for g in range(1, dec.MAX_GROUP + 1)
             for rows, host, fault in ((False, False, False), (True, False, False), (False, True, False),
                                       (False, True, True))}
    assert len(names) == 48  # one-sequence, rows, host-tier and fault-ring twins, 12 group kernels each
    for arch in ("sm_80", "sm_90a"):
        cubin = compile_file(dec.MMA_SOURCE, arch, use_cache=False).cubin
        assert all(name.encode() in cubin for name in names), arch


def test_mma_launch_asks_for_its_ring_and_refuses_what_it_does_not_cover():
    rt = FakeRuntime()
    spec = dec.attention_decode(rt, **_decode_args(), num_q_heads=32, num_kv_heads=8, head_dim=128, mma=True)
    assert spec.kernel.name == "attention_decode_mma_d128_g4"
    assert spec.grid == (8, 4, 1) and spec.shared == dec.mma_shared_bytes(128) == 96 * 1024
    assert spec.kernel.shared == 96 * 1024  # opted in past the default 48 KiB
    assert dec.mma_shared_bytes(64) == 64 * 1024
    assert dec.tokens_per_step(64, 4, mma=True) == dec.tokens_per_step(128, 8, mma=True) == 4 * BLOCK_SIZE
    with pytest.raises(ValueError, match="mma: the mma kernels write no scores and run no clusters"):
        dec.attention_decode(rt, **_decode_args(), num_q_heads=32, num_kv_heads=8, head_dim=128, mma=True,
                             cluster=True)
    # (Host-tier pools take the mma host twin: test_kv_host_tier.py.)


def test_mma_ring_and_split_constants_match_the_kernel():
    body = (Path(dec.__file__).parents[1] / "cu" / "decode_attention_mma.cuh").read_text()
    assert re.search(r"return D == 64 \? (\d+) : (\d+);", body).groups() == tuple(
        str(dec.MMA_STAGES[d]) for d in (64, 128))
    body = (Path(dec.__file__).parents[1] / "cu" / "decode_attention.cuh").read_text()
    rule = re.search(r"mma_one_split_steps\(\) \{ return D == 64 \? (\d+) : (\d+); \}", body)
    assert rule.groups() == tuple(str(dec.MMA_ONE_SPLIT_STEPS[d]) for d in (64, 128))
    assert int(re.search(r"kMmaMinSplitSteps = (\d+);", body).group(1)) == dec.MMA_MIN_SPLIT_STEPS


@pytest.mark.parametrize("d", [64, 128])
def test_split_plan_of_the_mma_kernels(d):
    step = dec.tokens_per_step(d, 4, mma=True)
    one = dec.MMA_ONE_SPLIT_STEPS[d] * step
    assert dec.split_plan(one, 33, step, mma_head_dim=d) == (one, 1)  # one split up to the limit
    assert dec.split_plan(one + 1, 33, step, mma_head_dim=d) == (2 * step, ceil_div(one + 1, 2 * step))
    assert dec.split_plan(2048, 33, step, mma_head_dim=d) == (128, 16)  # 2 steps a split, not 32 splits of 1
    assert dec.split_plan(8193, 33, step, mma_head_dim=d) == dec.split_plan(8193, 33, step)  # long: the same rule


@pytest.mark.parametrize("ok, env, below, first", [(dec.cluster_ok, "NEXUSRT_ATTN_CLUSTER", (8, 9), (9, 0)),
                                                  (dec.mma_ok, "NEXUSRT_ATTN_MMA", (7, 5), (8, 0))])
def test_the_twins_need_their_arch_and_follow_the_environment(monkeypatch, ok, env, below, first):
    rt = FakeRuntime()
    monkeypatch.delenv(env, raising=False)
    assert not ok(rt)  # no compute capability
    rt.profile = SimpleNamespace(compute_capability=below)
    assert not ok(rt)
    rt.profile.compute_capability = first
    assert ok(rt)
    monkeypatch.setenv(env, "0")
    assert not ok(rt)


def test_split_rule_constants_match_the_kernel():
    body = (Path(dec.__file__).parents[1] / "cu" / "decode_attention.cuh").read_text()
    assert int(re.search(r"kOneSplitSteps = (\d+);", body).group(1)) == dec.ONE_SPLIT_STEPS
    assert int(re.search(r"kClusterSize = (\d+);", body).group(1)) == dec.CLUSTER_SIZE
    assert int(re.search(r"kMaxSplits = (\d+);", body).group(1)) == dec.MAX_SPLITS


def test_choose_splits_fills_the_gpu_and_never_exceeds_the_kernel_limit():
    assert dec.choose_splits(8, 128, 4, 8192, 132) == 33  # ~2 blocks per SM over 8 KV heads
    assert dec.choose_splits(8, 128, 4, 64, 132) == 2  # 64 tokens: two 32-token steps
    assert dec.choose_splits(1, 64, 8, 1 << 20, 132) == dec.MAX_SPLITS
    assert dec.tokens_per_step(64, 4) == 64 and dec.tokens_per_step(128, 8) == 16


def test_wide_splits_take_three_blocks_an_sm_in_one_wave_from_the_long_context_on():
    start = dec.MMA_WIDE_FROM[64]
    assert dec.wide_splits(8, 64, 4, start, 132) == 49  # Llama-3.2-1B: 392 blocks for 396 places
    assert dec.choose_splits(8, 64, 4, start, 132) == 33
    assert dec.wide_splits(8, 64, 4, start - 1, 132) == 0  # a runner that never reaches it: no wide graph
    assert dec.wide_splits(8, 128, 4, 1 << 20, 132) == 0  # a 96 KiB ring: two blocks an SM only
    assert dec.wide_splits(2, 64, 7, 1 << 20, 132) == 0  # both counts at MAX_SPLITS: nothing to gain
    for hkv, sms in [(8, 132), (8, 78), (32, 132), (4, 108), (16, 16)]:
        wide = dec.wide_splits(hkv, 64, 4, 1 << 20, sms)
        assert wide == 0 or wide * hkv <= dec.MMA_WIDE_BLOCKS_PER_SM * sms  # never a second wave
        assert wide == 0 or dec.choose_splits(hkv, 64, 4, 1 << 20, sms) < wide <= dec.MAX_SPLITS
    with pytest.raises(ValueError, match="max_context"):
        dec.wide_splits(8, 64, 4, 0, 132)


def _decode_args(hq=32, hkv=8, d=128, blocks=10, splits=4):
    g = hq // hkv
    ws = dec.DecodeWorkspace(tensor((hkv, splits, g, d), "fp32"), tensor((hkv, splits, g, 2), "fp32"),
                             tensor((hkv,), "int32"), splits)
    return dict(q=tensor((hq, d), "fp32"), out=tensor((hq * d,), "fp32"), k_pool=tensor((blocks, hkv, BLOCK_SIZE, d), "bf16"),
                v_pool=tensor((blocks, hkv, BLOCK_SIZE, d), "bf16"), block_table=tensor((blocks,), "int32"),
                pos=tensor((1,), "int32"), workspace=ws)


def test_decode_launcher_picks_the_kernel_and_grid():
    rt = FakeRuntime()
    spec = dec.attention_decode(rt, **_decode_args(), num_q_heads=32, num_kv_heads=8, head_dim=128)
    assert [(s, n, len(sig.split())) for s, n, sig in rt.asked] == [("attention_decode", "attention_decode_d128_g4", 13)]
    assert spec.grid == (8, 4, 1) and spec.block == (128, 1, 1)
    assert spec.args[-1] == pytest.approx(1 / math.sqrt(128)) and spec.args[-3] == 4  # G
    assert dec.kernel_name(64, 3) == "attention_decode_d64_gmax4"
    assert dec.kernel_name(128, 7) == "attention_decode_d128_gmax8"


@pytest.mark.parametrize("change, message", [
    (dict(q=tensor((32, 64), "fp32")), "q has shape"),
    (dict(out=tensor((32 * 128,), "bf16")), "out has dtype bf16"),
    (dict(k_pool=tensor((10, 8, 8, 128), "bf16")), "k_pool has shape"),
    (dict(v_pool=tensor((11, 8, 16, 128), "bf16")), "v_pool has shape"),
    (dict(block_table=tensor((10,), "int64")), "block_table has dtype"),
])
def test_decode_launcher_rejects_bad_tensors_by_name(change, message):
    args = {**_decode_args(), **change}
    with pytest.raises(ValueError, match=message):
        dec.attention_decode(FakeRuntime(), **args, num_q_heads=32, num_kv_heads=8, head_dim=128)


def test_decode_launcher_rejects_unsupported_shapes():
    with pytest.raises(ValueError, match="head_dim in"):
        dec.attention_decode(FakeRuntime(), **_decode_args(d=96), num_q_heads=32, num_kv_heads=8, head_dim=96)
    with pytest.raises(ValueError, match="GQA group 16"):
        dec.attention_decode(FakeRuntime(), **_decode_args(hq=32, hkv=2), num_q_heads=32, num_kv_heads=2,
                             head_dim=128)
    with pytest.raises(ValueError, match="not a multiple"):
        dec.attention_decode(FakeRuntime(), **_decode_args(), num_q_heads=30, num_kv_heads=8, head_dim=128)


def test_prefill_launcher_grid_covers_rows_times_group():
    rt = FakeRuntime()
    m, hq, hkv, d = 33, 28, 4, 128
    spec = pre.attention_prefill(rt, tensor((m, hq, d), "fp32"), tensor((m, hq * d), "fp32"),
                                 tensor((5, hkv, BLOCK_SIZE, d), "bf16"), tensor((5, hkv, BLOCK_SIZE, d), "bf16"),
                                 tensor((5,), "int32"), tensor((1,), "int32"), num_q_heads=hq, num_kv_heads=hkv,
                                 head_dim=d)
    assert spec.grid == (math.ceil(m * 7 / 16), hkv, 1)
    with pytest.raises(ValueError, match="out has shape"):
        pre.attention_prefill(rt, tensor((m, hq, d), "fp32"), tensor((m, hq), "fp32"),
                              tensor((5, hkv, BLOCK_SIZE, d), "bf16"), tensor((5, hkv, BLOCK_SIZE, d), "bf16"),
                              tensor((5,), "int32"), tensor((1,), "int32"), num_q_heads=hq, num_kv_heads=hkv,
                              head_dim=d)


def test_bench_cases_build_on_the_cpu_with_honest_byte_counts(cpu_rt):
    from nexusrt.kernels.ops import rope, sampling

    rt = FakeRuntime()
    cfg = SimpleNamespace(num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=5000,
                          rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None)
    cases = dec.bench_cases(rt, cfg, contexts=(128, 1024))
    assert [c.notes["context"] for c in cases] == [128, 1024]
    assert cases[1].bytes_moved == 2 * 1024 * 2 * 64 * 2 + 2 * 8 * 64 * 4
    assert all(c.notes["max_splits"] == dec.choose_splits(2, 64, 4, 1024, 132) for c in cases)
    assert cases[0].notes["pool_copies"] == 16  # small pools: the most copies, to defeat the L2
    (r,) = rope.bench_cases(rt, cfg)
    assert r.bytes_moved == 12 * 64 * 4 + 8 * 64 * 4 + 2 * 2 * 64 * 2 + 32 * 4
    assert [c.bytes_moved for c in sampling.bench_cases(rt, cfg)] == [5000 * 4] * 3 + [64 * 5000 * 4]  # + the rows form


# ------------------------------------------------------------------------ GPU
def _paged_cache(rng, seq_len, hkv, d, spare_blocks=3):
    """Random bf16 K/V for positions 0..seq_len-1 in pools whose every other slot is NaN
    (a kernel that reads past the sequence or a wrong page returns NaN), blocks shuffled."""
    import nexusrt as nrt

    num_blocks = blocks_for(seq_len) + spare_blocks
    pool = BlockPool(num_blocks, order=rng.permutation(num_blocks))
    seq = SequenceBlocks(pool, max_blocks=num_blocks + 2)
    seq.ensure(seq_len)
    table = seq.table()
    k = rng.standard_normal((seq_len, hkv, d), dtype=np.float32).astype(BF16)
    v = rng.standard_normal((seq_len, hkv, d), dtype=np.float32).astype(BF16)
    k_host = np.full(pool_shape(num_blocks, hkv, d), np.nan, dtype=BF16)
    v_host = k_host.copy()
    scatter_tokens(k_host, table, 0, k)
    scatter_tokens(v_host, table, 0, v)
    dev = dict(k_pool=nrt.memory.from_numpy(k_host), v_pool=nrt.memory.from_numpy(v_host),
               block_table=nrt.memory.from_numpy(table))
    return k.astype(np.float32), v.astype(np.float32), dev


def _rel(out, ref):
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


DECODE_SHAPES = [  # (Hq, Hkv, D): every group size 1..8 and the real model shapes
    (4, 4, 64), (8, 4, 128), (6, 2, 64), (16, 4, 128), (10, 2, 128), (12, 2, 64), (14, 2, 64),
    (16, 2, 128), (32, 8, 64), (32, 8, 128), (28, 4, 128),
]


@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv, d", DECODE_SHAPES)
@pytest.mark.parametrize("seq_len", [1, 15, 16, 17, 96, 100, 192, 193, 1000, 4097])
def test_decode_matches_reference(gpu_rt, hq, hkv, d, seq_len):
    import nexusrt as nrt
    from nexusrt.reference.ops import attention

    rng = np.random.default_rng(seq_len * 131 + hq * 7 + d)
    k, v, dev = _paged_cache(rng, seq_len, hkv, d)
    q = rng.standard_normal((hq, d), dtype=np.float32)
    ref = attention(q[None], k, v, np.array([seq_len - 1]))[0].reshape(-1)
    q_t = nrt.memory.from_numpy(q)
    pos = nrt.memory.from_numpy(np.array([seq_len - 1], dtype=np.int32))
    g = hq // hkv
    cluster_runs = [True] if dec.cluster_ok(gpu_rt) else []
    mma_runs = [True] if dec.mma_ok(gpu_rt) else []
    many = dec.choose_splits(hkv, d, g, 8192, 132)
    runs = [(s, "") for s in sorted({1, many, dec.MAX_SPLITS})] + \
        [(s, "cluster") for s in sorted({3, many}) for _ in cluster_runs] + \
        [(s, "mma") for s in sorted({1, many, dec.MAX_SPLITS}) for _ in mma_runs]
    for splits, kind in runs:
        cluster, mma = kind == "cluster", kind == "mma"
        # The partials' workspace starts as NaN: the splits that ran are the slots written.
        nan = np.full((hkv, splits, g, 2), np.nan, dtype=np.float32)
        ws = dec.DecodeWorkspace(nrt.memory.from_numpy(np.full((hkv, splits, g, d), np.nan, dtype=np.float32)),
                                 nrt.memory.from_numpy(nan), nrt.memory.zeros((hkv,), "int32"), splits)
        out = nrt.memory.from_numpy(np.full(hq * d, np.nan, dtype=np.float32))
        spec = dec.attention_decode(gpu_rt, q_t, out, pos=pos, workspace=ws, num_q_heads=hq,
                                    num_kv_heads=hkv, head_dim=d, cluster=cluster, mma=mma, **dev)
        what = f"max_splits={splits}" + (f" ({kind})" if kind else "")
        for _ in range(2):  # a replay must find the tickets reset
            spec.launch()
            got = out.to_numpy()
            assert np.isfinite(got).all(), f"unwritten outputs with {what}"
            assert _rel(got, ref) < 2e-5, what
        assert (ws.tickets.to_numpy() == 0).all()
        # The kernel split the context as split_plan says (one split, or a cluster's combine,
        # writes no partials).
        step = dec.tokens_per_step(d, g, mma=mma)
        _, nsplit = dec.split_plan(seq_len, splits, step, cluster=cluster, mma_head_dim=d if mma else None)
        via_ws = nsplit > 1 and not (cluster and seq_len <= dec.CLUSTER_SIZE * step)
        written = np.isfinite(ws.ml.to_numpy()).all(axis=(0, 2, 3))
        assert written.tolist() == [via_ws and sp < nsplit for sp in range(splits)], what
        ws.free()


@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv, d", [(4, 4, 64), (12, 2, 64), (32, 8, 64), (16, 2, 128), (32, 8, 128)])
def test_rows_decode_matches_reference(gpu_rt, hq, hkv, d):
    """The rows kernels (one query row per sequence, each with its own table row and slot) against
    the reference for rows of 1 .. 4,097 keys, plain and mma, every split count and a fixed chunk;
    with the fixed chunk a row's output is the same bits alone as in the batch (batch invariance)."""
    import nexusrt as nrt
    from nexusrt.reference.ops import attention

    rng = np.random.default_rng(hq * 17 + d)
    lens = [1, 17, 200, 385, 1000, 4097]
    rows, g = len(lens), hq // hkv
    caches = [_paged_cache(rng, n, hkv, d) for n in lens]  # each row its own pools: one pool, stacked tables
    width = max(c[2]["block_table"].shape[0] for c in caches)
    blocks = [c[2]["k_pool"].shape[0] for c in caches]
    k_all = np.concatenate([c[2]["k_pool"].to_numpy() for c in caches])
    v_all = np.concatenate([c[2]["v_pool"].to_numpy() for c in caches])
    tables = np.zeros((rows, width), np.int32)
    for r, c in enumerate(caches):
        t = c[2]["block_table"].to_numpy()
        tables[r, :t.size] = t + sum(blocks[:r])
        for tensor_ in c[2].values():
            tensor_.free()
    q = rng.standard_normal((rows, hq, d), dtype=np.float32)
    ref = np.stack([attention(q[r][None], c[0], c[1], np.array([n - 1]))[0].reshape(-1)
                    for r, (n, c) in enumerate(zip(lens, caches))])
    meta = np.array([[n - 1, n - 1, r, 0] for r, n in enumerate(lens)], np.int32)
    dev = dict(k_pool=nrt.memory.from_numpy(k_all), v_pool=nrt.memory.from_numpy(v_all),
               block_table=nrt.memory.from_numpy(tables))
    heads = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
    q_t, meta_t = nrt.memory.from_numpy(q), nrt.memory.from_numpy(meta)
    kinds = [False] + ([True] if dec.mma_ok(gpu_rt) else [])
    fixed = 4 * dec.tokens_per_step(d, g, mma=True)
    for mma in kinds:
        for splits, chunk in [(1, 0), (dec.choose_splits(hkv * rows, d, g, 4096, 132), 0), (dec.MAX_SPLITS, 0),
                              (dec.MAX_SPLITS, fixed)]:
            what = f"mma={mma} max_splits={splits} fixed_chunk={chunk}"
            ws = dec.alloc_workspace(hq, hkv, d, splits, rows=rows)
            out = nrt.memory.from_numpy(np.full((rows, hq * d), np.nan, np.float32), dtype="bf16")
            spec = dec.attention_decode(gpu_rt, q_t, out, pos=meta_t, workspace=ws, fixed_chunk=chunk, mma=mma,
                                        **dev, **heads)
            for _ in range(2):  # a replay must find the tickets reset
                spec.launch()
                got = out.to_numpy().astype(np.float32)
                assert np.isfinite(got).all(), what
                for r in range(rows):  # bf16 output: its rounding bounds the error
                    assert _rel(got[r], ref[r]) < 5e-3, f"{what}, row {r} ({lens[r]} keys)"
            assert (ws.tickets.to_numpy() == 0).all(), what
            if chunk:  # the longest row alone, in a one-row launch: the same bits
                last = rows - 1
                ws1 = dec.alloc_workspace(hq, hkv, d, splits, rows=1)
                one = nrt.memory.from_numpy(np.zeros((1, hq * d), np.float32), dtype="bf16")
                dec.attention_decode(gpu_rt, nrt.memory.from_numpy(q[last:]), one,
                                     pos=nrt.memory.from_numpy(meta[last:]), workspace=ws1, fixed_chunk=chunk,
                                     mma=mma, **dev, **heads).launch()
                assert np.array_equal(one.to_numpy(), out.to_numpy()[last:]), f"{what}: not batch-invariant"
                for t in (ws1, one):
                    t.free()
            for t in (ws, out):
                t.free()


PREFILL_SHAPES = [(4, 4, 64), (8, 2, 128), (14, 2, 64), (32, 8, 128), (32, 8, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv, d", PREFILL_SHAPES)
@pytest.mark.parametrize("start, m", [(0, 1), (0, 15), (0, 33), (7, 16), (50, 17), (200, 100), (0, 300)])
def test_prefill_matches_reference(gpu_rt, hq, hkv, d, start, m):
    import nexusrt as nrt
    from nexusrt.reference.ops import attention

    rng = np.random.default_rng(start * 1009 + m * 17 + hq + d)
    k, v, dev = _paged_cache(rng, start + m, hkv, d)
    q = rng.standard_normal((m, hq, d), dtype=np.float32)
    ref = attention(q, k, v, start + np.arange(m)).reshape(m, hq * d)
    out = nrt.memory.from_numpy(np.full((m, hq * d), np.nan, dtype=np.float32))
    spec = pre.attention_prefill(gpu_rt, nrt.memory.from_numpy(q), out,
                                 pos=nrt.memory.from_numpy(np.array([start], dtype=np.int32)),
                                 num_q_heads=hq, num_kv_heads=hkv, head_dim=d, **dev)
    spec.launch()
    got = out.to_numpy()
    assert np.isfinite(got).all()
    assert _rel(got, ref) < 2e-5
    # Row by row too: a masking slip shows up in a few rows only.
    row_err = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert row_err.max() < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv, d", [(32, 8, 64), (28, 4, 128)])
def test_rope_append_prefill_then_decode_steps_agree_with_reference(gpu_rt, hq, hkv, d):
    """The kernels agree on the cache layout: what rope_append writes is what prefill and
    decode read, across a prompt chunk and then single-token steps."""
    import nexusrt as nrt
    from nexusrt.reference.ops import apply_rope, attention
    from nexusrt.kernels.ops.rope import rope_append

    rng = np.random.default_rng(d)
    prompt, steps = 37, 3
    total = prompt + steps
    qkv = rng.standard_normal((total, (hq + 2 * hkv) * d), dtype=np.float32)
    inv_freq = (1.0 / np.power(np.float32(10000.0), np.arange(0, d, 2).astype(np.float32) / d)).astype(np.float32)
    num_blocks = blocks_for(total) + 4
    seq = SequenceBlocks(BlockPool(num_blocks, order=rng.permutation(num_blocks)), num_blocks)
    seq.ensure(total)
    poison = np.full(pool_shape(num_blocks, hkv, d), np.nan, dtype=BF16)
    cache = dict(k_pool=nrt.memory.from_numpy(poison), v_pool=nrt.memory.from_numpy(poison),
                 block_table=nrt.memory.from_numpy(seq.table()))
    pos = nrt.memory.from_numpy(np.array([0], dtype=np.int32))
    inv = nrt.memory.from_numpy(inv_freq)
    heads = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d)

    # Reference: rotate all positions, K/V rounded to bf16 as the cache stores them.
    q_all = apply_rope(qkv[:, :hq * d].reshape(total, hq, d), np.arange(total), inv_freq)
    k_all = apply_rope(qkv[:, hq * d:(hq + hkv) * d].reshape(total, hkv, d), np.arange(total), inv_freq)
    v_all = qkv[:, (hq + hkv) * d:].reshape(total, hkv, d)
    k_all = k_all.astype(BF16).astype(np.float32)
    v_all = v_all.astype(BF16).astype(np.float32)
    ref = attention(q_all, k_all, v_all, np.arange(total)).reshape(total, hq * d)

    q_buf = nrt.memory.empty((prompt, hq, d), "fp32")
    out = nrt.memory.from_numpy(np.full((prompt, hq * d), np.nan, dtype=np.float32))
    rope_append(gpu_rt, nrt.memory.from_numpy(qkv[:prompt]), q_buf, pos=pos, inv_freq=inv, **cache,
                **heads).launch()
    pre.attention_prefill(gpu_rt, q_buf, out, pos=pos, **cache, **heads).launch()
    assert _rel(out.to_numpy(), ref[:prompt]) < 1e-3  # bf16 rounding of K may flip an ulp

    ws = dec.alloc_workspace(hq, hkv, d, dec.choose_splits(hkv, d, hq // hkv, 4096, 132))
    q1 = nrt.memory.empty((1, hq, d), "fp32")
    out1 = nrt.memory.empty((hq * d,), "fp32")
    for s in range(steps):
        t = prompt + s
        pos.copy_from(np.array([t], dtype=np.int32))
        out1.copy_from(np.full(hq * d, np.nan, dtype=np.float32))
        rope_append(gpu_rt, nrt.memory.from_numpy(qkv[t:t + 1]), q1, pos=pos, inv_freq=inv, **cache,
                    **heads).launch()
        dec.attention_decode(gpu_rt, q1.reshape(hq, d), out1, pos=pos, workspace=ws, **cache, **heads).launch()
        assert _rel(out1.to_numpy(), ref[t]) < 1e-3, f"decode step {s}"
