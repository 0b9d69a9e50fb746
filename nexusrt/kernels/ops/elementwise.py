"""Launchers for ``cu/elementwise.cu``: embedding, bf16 RMSNorm rows and SiLU*mul, conversions, fill.

The residual stream is fp32; ``rms_norm_bf16`` and ``silu_mul_bf16`` write the bf16 operands
of the prefill's tensor-core GEMMs. Every launcher checks its shapes and returns a
:class:`LaunchSpec`.
"""

from __future__ import annotations

import numpy as np

from ...reference.synthetic import tensor_key
from .common import ceil_div, check_positive, check_tensor, pdl_ok, ptr, sm_count
from .spec import BenchCase, LaunchSpec

SOURCE = "elementwise"
THREADS = 256

_SIGS = {
    "embedding": "ptr ptr ptr i32 i32 i32",
    "rms_norm_bf16": "ptr ptr ptr i32 i32 f32",
    "silu_mul_bf16": "ptr ptr i32 i32",
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
    """The elementwise kernel a decode step still launches: the embedding row (the decode step's
    norms and SiLU*mul are fused into the GEMVs).

    The inputs are made here with this module's own fill kernel rather than with
    :mod:`.bench_util`, which fills its bf16 inputs with that kernel: no import circle.
    """
    from ... import memory

    h = config.hidden_size
    vocab = config.vocab_size
    stream = rt.streams["compute"]
    table = memory.empty((vocab, h), "bf16", tag="bench")
    fill_uniform_bf16(rt, table.reshape(vocab * h), vocab * h, 7, 0.02).launch(stream)
    stream.synchronize()
    ids = memory.from_numpy(np.asarray([vocab // 3], dtype=np.int32), tag="bench")
    out = memory.empty((1, h), "fp32", tag="bench")
    emb = embedding(rt, out, ids, table, m=1, hidden=h, vocab=vocab)
    keep = {"_keep": (table, ids, out)}
    return [BenchCase(f"embedding 1x{h}", h * 2 + h * 4 + 4, emb.launch, group="elementwise", notes=keep)]
