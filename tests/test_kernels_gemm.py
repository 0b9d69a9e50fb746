"""Prefill GEMM: launcher checks on the CPU, the tiled kernel against the NumPy oracle on the GPU."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from nexusrt.kernels.ops.gemm import gemm, gemm_rstd
from nexusrt.reference.ops import linear_epilogue, rel_error

from fakes import FakeRuntime, tensor

BF16 = ml_dtypes.bfloat16
FAKE_RT = FakeRuntime()


def test_gemm_launcher_rejects_bad_shapes():
    y, w, x = tensor((16, 64), "fp32"), tensor((64, 32), "bf16"), tensor((16, 32), "fp32")
    with pytest.raises(ValueError, match="w has shape"):
        gemm(FAKE_RT, y, w, x, m=16, n=64, k=32, gate_up=True)  # gate_up needs [2n, k]
    with pytest.raises(ValueError, match="needs both norm_weight and rstd"):
        gemm(FAKE_RT, y, w, x, m=16, n=64, k=32, norm_weight=tensor((32,), "fp32"))
    with pytest.raises(ValueError, match="residual has shape"):
        gemm(FAKE_RT, y, w, x, m=16, n=64, k=32, residual=tensor((16, 63), "fp32"))
    with pytest.raises(ValueError, match="m must be a positive int"):
        gemm(FAKE_RT, y, w, x, m=0, n=64, k=32)
    with pytest.raises(ValueError, match="rstd has shape"):
        gemm_rstd(FAKE_RT, tensor((15,), "fp32"), x, m=16, k=32)


def _run(rt, w, x, *, bias=None, residual=None, in_place=False, norm_weight=None, gate_up=False, eps=1e-5):
    import nexusrt as nrt

    m, k = x.shape
    n = w.shape[0] // (2 if gate_up else 1)
    keep = []

    def dev(a):
        t = nrt.memory.from_numpy(a)
        keep.append(t)
        return t

    stream = rt.streams["compute"]
    tx = dev(x)
    rstd = None
    if norm_weight is not None:
        rstd = dev(np.full(m, np.nan, np.float32))
        gemm_rstd(rt, rstd, tx, m=m, k=k, eps=eps).launch(stream)
    y = dev(residual.copy() if in_place else np.full((m, n), np.nan, np.float32))
    gemm(rt, y, dev(w), tx, m=m, n=n, k=k, gate_up=gate_up, bias=None if bias is None else dev(bias),
         residual=y if in_place else (None if residual is None else dev(residual)),
         norm_weight=None if norm_weight is None else dev(norm_weight), rstd=rstd).launch(stream)
    out = y.to_numpy()
    for t in keep:
        t.free()
    return out


def _inputs(rows, k, m, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, k), dtype=np.float32) * np.float32(0.05)).astype(BF16)
    return w, rng.standard_normal((m, k), dtype=np.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (5, 17, 33), (64, 64, 64), (65, 130, 97), (200, 300, 520),
                                   (32, 3072, 2048), (130, 2048, 8192)])
def test_gemm_matches_oracle(gpu_rt, m, n, k):
    w, x = _inputs(n, k, m, seed=m * 7 + n + k)
    out = _run(gpu_rt, w, x)
    assert not np.isnan(out).any()
    assert rel_error(out, linear_epilogue(w, x)) < 3e-5


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(7, 45, 70), (100, 96, 256)])
def test_gemm_epilogues(gpu_rt, m, n, k):
    rng = np.random.default_rng(n)
    w, x = _inputs(n, k, m, seed=n)
    for bias in (rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(BF16)):
        assert rel_error(_run(gpu_rt, w, x, bias=bias), linear_epilogue(w, x, bias=bias)) < 3e-5
    res = rng.standard_normal((m, n)).astype(np.float32)
    for in_place in (False, True):
        assert rel_error(_run(gpu_rt, w, x, residual=res, in_place=in_place), linear_epilogue(w, x, residual=res)) < 3e-5
    norm_w = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32)
    xs = x * np.float32(5.0)
    assert rel_error(_run(gpu_rt, w, xs, norm_weight=norm_w), linear_epilogue(w, xs, norm_weight=norm_w)) < 3e-5


@pytest.mark.gpu
@pytest.mark.parametrize("m,i,k", [(3, 20, 40), (70, 100, 130), (64, 512, 2048)])
def test_gemm_gate_up(gpu_rt, m, i, k):
    rng = np.random.default_rng(i)
    w, x = _inputs(2 * i, k, m, seed=i + 1)
    norm_w = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32)
    out = _run(gpu_rt, w, x, gate_up=True, norm_weight=norm_w)
    assert rel_error(out, linear_epilogue(w, x, gate_up=True, norm_weight=norm_w)) < 3e-5
