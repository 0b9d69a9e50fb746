"""The GEMM launcher: ``Y[M, N] = X[M, K] . W[N, K]^T`` with bf16 weights, for M >= 2 rows.

One launcher, two lowerings, chosen by the activation's dtype:

- **X bf16 — tensor cores** (what the model runs): cuBLASLt through
  :mod:`.cublaslt` (``lt=`` an :class:`~.cublaslt.LtContext`), Y fp32 or bf16, epilogues
  bias (of Y's dtype) and residual (fp32 Y, added in place: C = D, beta = 1). The input
  RMSNorm and SiLU*mul run as their own bf16 kernels (``elementwise.rms_norm_bf16``,
  ``silu_mul_bf16``). N and K multiples of 8.
- **X fp32 — CUDA cores**: ``cu/gemm.cu``, fp32 FMA in shared-memory tiles, with the same
  epilogues as :mod:`.gemv` (bias, residual, fused input RMSNorm via :func:`gemm_rstd`,
  gate_up: W [2I, K] -> Y[M, I] = silu(gate) * up). Any shape and alignment; kept as the
  oracle the tensor-core path is compared with, and as a row in the kernels benchmark.
"""

from __future__ import annotations

from .common import ceil_div, check_positive, check_tensor, dtype_name, epilogue_flags, ptr
from .cublaslt import Problem
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


class TensorCoreGemm:
    """One cuBLASLt GEMM bound to its operands; call it with a stream (a scheduler stage runs
    it as a host callable that enqueues, so it is captured into graphs like a kernel)."""

    def __init__(self, lt, problem: Problem, y, w, x, bias):
        self.lt, self.problem = lt, problem
        self.plan = lt.plan(problem)  # descriptors and the heuristic's choice, before any capture
        self.ptrs = (ptr(y), ptr(w), ptr(x), ptr(bias))
        p = problem
        self.name = f"cublaslt[{p.m}x{p.n}x{p.k}->{p.out}{'+bias' if p.bias else ''}{'+res' if p.residual else ''}]"

    def __call__(self, stream=None) -> None:
        handle = getattr(stream, "handle", stream)
        self.plan.run(self.lt, *self.ptrs, int(handle or 0))

    launch = __call__


def gemm(rt, y, w, x, *, m: int, n: int, k: int, bias=None, bias_dtype: str | None = None,
         residual=None, norm_weight=None, rstd=None, gate_up: bool = False, lt=None):
    """``y = x . w^T`` with optional epilogues: a :class:`TensorCoreGemm` when ``x`` is bf16,
    a :class:`LaunchSpec` of the FMA kernel when ``x`` is fp32.

    Tensor cores: ``x`` bf16 [m, k]; ``w`` bf16 [n, k]; ``y`` fp32 or bf16 [m, n]; ``bias``
    [n] of y's dtype; ``residual`` must be ``y`` itself (fp32); ``lt`` an LtContext.

    FMA: ``y`` fp32 [m, n]; ``w`` bf16 [n, k] ([2n, k] with ``gate_up``, n = I); ``x`` fp32
    [m, k]; ``bias`` [n] ([2n]); ``residual`` fp32 [m, n] (may be ``y``); ``norm_weight``
    fp32 [k] together with ``rstd`` fp32 [m] from :func:`gemm_rstd`.
    """
    check_positive(m=m, n=n, k=k)
    if dtype_name(getattr(x, "dtype", "fp32")) == "bf16":
        return _tensor_core(lt, y, w, x, m=m, n=n, k=k, bias=bias, bias_dtype=bias_dtype, residual=residual,
                            fused=norm_weight is not None or rstd is not None or gate_up)
    return _fma(rt, y, w, x, m=m, n=n, k=k, bias=bias, bias_dtype=bias_dtype, residual=residual,
                norm_weight=norm_weight, rstd=rstd, gate_up=gate_up)


