"""The tensor-core prefill pieces on the GPU, each against a NumPy reference on fresh random
data: mma attention over a scattered paged cache (and against the fp32 CUDA-core kernel),
the bf16 RMSNorm and SiLU*mul kernels, and cuBLASLt GEMMs with every epilogue the model uses."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from tests.test_kernels_attention import _paged_cache, _rel

pytestmark = pytest.mark.gpu
BF16 = ml_dtypes.bfloat16

SHAPES = [(4, 4, 64), (8, 2, 128), (14, 2, 64), (32, 8, 128), (32, 8, 64), (28, 4, 128)]


@pytest.mark.parametrize("hq, hkv, d", SHAPES)
@pytest.mark.parametrize("start, m", [(0, 1), (0, 15), (0, 64), (0, 65), (7, 16), (50, 17), (200, 100),
                                      (0, 300), (64, 64), (1000, 129)])
def test_mma_attention_matches_reference_and_the_fp32_kernel(gpu_rt, hq, hkv, d, start, m):
    import nexusrt as nrt
    from nexusrt.reference.ops import attention
    from nexusrt.kernels.ops import attention_prefill as pre

    rng = np.random.default_rng(start * 1009 + m * 17 + hq + d + 1)
    k, v, dev = _paged_cache(rng, start + m, hkv, d)
    q = rng.standard_normal((m, hq, d), dtype=np.float32)
    ref = attention(q, k, v, start + np.arange(m)).reshape(m, hq * d)
    pos = nrt.memory.from_numpy(np.array([start], dtype=np.int32))
    q_t = nrt.memory.from_numpy(q)
    out = nrt.memory.from_numpy(np.full((m, hq * d), np.nan, dtype=BF16))
    pre.attention_prefill(gpu_rt, q_t, out, pos=pos, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, **dev).launch()
    got = out.to_numpy().astype(np.float32)
    assert np.isfinite(got).all(), "unwritten or NaN rows (the pools hold NaN outside the sequence)"
    assert _rel(got, ref) < 1e-2  # bf16 Q, P and output: ~3e-3 expected
    row_err = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert row_err.max() < 2e-2, f"worst row {int(row_err.argmax())}: a masking slip shows in a few rows"
    out32 = nrt.memory.from_numpy(np.full((m, hq * d), np.nan, dtype=np.float32))
    pre.attention_prefill(gpu_rt, q_t, out32, pos=pos, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, **dev).launch()
    assert _rel(got, out32.to_numpy()) < 1e-2


def _bf16_close(got, ref, ulps=2):
    """Within a couple of bf16 ulps of the fp32 reference (sums in another order may round apart)."""
    tol = ulps * np.abs(ref) * 2.0 ** -8 + 1e-6
    bad = np.abs(got - ref) > tol
    assert not bad.any(), f"{int(bad.sum())} elements off, worst {np.abs(got - ref)[bad].max()}"


@pytest.mark.parametrize("rows, cols", [(1, 64), (5, 256), (300, 2048), (17, 4096)])
def test_rms_norm_bf16_matches_numpy(gpu_rt, rows, cols):
    import nexusrt as nrt
    from nexusrt.kernels.ops import elementwise as ew

    rng = np.random.default_rng(rows + cols)
    x = rng.standard_normal((rows, cols), dtype=np.float32) * 3
    w = (1 + 0.1 * rng.standard_normal(cols)).astype(np.float32)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    out = nrt.memory.from_numpy(np.full((rows, cols), np.nan, dtype=BF16))
    ew.rms_norm_bf16(gpu_rt, out, nrt.memory.from_numpy(x), nrt.memory.from_numpy(w), rows=rows, cols=cols,
                     eps=1e-5).launch()
    _bf16_close(out.to_numpy().astype(np.float32), ref.astype(np.float32))


@pytest.mark.parametrize("rows, cols", [(1, 8), (3, 512), (257, 8192), (64, 14336)])
def test_silu_mul_bf16_matches_numpy(gpu_rt, rows, cols):
    import nexusrt as nrt
    from nexusrt.kernels.ops import elementwise as ew

    rng = np.random.default_rng(cols)
    gu = (rng.standard_normal((rows, 2 * cols), dtype=np.float32) * 2).astype(BF16)
    g, u = gu[:, :cols].astype(np.float64), gu[:, cols:].astype(np.float64)
    ref = g / (1 + np.exp(-g)) * u
    out = nrt.memory.from_numpy(np.full((rows, cols), np.nan, dtype=BF16))
    ew.silu_mul_bf16(gpu_rt, out, nrt.memory.from_numpy(gu), rows=rows, cols=cols).launch()
    _bf16_close(out.to_numpy().astype(np.float32), ref.astype(np.float32))


@pytest.mark.parametrize("m, n, k", [(2, 64, 64), (17, 384, 256), (1000, 3072, 2048), (4096, 1024, 512)])
@pytest.mark.parametrize("epilogue", ["plain_fp32", "plain_bf16", "bias", "residual"])
def test_cublaslt_gemm_matches_numpy(gpu_rt, m, n, k, epilogue):
    import nexusrt as nrt
    from nexusrt.kernels.ops.cublaslt import LtContext
    from nexusrt.kernels.ops.gemm import gemm

    rng = np.random.default_rng(m * 7 + n + k)
    x = rng.standard_normal((m, k), dtype=np.float32).astype(BF16)
    w = (0.05 * rng.standard_normal((n, k), dtype=np.float32)).astype(BF16)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    out_dtype = BF16 if epilogue == "plain_bf16" else np.float32
    y0 = rng.standard_normal((m, n), dtype=np.float32) if epilogue == "residual" else np.full((m, n), np.nan, np.float32)
    y = nrt.memory.from_numpy(y0.astype(out_dtype))
    kwargs = {}
    if epilogue == "bias":
        b = rng.standard_normal(n, dtype=np.float32)
        kwargs["bias"] = nrt.memory.from_numpy(b)
        ref = ref + b
    if epilogue == "residual":
        kwargs["residual"] = y
        ref = ref + y0
    lt = LtContext(gpu_rt)
    try:
        gemm(gpu_rt, y, nrt.memory.from_numpy(w), nrt.memory.from_numpy(x), m=m, n=n, k=k, lt=lt,
             **kwargs)(gpu_rt.streams["compute"])
        got = y.to_numpy().astype(np.float64)
    finally:
        gpu_rt.device.synchronize()
        lt.close()
    assert np.isfinite(got).all()
    assert _rel(got, ref) < (1e-2 if epilogue == "plain_bf16" else 1e-5)


def test_tensor_core_gemm_rejects_shapes_before_any_launch(gpu_rt):
    import nexusrt as nrt
    from nexusrt.kernels.ops.cublaslt import LtContext
    from nexusrt.kernels.ops.gemm import gemm

    lt = LtContext(gpu_rt)
    try:
        x, w = nrt.memory.empty((4, 12), "bf16"), nrt.memory.empty((12, 12), "bf16")
        y = nrt.memory.empty((4, 12), "fp32")
        with pytest.raises(ValueError, match="multiples of 8"):
            gemm(gpu_rt, y, w, x, m=4, n=12, k=12, lt=lt)
        assert not lt.plans  # nothing planned, nothing launched
    finally:
        lt.close()
    assert nrt.memory.stats()["by_tag"].get("cublaslt", 0) == 0


@pytest.mark.parametrize("hq, hkv, d", [(32, 8, 64), (28, 4, 128), (8, 2, 128)])
@pytest.mark.parametrize("start, m", [(0, 1), (0, 130), (33, 200), (1000, 257)])
def test_every_built_attention_block_shape_matches_reference(gpu_rt, hq, hkv, d, start, m):
    """The block shapes the sweep compares (not only the default) compute the same function."""
    import nexusrt as nrt
    from nexusrt.reference.ops import attention
    from nexusrt.kernels.ops import attention_prefill as pre

    rng = np.random.default_rng(start + m + d)
    k, v, dev = _paged_cache(rng, start + m, hkv, d)
    q = rng.standard_normal((m, hq, d), dtype=np.float32)
    ref = attention(q, k, v, start + np.arange(m)).reshape(m, hq * d)
    pos = nrt.memory.from_numpy(np.array([start], dtype=np.int32))
    q_t = nrt.memory.from_numpy(q)
    for block in pre.MMA_SHAPES[d]:
        out = nrt.memory.from_numpy(np.full((m, hq * d), np.nan, dtype=BF16))
        pre.attention_prefill(gpu_rt, q_t, out, pos=pos, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block=block,
                              **dev).launch()
        got = out.to_numpy().astype(np.float32)
        assert np.isfinite(got).all(), f"block {block}: unwritten rows"
        row_err = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
        assert row_err.max() < 2e-2, f"block {block}: worst row {int(row_err.argmax())} err {row_err.max():.3e}"


def test_tuned_gemm_keeps_the_fastest_candidate(gpu_rt):
    import nexusrt as nrt
    from nexusrt.kernels.ops.cublaslt import LtContext, Problem

    lt = LtContext(gpu_rt)
    try:
        plan = lt.plan(Problem(2048, 4096, 4096, out="fp32", residual=True))
        assert plan.count >= 1 and len(plan.times_ms) == (plan.count if plan.count > 1 else 0)
        if plan.times_ms:
            assert plan.times_ms[plan.choice] == min(plan.times_ms)
            print(f"candidates {plan.count}: " + ", ".join(f"{t * 1e3:.0f}" for t in plan.times_ms) + " us")
        assert nrt.memory.stats()["by_tag"].get("cublaslt", 0) == 32 << 20  # only the workspace stays
    finally:
        lt.close()
