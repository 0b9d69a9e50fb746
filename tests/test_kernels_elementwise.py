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
def test_conversions(gpu_rt):
    rng = np.random.default_rng(2)
    n = 100_003
    b = rng.standard_normal(n).astype(np.float32)
    tb = _dev(b)
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