def _tensor_core(lt, y, w, x, *, m, n, k, bias, bias_dtype, residual, fused) -> TensorCoreGemm:
    if fused:
        raise ValueError("the tensor-core GEMM has no fused norm or gate_up epilogue: run "
                         "elementwise.rms_norm_bf16 / silu_mul_bf16 around it")
    if lt is None:
        raise ValueError("a bf16 GEMM runs on cuBLASLt: pass lt= (a kernels.ops.cublaslt.LtContext)")
    out = dtype_name(getattr(y, "dtype", "fp32"))
    check_tensor(x, "x", (m, k), "bf16")
    check_tensor(w, "w", (n, k), "bf16")
    check_tensor(y, "y", (m, n), out)
    if residual is not None and ptr(residual) != ptr(y):
        raise ValueError("the tensor-core GEMM adds the residual in place: residual must be y itself")
    bias_name = None
    if bias is not None:
        bias_name = dtype_name(bias_dtype or getattr(bias, "dtype", None) or "")
        check_tensor(bias, "bias", (n,), bias_name)
    problem = Problem(m, n, k, out=out, bias=bias_name, residual=residual is not None)
    return TensorCoreGemm(lt, problem, y, w, x, bias)


def _fma(rt, y, w, x, *, m, n, k, bias, bias_dtype, residual, norm_weight, rstd, gate_up) -> LaunchSpec:
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
    """One layer's prefill GEMMs: on tensor cores (cuBLASLt, bf16 activations) for a 4096-row
    chunk, and on the FMA kernel (fp32 activations, the oracle) for ``tokens`` rows."""
    from .cublaslt import LtContext

    lt = LtContext(rt)
    try:
        cases = _tensor_core_cases(rt, config, lt, 4096) + _fma_cases(rt, config, tokens)
    except BaseException:
        lt.close()
        raise
    for c in cases[:1]:
        c.notes["_keep"] = (c.notes["_keep"], lt)  # freed (closed) with the cases
    return cases


def _tensor_core_cases(rt, config, lt, tokens: int) -> list[BenchCase]:
    from . import bench_util
    from .gemv import decode_shapes

    cases = []
    for name, n, k, opts in decode_shapes(config):
        if name == "lm_head":
            continue  # prefill computes logits for the last token only (a GEMV)
        residual = bool(opts.get("residual"))
        weights = bench_util.random_weights(rt, (n * (2 if opts.get("gate_up") else 1), k))
        rows = weights[0].shape[0]
        x = bench_util.random_bf16(rt, (tokens, k), seed=11)
        y = (bench_util.random_f32(rt, (tokens, rows), seed=12) if residual or name == "qkv"
             else bench_util.random_bf16(rt, (tokens, rows), seed=12))
        specs = [gemm(rt, y, w, x, m=tokens, n=rows, k=k, residual=y if residual else None, lt=lt) for w in weights]
        nbytes = rows * k * 2 + tokens * k * 2 + tokens * rows * y.itemsize * (2 if residual else 1)
        plan = specs[0].plan
        tuned = (f" [algo {plan.choice + 1} of {plan.count}, heuristic's first {plan.times_ms[0] * 1e3:.0f} us]"
                 if plan.times_ms else "")
        cases.append(BenchCase(f"cublaslt {name} {tokens}x{rows}x{k}{tuned}", nbytes, bench_util.rotate(specs),
                               group="gemm", notes={"flops": 2 * tokens * rows * k, "copies": len(weights),
                                                    "_keep": (weights, x, y)}))
    return cases


def _fma_cases(rt, config, tokens: int) -> list[BenchCase]:
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
        cases.append(BenchCase(f"fma gemm {name} {tokens}x{rows}x{k}", nbytes, bench_util.rotate(specs), group="gemm",
                               notes={"flops": 2 * tokens * rows * k, "copies": len(weights),
                                      "_keep": (weights, x, y)}))
    return cases
