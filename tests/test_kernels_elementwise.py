"""Elementwise kernels: launcher checks on the CPU, kernels against NumPy on the GPU."""

from __future__ import annotations


import ml_dtypes
import numpy as np
import pytest

from nexusrt.kernels.ops import elementwise as ew
from fakes import FakeRuntime, tensor

BF16 = ml_dtypes.bfloat16
FAKE_RT = FakeRuntime()


def test_tensor_key_matches_the_synthetic_weights_formula():
    from nexusrt.reference.rng import GAMMA
    from nexusrt.reference.synthetic import TENSOR_MUL, tensor_key

    assert tensor_key(3, 5) == (3 * GAMMA + 5 * TENSOR_MUL) % 2**64
    assert tensor_key(0, 0) == 0
    with pytest.raises(ValueError, match="seed and tensor_index"):
        tensor_key(-1)


def test_launchers_reject_bad_input():
    with pytest.raises(ValueError, match="ids has dtype fp32, expected int32"):
        ew.embedding(FAKE_RT, tensor((2, 8), "fp32"), tensor((2,), "fp32"), tensor((10, 8), "bf16"), m=2, hidden=8, vocab=10)
    with pytest.raises(ValueError, match="weight has shape"):
        ew.rms_norm(FAKE_RT, tensor((4, 8), "fp32"), tensor((4, 8), "fp32"), tensor((9,), "fp32"), rows=4, cols=8)
    with pytest.raises(ValueError, match="rows would overlap"):
        ew.rms_norm(FAKE_RT, tensor(None, "fp32"), tensor(None, "fp32"), tensor((8,), "fp32"), rows=4, cols=8, group=2,
                    group_stride=8)
    with pytest.raises(ValueError, match="multiple of group"):
        ew.rms_norm(FAKE_RT, tensor(None, "fp32"), tensor(None, "fp32"), tensor((8,), "fp32"), rows=5, cols=8, group=2)
    with pytest.raises(ValueError, match="strides"):
        ew.silu_mul(FAKE_RT, tensor((2, 8), "fp32"), tensor(None, "fp32"), tensor(None, "fp32"), rows=2, cols=8, in_stride=4)
    with pytest.raises(ValueError, match="null device address"):
        ew.add(FAKE_RT, tensor((4,), "fp32", ptr=0), tensor((4,), "fp32"), tensor((4,), "fp32"), n=4)
    with pytest.raises(ValueError, match="out has dtype fp32, expected bf16"):
        ew.fill_uniform_bf16(FAKE_RT, tensor((4,), "fp32"), 4, seed=1, scale=1.0)


# -- GPU ----------------------------------------------------------------------------------------
def _dev(a):
    import nexusrt as nrt

    return nrt.memory.from_numpy(a)


def _go(rt, spec):
    spec.launch(rt.streams["compute"])


@pytest.mark.gpu
def test_embedding_reads_ids_from_device_memory(gpu_rt):
    from nexusrt.reference import ops

    rng = np.random.default_rng(0)
    vocab, h = 1000, 200
    table = rng.standard_normal((vocab, h), dtype=np.float32).astype(BF16)
    ids = np.array([0, 999, 123, 5, 123], np.int32)
    t_table, t_ids = _dev(table), _dev(ids)
    out = _dev(np.full((5, h), np.nan, np.float32))
    spec = ew.embedding(gpu_rt, out, t_ids, t_table, m=5, hidden=h, vocab=vocab)
    _go(gpu_rt, spec)
    np.testing.assert_array_equal(out.to_numpy(), ops.embedding(ids, table.astype(np.float32)))
    # Same launch spec, new id in device memory: the kernel follows the pointer (graph-safe).
    t_ids.copy_from(np.array([7, 8, 9, 10, 1000], np.int32))
    _go(gpu_rt, spec)
    got = out.to_numpy()
    np.testing.assert_array_equal(got[:4], table[[7, 8, 9, 10]].astype(np.float32))
    assert np.isnan(got[4]).all()  # out-of-range id: a NaN row, never a plausible one


