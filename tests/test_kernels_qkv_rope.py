"""The fused QKV GEMV + RoPE + KV append (gemv_rope.cu): NVRTC builds and launcher checks on the
CPU; on a GPU, bit-identical outputs to the two launches it replaces (gemv + rope_append) on
fresh random data, and q/K/V against nexusrt.reference.ops."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from nexusrt.kernels.compiler import compile_file
from nexusrt.kernels.ops import qkv_rope
from nexusrt.kvcache.blocks import BLOCK_SIZE, pool_shape

from fakes import FakeRuntime, tensor

BF16 = ml_dtypes.bfloat16


# ------------------------------------------------------------------------ CPU: always run
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_compiles_with_every_kernel_the_launcher_names(arch):
    cubin = compile_file(qkv_rope.SOURCE, arch, use_cache=False).cubin
    for d in qkv_rope.HEAD_DIMS:
        for depth in qkv_rope.DEPTHS:
            assert qkv_rope.kernel_name(d, depth).encode() in cubin
        # The bulk-copy ring twin exists from sm_90 on only.
        assert (f"gemv_qkv_rope_ring_d{d}".encode() in cubin) == (arch == "sm_90a")


def _args(hq=8, hkv=2, d=64, k=256, blocks=4):
    return dict(q_out=tensor((1, hq, d), "fp32"), k_pool=tensor((blocks, hkv, BLOCK_SIZE, d), "bf16"),
                v_pool=tensor((blocks, hkv, BLOCK_SIZE, d), "bf16"), block_table=tensor((blocks,), "int32"),
                pos=tensor((1,), "int32"), w=tensor(((hq + 2 * hkv) * d, k), "bf16"), x=tensor((1, k), "fp32"),
                inv_freq=tensor((d // 2,), "fp32"), norm_weight=tensor((k,), "fp32"))


def test_launcher_has_a_warp_per_rotate_half_pair(monkeypatch):
    from nexusrt.kernels.ops import gemv

    monkeypatch.setattr(gemv, "blocks_per_sm", lambda kernel, threads, shared: 2)  # no driver here
    rt = FakeRuntime()
    spec = qkv_rope.qkv_rope(rt, **_args(), num_q_heads=8, num_kv_heads=2, head_dim=64, eps=1e-5)
    assert spec.kernel.name == "gemv_qkv_rope_d64"
    # 12 heads x 32 pairs = 48 blocks of 8 warps, capped by what is resident at once.
    assert spec.block == (256, 1, 1) and spec.grid == (min(48, 2 * rt.profile.sm_count), 1, 1)
    assert spec.shared == 256 * 4 and spec.kernel.shared == spec.shared  # x staged whole (opted in)
    assert spec.args[6] == 8  # flags: the input RMSNorm, no bias
    with_bias = qkv_rope.qkv_rope(FakeRuntime(), **_args(), bias=tensor((12 * 64,), "bf16"), num_q_heads=8,
                                  num_kv_heads=2, head_dim=64, eps=1e-5)
    assert with_bias.args[6] == 8 | 1 | 2


def test_ring_kernel_when_asked_for_on_sm90(monkeypatch):
    from nexusrt.kernels.ops import gemv, gemv_ring

    monkeypatch.delenv(gemv_ring.ENV, raising=False)
    monkeypatch.delenv(qkv_rope.DEPTH_ENV, raising=False)
    monkeypatch.setattr(gemv, "blocks_per_sm", lambda kernel, threads, shared: 1)
    rt = FakeRuntime()
    rt.profile.compute_capability = (9, 0)
    kw = dict(num_q_heads=8, num_kv_heads=2, head_dim=64, eps=1e-5)
    assert qkv_rope.qkv_rope(rt, **_args(), **kw).kernel.name == "gemv_qkv_rope_d64"  # off by default
    spec = qkv_rope.qkv_rope(rt, **_args(), **kw, ring=True)
    stages = gemv_ring.stages_for(rt, 256, True)
    assert spec.kernel.name == "gemv_qkv_rope_ring_d64" and list(spec.args)[-1] == stages
    assert spec.shared == gemv_ring.shared_bytes(256, stages) and spec.grid == (48, 1, 1)  # 384 pairs / 8 warps
    monkeypatch.setenv(gemv_ring.ENV, "1")
    assert qkv_rope.qkv_rope(rt, **_args(), **kw).kernel.name == "gemv_qkv_rope_ring_d64"
    # A pinned depth keeps the register loop.
    assert qkv_rope.qkv_rope(rt, **_args(), **kw, depth=2).kernel.name == "gemv_qkv_rope_u2_d64"
    monkeypatch.setenv(qkv_rope.DEPTH_ENV, "4")
    assert qkv_rope.qkv_rope(rt, **_args(), **kw).kernel.name == "gemv_qkv_rope_d64"


def _occupancy(monkeypatch, per_kernel):
    """blocks_per_sm by kernel name (no driver here): ``per_kernel`` maps a name prefix to blocks."""
    from nexusrt.kernels.ops import gemv

    def blocks(kernel, threads, shared):
        return next(n for prefix, n in per_kernel.items() if kernel.name.startswith(prefix))
    monkeypatch.setattr(gemv, "blocks_per_sm", blocks)


@pytest.mark.parametrize("hq, hkv, d, k, want", [
    # the 8B shape: 3,072 pair tasks; depth 4 holds 2 x 8 x 132 = 2,112 warps (two waves),
    # depth 2 holds 3,168 (one wave)
    (32, 8, 128, 4096, "gemv_qkv_rope_u2_d128"),
    # the 1B shape: 1,536 pair tasks are one wave at either depth, so the deeper loop
    (32, 8, 64, 2048, "gemv_qkv_rope_d64"),
])
def test_launcher_takes_the_depth_with_fewer_waves(monkeypatch, hq, hkv, d, k, want):
    monkeypatch.delenv(qkv_rope.DEPTH_ENV, raising=False)
    _occupancy(monkeypatch, {"gemv_qkv_rope_u2_": 3, "gemv_qkv_rope_d": 2})
    rt = FakeRuntime()
    assert rt.profile.sm_count == 132
    spec = qkv_rope.qkv_rope(rt, **_args(hq, hkv, d, k, blocks=4), num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                             eps=1e-5)
    tasks = (hq + 2 * hkv) * d // 2
    assert spec.kernel.name == want and spec.name.startswith(want + "[")
    per_sm = 3 if "_u2_" in want else 2
    assert spec.grid == (min(-(-tasks // 8), per_sm * 132), 1, 1)


def test_depth_pinned_by_argument_or_environment(monkeypatch):
    _occupancy(monkeypatch, {"gemv_qkv_rope_u2_": 3, "gemv_qkv_rope_d": 2})
    args = dict(**_args(32, 8, 128, 4096), num_q_heads=32, num_kv_heads=8, head_dim=128, eps=1e-5)
    monkeypatch.setenv(qkv_rope.DEPTH_ENV, "4")
    assert qkv_rope.qkv_rope(FakeRuntime(), **args).kernel.name == "gemv_qkv_rope_d128"
    assert qkv_rope.qkv_rope(FakeRuntime(), **args, depth=2).kernel.name == "gemv_qkv_rope_u2_d128"
    monkeypatch.setenv(qkv_rope.DEPTH_ENV, "3")
    with pytest.raises(ValueError, match="NEXUSRT_QKV_ROPE_DEPTH='3'"):
        qkv_rope.qkv_rope(FakeRuntime(), **args)
    monkeypatch.delenv(qkv_rope.DEPTH_ENV)
    with pytest.raises(ValueError, match="depth must be one of"):
        qkv_rope.qkv_rope(FakeRuntime(), **args, depth=8)


@pytest.mark.parametrize("change, message", [
    (dict(w=tensor((11 * 64, 256), "bf16")), "w has shape"),
    (dict(x=tensor((1, 256), "bf16")), "x has dtype"),
    (dict(x=tensor((256,), "fp32")), "x must be a 2-d"),
    (dict(x=tensor(None, "fp32")), "x must be a 2-d"),
    (dict(x=tensor((2, 256), "fp32")), "x has shape"),
    (dict(q_out=tensor((1, 8, 64), "bf16")), "q_out has dtype"),
    (dict(inv_freq=tensor((64,), "fp32")), "inv_freq has shape"),
    (dict(pos=tensor((1,), "fp32")), "pos has dtype"),
    (dict(k_pool=tensor((4, 2, 16, 64), "fp32")), "k_pool has dtype"),
    (dict(norm_weight=tensor((128,), "fp32")), "norm_weight has shape"),
    (dict(norm_weight=None), "needs norm_weight"),
    (dict(bias=tensor((12 * 64 + 1,), "fp32")), "bias has shape"),
])
def test_launcher_rejects_bad_tensors_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        qkv_rope.qkv_rope(FakeRuntime(), **{**_args(), **change}, num_q_heads=8, num_kv_heads=2, head_dim=64, eps=1e-5)


def test_unfused_reason_names_what_the_fused_kernel_does_not_cover():
    assert qkv_rope.unfused_reason(hidden=2048, head_dim=64) is None
    assert qkv_rope.unfused_reason(hidden=4096, head_dim=128) is None
    assert "head_dim 256" in qkv_rope.unfused_reason(hidden=2048, head_dim=256)
    assert "q/k RMSNorm" in qkv_rope.unfused_reason(hidden=2048, head_dim=128, q_norm=object())
    assert "host KV tier" in qkv_rope.unfused_reason(hidden=2048, head_dim=64, host_pools=(1, 2))
    assert "hidden 2049" in qkv_rope.unfused_reason(hidden=2049, head_dim=64)
    assert qkv_rope.unfused_reason(hidden=16384, head_dim=64) is None  # 64 KB of x: opted in, unsplit
    assert "hidden 32768" in qkv_rope.unfused_reason(hidden=32768, head_dim=64)  # x no longer fits unsplit
    with pytest.raises(ValueError, match="head_dim 256.*gemv \\+ rope_append"):
        qkv_rope.qkv_rope(FakeRuntime(), **_args(d=256), num_q_heads=8, num_kv_heads=2, head_dim=256, eps=1e-5)


def test_enabled_follows_the_environment(monkeypatch):
    monkeypatch.delenv("NEXUSRT_FUSE_ROPE", raising=False)
    assert qkv_rope.enabled()
    monkeypatch.setenv("NEXUSRT_FUSE_ROPE", "0")
    assert not qkv_rope.enabled()


# ------------------------------------------------------------------------ GPU
CASES = [  # (Hq, Hkv, D, K, position, bias)
    (32, 8, 64, 2048, 0, None), (32, 8, 128, 4096, 1000, None), (14, 2, 64, 896, 17, "fp32"),
    (28, 4, 128, 3584, 100000, "fp32"), (8, 8, 64, 512, 15, "bf16"), (16, 2, 128, 1024, 31, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("depth", ("ring",) + qkv_rope.DEPTHS)  # the bulk-copy ring on sm_90+, each register depth
@pytest.mark.parametrize("hq, hkv, d, k, start, bias_dtype", CASES)
def test_fused_equals_gemv_then_rope_append_bit_for_bit(gpu_rt, hq, hkv, d, k, start, bias_dtype, depth):
    import nexusrt as nrt
    from nexusrt.kernels.ops import gemv as gv
    from nexusrt.kernels.ops import rope
    from nexusrt.reference.ops import apply_rope, rms_norm

    rng = np.random.default_rng(hq * 1000 + d + start)
    rows = (hq + 2 * hkv) * d
    w = (rng.standard_normal((rows, k), dtype=np.float32) / np.sqrt(k)).astype(BF16)
    x = rng.standard_normal((1, k), dtype=np.float32)
    nw = (1 + 0.3 * rng.standard_normal(k)).astype(np.float32)
    bias = None if bias_dtype is None else rng.standard_normal(rows).astype(np.float32 if bias_dtype == "fp32" else BF16)
    inv_freq = (1.0 / np.power(np.float32(500000.0), np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
                ).astype(np.float32)
    eps = 1e-5
    first = start // BLOCK_SIZE
    num_blocks = first + 3
    table = rng.permutation(num_blocks).astype(np.int32)[:first + 1]
    poison = np.full(pool_shape(num_blocks, hkv, d), np.nan, dtype=BF16)

    common = dict(block_table=nrt.memory.from_numpy(table), pos=nrt.memory.from_numpy(np.array([start], np.int32)),
                  inv_freq=nrt.memory.from_numpy(inv_freq))
    w_t, x_t, nw_t = nrt.memory.from_numpy(w), nrt.memory.from_numpy(x), nrt.memory.from_numpy(nw)
    b_t = None if bias is None else nrt.memory.from_numpy(bias)
    outs = {}
    for fused in (True, False):
        q_out = nrt.memory.from_numpy(np.full((1, hq, d), np.nan, np.float32))
        kp, vp = nrt.memory.from_numpy(poison), nrt.memory.from_numpy(poison)
        if fused:
            qkv_rope.qkv_rope(gpu_rt, q_out, kp, vp, w=w_t, x=x_t, norm_weight=nw_t, bias=b_t, bias_dtype=bias_dtype,
                              num_q_heads=hq, num_kv_heads=hkv, head_dim=d, eps=eps, **common,
                              **(dict(ring=True) if depth == "ring" else dict(depth=depth, ring=False))).launch()
        else:
            qkv = nrt.memory.from_numpy(np.full((1, rows), np.nan, np.float32))
            gv.gemv(gpu_rt, qkv, w_t, x_t, n=rows, k=k, norm_weight=nw_t, eps=eps, bias=b_t,
                    bias_dtype=bias_dtype, ring=False).launch()
            rope.rope_append(gpu_rt, qkv, q_out, kp, vp, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, eps=eps,
                             **common).launch()
        outs[fused] = (q_out.to_numpy(), kp.to_numpy(), vp.to_numpy())

    for got, want, name in zip(outs[True], outs[False], ("q", "K pool", "V pool")):
        np.testing.assert_array_equal(got.view(np.uint32 if got.dtype == np.float32 else np.uint16),
                                      want.view(np.uint32 if want.dtype == np.float32 else np.uint16), err_msg=name)

    # And against the reference: q, K, V of this token, nothing else written.
    xn = rms_norm(x, nw, eps)
    y = xn @ w.astype(np.float32).T + (0 if bias is None else bias.astype(np.float32))
    q_ref = apply_rope(y[:, :hq * d].reshape(1, hq, d), np.array([start]), inv_freq)
    k_ref = apply_rope(y[:, hq * d:(hq + hkv) * d].reshape(1, hkv, d), np.array([start]), inv_freq)[0]
    v_ref = y[0, (hq + hkv) * d:].reshape(hkv, d)
    q_got, k_pool, v_pool = outs[True]
    assert np.linalg.norm(q_got - q_ref) / np.linalg.norm(q_ref) < 1e-4
    blk, slot = table[start // BLOCK_SIZE], start % BLOCK_SIZE
    k_got = k_pool[blk, :, slot, :].astype(np.float32)
    v_got = v_pool[blk, :, slot, :].astype(np.float32)
    assert np.linalg.norm(k_got - k_ref) / np.linalg.norm(k_ref) < 4e-3
    assert np.linalg.norm(v_got - v_ref) / np.linalg.norm(v_ref) < 4e-3
    written = np.zeros(k_pool.shape, dtype=bool)
    written[blk, :, slot, :] = True
    assert np.isnan(k_pool.astype(np.float32)[~written]).all() and np.isnan(v_pool.astype(np.float32)[~written]).all()
