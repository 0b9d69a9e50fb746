"""rope_append kernel: NVRTC builds and launcher checks on the CPU; on a GPU, q against
rms_norm + apply_rope of nexusrt.reference.ops, K/V as written into a paged cache."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from nexusrt.kernels.compiler import compile_file
from nexusrt.kernels.ops import rope
from nexusrt.kvcache.blocks import BLOCK_SIZE, pool_shape

from fakes import FakeRuntime, tensor

BF16 = ml_dtypes.bfloat16


# ------------------------------------------------------------------------ CPU: always run
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_compiles_with_every_kernel_the_launcher_names(arch):
    cubin = compile_file("rope", arch, use_cache=False).cubin
    for d in rope.HEAD_DIMS:
        assert f"rope_append_d{d}".encode() in cubin
        assert f"rope_append_rows_d{d}".encode() in cubin


def test_page_size_agrees_with_the_kernel_headers():
    from nexusrt.kernels.compiler import SOURCE_DIR

    for header in ("attn_common.cuh", "common.cuh"):
        path = SOURCE_DIR / header
        if path.is_file():  # common.cuh belongs to the other kernels; it may come later
            assert f"#define NRT_PAGE_SIZE {BLOCK_SIZE}" in path.read_text(), header


def _args(m=3, hq=8, hkv=2, d=64, blocks=4):
    return dict(qkv=tensor((m, (hq + 2 * hkv) * d), "fp32"), q_out=tensor((m, hq, d), "fp32"),
                k_pool=tensor((blocks, hkv, BLOCK_SIZE, d), "bf16"), v_pool=tensor((blocks, hkv, BLOCK_SIZE, d), "bf16"),
                block_table=tensor((blocks,), "int32"), pos=tensor((1,), "int32"), inv_freq=tensor((d // 2,), "fp32"))


def test_launcher_grid_has_a_warp_per_head_and_a_row_per_position():
    spec = rope.rope_append(FakeRuntime(), **_args(m=3), num_q_heads=8, num_kv_heads=2, head_dim=64,
                            q_norm=tensor((64,), "fp32"), k_norm=None, eps=1e-6)
    assert spec.kernel.name == "rope_append_d64"
    assert spec.grid == (3, 3, 1) and spec.block == (128, 1, 1)  # 12 heads / 4 per block
    assert spec.args[7] == 0x1000 and spec.args[8] == 0  # q_norm given, k_norm null


@pytest.mark.parametrize("change, message", [
    (dict(qkv=tensor((3, 11 * 64), "fp32")), "qkv has shape"),
    (dict(q_out=tensor((3, 8, 64), "bf16")), "q_out has dtype"),
    (dict(inv_freq=tensor((64,), "fp32")), "inv_freq has shape"),
    (dict(pos=tensor((1,), "fp32")), "pos has dtype"),
    (dict(k_pool=tensor((4, 2, 16, 64), "fp32")), "k_pool has dtype"),
])
def test_launcher_rejects_bad_tensors_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        rope.rope_append(FakeRuntime(), **{**_args(), **change}, num_q_heads=8, num_kv_heads=2, head_dim=64)


def test_launcher_rejects_bad_norm_weight_and_head_dim():
    with pytest.raises(ValueError, match="k_norm has shape"):
        rope.rope_append(FakeRuntime(), **_args(), num_q_heads=8, num_kv_heads=2, head_dim=64,
                         k_norm=tensor((32,), "fp32"))
    with pytest.raises(ValueError, match="head_dim in"):
        rope.rope_append(FakeRuntime(), **_args(d=80), num_q_heads=8, num_kv_heads=2, head_dim=80)


# ------------------------------------------------------------------------ GPU
def _inv_freq(d, theta=500000.0):
    return (1.0 / np.power(np.float32(theta), np.arange(0, d, 2).astype(np.float32) / np.float32(d))
            ).astype(np.float32)


CASES = [  # (M, Hq, Hkv, D, start, qk_norm)
    (1, 32, 8, 64, 0, False), (1, 32, 8, 128, 1000, False), (7, 8, 2, 64, 5, True),
    (33, 16, 16, 128, 15, True), (17, 28, 4, 128, 100000, False), (5, 14, 2, 64, 16, True),
    (40, 12, 4, 256, 31, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("m, hq, hkv, d, start, qk_norm", CASES)
def test_rope_append_matches_reference(gpu_rt, m, hq, hkv, d, start, qk_norm):
    import nexusrt as nrt
    from nexusrt.reference.ops import apply_rope, rms_norm

    rng = np.random.default_rng(m * 1000 + d + start)
    qkv = rng.standard_normal((m, (hq + 2 * hkv) * d), dtype=np.float32) * 2
    inv_freq = _inv_freq(d)
    qw = (1 + 0.3 * rng.standard_normal(d)).astype(np.float32) if qk_norm else None
    kw = (1 + 0.3 * rng.standard_normal(d)).astype(np.float32) if qk_norm else None
    eps = 1e-6

    # Only the logical blocks of positions start..start+m-1 get (shuffled) physical blocks of a
    # small pool; earlier entries point at page 0, which rope_append must never touch for them.
    first, last = start // BLOCK_SIZE, (start + m - 1) // BLOCK_SIZE
    num_blocks = last - first + 3
    table = np.zeros(last + 1, dtype=np.int32)
    table[first:] = rng.permutation(num_blocks)[:last - first + 1]
    poison = np.full(pool_shape(num_blocks, hkv, d), np.nan, dtype=BF16)
    dev = dict(qkv=nrt.memory.from_numpy(qkv), q_out=nrt.memory.from_numpy(np.full((m, hq, d), np.nan, np.float32)),
               k_pool=nrt.memory.from_numpy(poison), v_pool=nrt.memory.from_numpy(poison),
               block_table=nrt.memory.from_numpy(table), pos=nrt.memory.from_numpy(np.array([start], np.int32)),
               inv_freq=nrt.memory.from_numpy(inv_freq))
    norms = dict(q_norm=nrt.memory.from_numpy(qw) if qk_norm else None,
                 k_norm=nrt.memory.from_numpy(kw) if qk_norm else None)
    rope.rope_append(gpu_rt, **dev, **norms, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, eps=eps).launch()

    positions = start + np.arange(m)
    q = qkv[:, :hq * d].reshape(m, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].reshape(m, hkv, d)
    v = qkv[:, (hq + hkv) * d:].reshape(m, hkv, d)
    if qk_norm:
        q, k = rms_norm(q, qw, eps), rms_norm(k, kw, eps)
    q_ref, k_ref = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)

    q_got = dev["q_out"].to_numpy()
    assert np.isfinite(q_got).all()
    assert np.linalg.norm(q_got - q_ref) / np.linalg.norm(q_ref) < 1e-5
    assert np.abs(q_got - q_ref).max() < 1e-3

    k_pool, v_pool = dev["k_pool"].to_numpy(), dev["v_pool"].to_numpy()
    t = positions
    k_got = k_pool[table[t // BLOCK_SIZE], :, t % BLOCK_SIZE, :].astype(np.float32)
    v_got = v_pool[table[t // BLOCK_SIZE], :, t % BLOCK_SIZE, :].astype(np.float32)
    # bf16 rounding of fp32 values that differ in the last bits may flip one bf16 ulp.
    assert np.abs(k_got - k_ref).max() <= np.abs(k_ref).max() * 2 ** -7
    assert np.linalg.norm(k_got - k_ref) / np.linalg.norm(k_ref) < 4e-3
    np.testing.assert_array_equal(v_got, v.astype(BF16).astype(np.float32))
    # Nothing else was written: every other slot is still NaN.
    written = np.zeros(pool_shape(num_blocks, hkv, d), dtype=bool)
    written[table[t // BLOCK_SIZE], :, t % BLOCK_SIZE, :] = True
    assert np.isnan(k_pool.astype(np.float32)[~written]).all()
    assert np.isnan(v_pool.astype(np.float32)[~written]).all()