@pytest.mark.gpu
@pytest.mark.parametrize("rows,cols", [(1, 2048), (3, 4096), (7, 100), (64, 64), (1, 5)])
def test_rms_norm_rows(gpu_rt, rows, cols):
    from nexusrt.reference import ops

    rng = np.random.default_rng(rows * cols)
    x = (3 * rng.standard_normal((rows, cols))).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(cols)).astype(np.float32)
    out = _dev(np.full((rows, cols), np.nan, np.float32))
    _go(gpu_rt, ew.rms_norm(gpu_rt, out, _dev(x), _dev(w), rows=rows, cols=cols, eps=1e-6))
    np.testing.assert_allclose(out.to_numpy(), ops.rms_norm(x, w, 1e-6), rtol=2e-6, atol=2e-6)
    tx = _dev(x)  # in place
    _go(gpu_rt, ew.rms_norm(gpu_rt, tx, tx, _dev(w), rows=rows, cols=cols, eps=1e-6))
    np.testing.assert_allclose(tx.to_numpy(), ops.rms_norm(x, w, 1e-6), rtol=2e-6, atol=2e-6)


@pytest.mark.gpu
def test_rms_norm_per_head_inside_fused_qkv(gpu_rt):
    """Qwen3 q/k norm: heads of q normalised in place inside a [T, (Hq + 2Hkv) * D] buffer."""
    from nexusrt.reference import ops

    t, hq, hkv, d = 3, 4, 2, 64
    width = (hq + 2 * hkv) * d
    rng = np.random.default_rng(9)
    qkv = rng.standard_normal((t, width)).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    buf = _dev(qkv)
    k_ptr = buf.ptr + hq * d * 4
    _go(gpu_rt, ew.rms_norm(gpu_rt, k_ptr, k_ptr, _dev(w), rows=t * hkv, cols=d, group=hkv, group_stride=width))
    want = qkv.copy()
    kpart = want[:, hq * d:(hq + hkv) * d].reshape(t, hkv, d)
    want[:, hq * d:(hq + hkv) * d] = ops.rms_norm(kpart, w, 1e-5).reshape(t, hkv * d)
    np.testing.assert_allclose(buf.to_numpy(), want, rtol=2e-6, atol=2e-6)  # q and v untouched


@pytest.mark.gpu
def test_silu_mul_on_fused_gate_up_rows(gpu_rt):
    from nexusrt.reference import ops

    rows, i = 3, 300
    rng = np.random.default_rng(1)
    gu = (4 * rng.standard_normal((rows, 2 * i))).astype(np.float32)
    buf = _dev(gu)
    out = _dev(np.full((rows, i), np.nan, np.float32))
    _go(gpu_rt, ew.silu_mul(gpu_rt, out, buf, buf.ptr + i * 4, rows=rows, cols=i, in_stride=2 * i))
    np.testing.assert_allclose(out.to_numpy(), ops.silu_mul(gu[:, :i], gu[:, i:]), rtol=3e-6, atol=1e-6)


@pytest.mark.gpu
def test_add_and_conversions(gpu_rt):
    rng = np.random.default_rng(2)
    n = 100_003
    a = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    ta, tb = _dev(a), _dev(b)
    _go(gpu_rt, ew.add(gpu_rt, ta, ta, tb, n=n))  # in place
    np.testing.assert_array_equal(ta.to_numpy(), a + b)
    out16 = _dev(np.zeros(n, BF16))
    _go(gpu_rt, ew.f32_to_bf16(gpu_rt, out16, tb, n=n))
    np.testing.assert_array_equal(out16.to_numpy().view(np.uint16), b.astype(BF16).view(np.uint16))
    back = _dev(np.full(n, np.nan, np.float32))
    _go(gpu_rt, ew.bf16_to_f32(gpu_rt, back, out16, n=n))
    np.testing.assert_array_equal(back.to_numpy(), b.astype(BF16).astype(np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("kind,tensor_index,n", [("linear", 3, 1_000_003), ("norm", 0, 4097), ("embed", 17, 65)])
def test_fill_uniform_matches_synthetic_weights_bit_for_bit(gpu_rt, kind, tensor_index, n):
    from nexusrt.reference.synthetic import KIND_PARAMS, synthetic_values

    center, scale = KIND_PARAMS[kind]
    seed = 1234
    out = _dev(np.zeros(n, BF16))
    _go(gpu_rt, ew.fill_uniform_bf16(gpu_rt, out, n, seed, scale, center, tensor_index=tensor_index))
    want = synthetic_values(seed, tensor_index, 0, n, kind).astype(BF16)
    np.testing.assert_array_equal(out.to_numpy().view(np.uint16), want.view(np.uint16))
