"""Launchers for ``cu/elementwise.cu``: embedding, RMSNorm rows, SiLU*mul, add, conversions, fill.

The residual stream is fp32; ``rms_norm_bf16`` and ``silu_mul_bf16`` write the bf16 operands
of the prefill's tensor-core GEMMs. Every launcher checks its shapes and returns a
:class:`LaunchSpec`.
"""

from __future__ import annotations

from ...reference.synthetic import tensor_key
from .common import ceil_div, check_positive, check_tensor, pdl_ok, ptr, sm_count
from .spec import BenchCase, LaunchSpec

SOURCE = "elementwise"
THREADS = 256

_SIGS = {
    "embedding": "ptr ptr ptr i32 i32 i32",
    "rms_norm": "ptr ptr ptr i32 i32 i32 i64 f32",
    "silu_mul": "ptr ptr ptr i32 i32 i64 i64",
    "rms_norm_bf16": "ptr ptr ptr i32 i32 f32",
    "silu_mul_bf16": "ptr ptr i32 i32",
    "add_f32": "ptr ptr ptr i64",
    "f32_to_bf16": "ptr ptr i64",
    "bf16_to_f32": "ptr ptr i64",
    "fill_uniform_bf16": "ptr u64 u64 f32 f32",
}


def _spec(rt, name: str, grid, block, *args) -> LaunchSpec:
    kernel = rt.kernels.get(SOURCE, name, _SIGS[name])
    return LaunchSpec(kernel, grid, block, kernel.pack(*args), 0, name=name)


def _grid_1d(rt, n: int) -> int:
    """Blocks for a grid-stride loop over n elements: enough to fill the chip, no more."""
    return max(1, min(ceil_div(n, THREADS), sm_count(rt) * 8))


def embedding(rt, out, ids, table, *, m: int, hidden: int, vocab: int) -> LaunchSpec:
    """``out[i, :] = table[ids[i], :]`` as fp32 for i < m; ``ids`` int32 [m] in device memory.

    An id outside ``[0, vocab)`` writes a NaN row (never silently a wrong row).
    """
    check_positive(m=m, hidden=hidden, vocab=vocab)
    check_tensor(out, "out", (m, hidden), "fp32")
    check_tensor(ids, "ids", (m,), "int32")
    check_tensor(table, "table", (vocab, hidden), "bf16")
    gx = max(1, min(ceil_div(hidden, THREADS), 64))
    spec = _spec(rt, "embedding", (gx, m, 1), (THREADS, 1, 1), ptr(out), ptr(ids), ptr(table), m, hidden, vocab)
    spec.pdl = pdl_ok(rt)  # the kernel waits before reading ids (cu/pdl.cuh)
    return spec


def rms_norm(rt, out, x, weight, *, rows: int, cols: int, eps: float = 1e-5, group: int = 1,
             group_stride: int | None = None) -> LaunchSpec:
    """RMSNorm of ``rows`` rows of length ``cols`` (fp32 in/out, fp32 weight [cols]); out may be x.

    Row ``r`` starts at ``(r // group) * group_stride + (r % group) * cols``: the default
    (``group=1``) is plain contiguous rows; per-head q/k norm inside a fused QKV buffer of
    width W uses ``rows = tokens * heads, cols = head_dim, group = heads, group_stride = W``
    (with ``x``/``out`` pointing at the first q or k head).
    """
    check_positive(rows=rows, cols=cols, group=group)
    if group_stride is None:
        group_stride = group * cols
    if group_stride < group * cols:
        raise ValueError(f"group_stride {group_stride} is smaller than group * cols = {group * cols}: rows would overlap")
    if rows % group:
        raise ValueError(f"rows ({rows}) must be a multiple of group ({group})")
    # Strided (per-head) rows usually point into a larger buffer: only plain rows have a shape to check.
    shape = (rows, cols) if group == 1 and group_stride == cols else None
    check_tensor(x, "x", shape, "fp32")
    check_tensor(out, "out", shape, "fp32")
    check_tensor(weight, "weight", (cols,), "fp32")
    warps = THREADS // 32
    return _spec(rt, "rms_norm", (ceil_div(rows, warps), 1, 1), (THREADS, 1, 1), ptr(out), ptr(x), ptr(weight),
                 rows, cols, group, int(group_stride), float(eps))


def _check_vector_cols(cols: int, what: str) -> None:
    if cols % 8:
        raise ValueError(f"{what} reads rows in 16-byte vectors: cols must be a multiple of 8, got {cols}")


