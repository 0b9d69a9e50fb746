"""NumPy meaning of the GEMV/GEMM launchers, built from the CPU backend's ops (the oracle).

The GPU tests compare the kernels with these; they also document exactly what the fused
epilogues compute.
"""

from __future__ import annotations

import numpy as np


def linear_epilogue(w, x, *, bias=None, residual=None, norm_weight=None, eps: float = 1e-5,
                    gate_up: bool = False) -> np.ndarray:
    """``[rmsnorm](x) . w^T (+ bias)``, then ``silu(gate) * up`` for gate_up, then ``+ residual``.

    ``w`` [rows, K] (bf16 or fp32; gate rows then up rows for gate_up), ``x`` fp32 [M, K].
    """
    from ...backends.cpu import ops

    xx = ops.rms_norm(x, norm_weight, eps) if norm_weight is not None else x
    y = ops.linear(xx, np.asarray(w, dtype=np.float32), None if bias is None else np.asarray(bias, np.float32))
    if gate_up:
        i = w.shape[0] // 2
        y = ops.silu_mul(y[:, :i], y[:, i:])
    return y if residual is None else y + residual


def rel_error(out, ref) -> float:
    """``||out - ref|| / ||ref||`` in float64."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
