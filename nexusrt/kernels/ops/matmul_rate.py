"""The bf16 matrix rate of this card, measured with cuBLASLt on random data: what the prefill's
compute floors are divided by (the counterpart of the membw probe's read bandwidth)."""

from __future__ import annotations

from .common import check_positive


def measure_matmul_rate(rt, lt, size: int = 8192, repeats: int = 10) -> float:
    """Median bf16 FLOP/s of cuBLASLt on a ``size``-cubed GEMM of random data on this card: the
    matrix rate floors are divided by (the counterpart of the membw probe)."""
    import statistics

    from ... import memory
    from .bench_util import time_ms
    from .elementwise import fill_uniform_bf16
    from .gemm import gemm

    check_positive(size=size, repeats=repeats)
    a = memory.empty((size, size), "bf16", tag="gemm_probe")
    b = memory.empty((size, size), "bf16", tag="gemm_probe")
    y = memory.empty((size, size), "bf16", tag="gemm_probe")
    try:
        stream = rt.streams["compute"]
        for i, t in enumerate((a, b)):  # random, never zeros: zeros run faster than real data
            fill_uniform_bf16(rt, t.reshape(size * size), size * size, 17, 1.0, tensor_index=i).launch(stream)
        mm = gemm(rt, y, b, a, m=size, n=size, k=size, lt=lt)
        ms = statistics.median(time_ms(rt, mm, repeats))
        return 2.0 * size ** 3 / (ms * 1e-3)
    finally:
        rt.device.synchronize()
        for t in (a, b, y):
            t.free()