def rms_norm_bf16(rt, out, x, weight, *, rows: int, cols: int, eps: float = 1e-5) -> LaunchSpec:
    """RMSNorm of fp32 rows ``x`` [rows, cols] into bf16 rows ``out`` (the next GEMM's operand),
    with fp32 ``weight`` [cols]; computed in fp32, rounded once. ``cols`` a multiple of 8."""
    check_positive(rows=rows, cols=cols)
    _check_vector_cols(cols, "rms_norm_bf16")
    check_tensor(out, "out", (rows, cols), "bf16")
    check_tensor(x, "x", (rows, cols), "fp32")
    check_tensor(weight, "weight", (cols,), "fp32")
    return _spec(rt, "rms_norm_bf16", (ceil_div(rows, THREADS // 32), 1, 1), (THREADS, 1, 1), ptr(out), ptr(x),
                 ptr(weight), rows, cols, float(eps))


def silu_mul_bf16(rt, out, gate_up, *, rows: int, cols: int) -> LaunchSpec:
    """``out[r, c] = silu(gate_up[r, c]) * gate_up[r, cols + c]``, bf16 in and out (the fused
    gate_up GEMM's output [rows, 2 * cols] -> the down GEMM's operand [rows, cols])."""
    check_positive(rows=rows, cols=cols)
    _check_vector_cols(cols, "silu_mul_bf16")
    check_tensor(out, "out", (rows, cols), "bf16")
    check_tensor(gate_up, "gate_up", (rows, 2 * cols), "bf16")
    gx = max(1, min(ceil_div(cols // 8, THREADS), 64))
    return _spec(rt, "silu_mul_bf16", (gx, rows, 1), (THREADS, 1, 1), ptr(out), ptr(gate_up), rows, cols)


def silu_mul(rt, out, gate, up, *, rows: int, cols: int, in_stride: int | None = None,
             out_stride: int | None = None) -> LaunchSpec:
    """``out[r, c] = silu(gate[r, c]) * up[r, c]`` (fp32) with row strides.

    For the fused gate_up output [rows, 2I]: ``gate = buf``, ``up = buf + I`` (address),
    ``cols = I``, ``in_stride = 2I``.
    """
    check_positive(rows=rows, cols=cols)
    in_stride = cols if in_stride is None else in_stride
    out_stride = cols if out_stride is None else out_stride
    if in_stride < cols or out_stride < cols:
        raise ValueError(f"strides ({in_stride}, {out_stride}) must be >= cols ({cols})")
    check_tensor(out, "out", (rows, cols) if out_stride == cols else None, "fp32")
    check_tensor(gate, "gate", None, "fp32")
    check_tensor(up, "up", None, "fp32")
    gx = max(1, min(ceil_div(cols, THREADS), 64))
    return _spec(rt, "silu_mul", (gx, rows, 1), (THREADS, 1, 1), ptr(out), ptr(gate), ptr(up), rows, cols,
                 int(in_stride), int(out_stride))


def add(rt, out, a, b, *, n: int) -> LaunchSpec:
    """``out = a + b`` over n fp32 elements; out may alias a or b."""
    check_positive(n=n)
    for t, name in ((out, "out"), (a, "a"), (b, "b")):
        check_tensor(t, name, (n,), "fp32")
    return _spec(rt, "add_f32", (_grid_1d(rt, n), 1, 1), (THREADS, 1, 1), ptr(out), ptr(a), ptr(b), n)


def f32_to_bf16(rt, out, x, *, n: int) -> LaunchSpec:
    """``out`` (bf16) = round-to-nearest-even of ``x`` (fp32), n elements."""
    check_positive(n=n)
    check_tensor(out, "out", (n,), "bf16")
    check_tensor(x, "x", (n,), "fp32")
    return _spec(rt, "f32_to_bf16", (_grid_1d(rt, n), 1, 1), (THREADS, 1, 1), ptr(out), ptr(x), n)


def bf16_to_f32(rt, out, x, *, n: int) -> LaunchSpec:
    """``out`` (fp32) = ``x`` (bf16), n elements (exact)."""
    check_positive(n=n)
    check_tensor(out, "out", (n,), "fp32")
    check_tensor(x, "x", (n,), "bf16")
    return _spec(rt, "bf16_to_f32", (_grid_1d(rt, n), 1, 1), (THREADS, 1, 1), ptr(out), ptr(x), n)


def fill_uniform_bf16(rt, out, n: int, seed: int, scale: float, offset: float = 0.0, *,
                      tensor_index: int = 0) -> LaunchSpec:
    """Fill ``out`` (bf16 [n]) with ``bf16(offset + scale * x)``, x uniform in [-1, 1).

    Bit-identical to ``synthetic_values(seed, tensor_index, 0, n, kind)`` rounded to bf16
    (:mod:`nexusrt.reference.synthetic`) when ``(offset, scale)`` are that kind's parameters, so
    synthetic weights are generated on the device instead of copied from the host.
    """
    check_positive(n=n)
    check_tensor(out, "out", (n,), "bf16")
    key = tensor_key(seed, tensor_index)
    return _spec(rt, "fill_uniform_bf16", (_grid_1d(rt, n), 1, 1), (THREADS, 1, 1), ptr(out), n, key,
                 float(scale), float(offset))


def bench_cases(rt, config) -> list[BenchCase]:
    """The elementwise kernels a decode step still launches: embedding and a hidden-size norm."""
    from . import bench_util

    h = config.hidden_size
    vocab = config.vocab_size
    table = bench_util.random_weights(rt, (vocab, h), min_copies=1)[0]
    ids = bench_util.ints(rt, [vocab // 3])
    out = bench_util.random_f32(rt, (1, h), seed=4)
    x = bench_util.random_f32(rt, (1, h), seed=5)
    w = bench_util.random_f32(rt, (h,), seed=6, offset=1.0)
    emb = embedding(rt, out, ids, table, m=1, hidden=h, vocab=vocab)
    norm = rms_norm(rt, out, x, w, rows=1, cols=h, eps=1e-5)
    keep = {"_keep": (table, ids, out, x, w)}
    return [
        BenchCase(f"embedding 1x{h}", h * 2 + h * 4 + 4, emb.launch, group="elementwise", notes=keep),
        BenchCase(f"rms_norm 1x{h}", 2 * h * 4 + h * 4, norm.launch, group="elementwise", notes=keep),
    ]
