"""Prefill GEMM launcher: ``Y[M, N] = X[M, K] . W[N, K]^T`` (fp32 X/Y, bf16 W, fp32 accumulate).

Same epilogues as :mod:`.gemv`: bias (bf16/fp32), residual (may alias Y), fused input
RMSNorm and gate_up (W [2I, K] -> Y[M, I] = silu(gate) * up). The fused norm needs the
per-row ``rstd`` first: launch :func:`gemm_rstd` into an fp32 [M] buffer, then :func:`gemm`
with ``norm_weight`` and that buffer. Any M, N, K and alignment.
"""

from __future__ import annotations

from .common import ceil_div, check_positive, check_tensor, epilogue_flags, ptr
from .spec import BenchCase, LaunchSpec

SOURCE = "gemm"
THREADS = 256
TILE_M, TILE_N = 64, 64
SIGNATURE = "ptr ptr ptr ptr ptr ptr ptr i32 i32 i32 i32"


def gemm_rstd(rt, rstd, x, *, m: int, k: int, eps: float = 1e-5) -> LaunchSpec:
    """``rstd[i] = 1 / sqrt(mean(x[i, :]^2) + eps)`` for the fused-norm GEMM (fp32 [m])."""
    check_positive(m=m, k=k)
    check_tensor(rstd, "rstd", (m,), "fp32")
    check_tensor(x, "x", (m, k), "fp32")
    kernel = rt.kernels.get(SOURCE, "gemm_row_rstd", "ptr ptr i32 i32 f32")
    return LaunchSpec(kernel, (ceil_div(m, THREADS // 32), 1, 1), (THREADS, 1, 1),
                      kernel.pack(ptr(rstd), ptr(x), m, k, float(eps)), name="gemm_row_rstd")


def gemm(rt, y, w, x, *, m: int, n: int, k: int, bias=None, bias_dtype: str | None = None,
         residual=None, norm_weight=None, rstd=None, gate_up: bool = False) -> LaunchSpec:
    """Launch spec for ``y = x . w^T`` with optional epilogues.

    ``y`` fp32 [m, n]; ``w`` bf16 [n, k] ([2n, k] with ``gate_up``, n = I); ``x`` fp32 [m, k];
    ``bias`` [n] ([2n]); ``residual`` fp32 [m, n] (may be ``y``); ``norm_weight`` fp32 [k]
    together with ``rstd`` fp32 [m] from :func:`gemm_rstd`.
    """
    check_positive(m=m, n=n, k=k)
    rows = 2 * n if gate_up else n
    check_tensor(y, "y", (m, n), "fp32")
    check_tensor(w, "w", (rows, k), "bf16")
    check_tensor(x, "x", (m, k), "fp32")
    if (norm_weight is None) != (rstd is None):
        raise ValueError("the fused norm needs both norm_weight and rstd (from gemm_rstd), or neither")
    flags = epilogue_flags(m=m, n=n, k=k, rows=rows, bias=bias, bias_dtype=bias_dtype, residual=residual,
                           norm_weight=norm_weight)
    if rstd is not None:
        check_tensor(rstd, "rstd", (m,), "fp32")
    name = "gemm_gateup" if gate_up else "gemm_rows"
    kernel = rt.kernels.get(SOURCE, name, SIGNATURE)
    cols = TILE_N // 2 if gate_up else TILE_N
    grid = (ceil_div(n, cols), ceil_div(m, TILE_M), 1)
    args = kernel.pack(ptr(y), ptr(x), ptr(w), ptr(bias), ptr(residual), ptr(norm_weight), ptr(rstd),
                       m, n, k, flags)
    return LaunchSpec(kernel, grid, (THREADS, 1, 1), args, 0, name=f"{name}[{m}x{n}x{k}]")


def bench_cases(rt, config, tokens: int = 256) -> list[BenchCase]:
    """Prefill GEMMs of one layer for a ``tokens``-token chunk (weights rotated past the L2)."""
    from . import bench_util
    from .gemv import decode_shapes

    cases = []
    for name, n, k, opts in decode_shapes(config):
        if name == "lm_head":
            continue  # prefill computes logits for the last token only (a GEMV)
        gate_up = opts.get("gate_up", False)
        rows = 2 * n if gate_up else n
        weights = bench_util.random_weights(rt, (rows, k))
        x = bench_util.random_f32(rt, (tokens, k), seed=11)
        y = bench_util.random_f32(rt, (tokens, n), seed=12)
        specs = [gemm(rt, y, w, x, m=tokens, n=n, k=k, gate_up=gate_up,
                      residual=y if opts.get("residual") else None) for w in weights]
        nbytes = rows * k * 2 + tokens * (k + n) * 4
        cases.append(BenchCase(f"gemm {name} {tokens}x{rows}x{k}", nbytes, bench_util.rotate(specs), group="gemm",
                               notes={"flops": 2 * tokens * rows * k, "copies": len(weights),
                                      "_keep": (weights, x, y)}))
    return cases
