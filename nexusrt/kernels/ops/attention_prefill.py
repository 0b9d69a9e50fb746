"""Launcher for ``cu/attention_prefill.cu``: causal attention of a chunk of M prompt rows
at positions ``*pos .. *pos + M - 1`` over the paged cache (keys ``0 .. *pos + M - 1``)."""

from __future__ import annotations

import math

from .common import ceil_div, check_positive, check_tensor, ptr
from .rope import check_pools, check_state
from .spec import LaunchSpec

SOURCE = "attention_prefill"
SIGNATURE = "ptr ptr ptr ptr ptr ptr i32 i32 i32 f32"
HEAD_DIMS = (64, 128)
ROWS_PER_BLOCK = 16  # (row, head-in-group) pairs per block, kRows in the kernel
THREADS = 128


def attention_prefill(rt, q, out, k_pool, v_pool, page_table, pos, *, num_q_heads: int,
                      num_kv_heads: int, head_dim: int, scale: float | None = None) -> LaunchSpec:
    """Launch spec: ``q`` fp32 ``[M, Hq, D]`` -> ``out`` fp32 ``[M, Hq * D]``.

    The chunk's own K and V must already be in the pools (rope_append first). ``scale``
    defaults to ``1/sqrt(D)``.
    """
    check_positive(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"attention_prefill supports head_dim in {HEAD_DIMS}, got {head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    shape = getattr(q, "shape", None)
    if shape is None or len(shape) != 3:
        raise ValueError(f"q must be a 3-d tensor [M, {num_q_heads}, {head_dim}], got shape {shape}")
    m = int(shape[0])
    check_tensor(q, "q", (m, num_q_heads, head_dim), "fp32")
    check_tensor(out, "out", (m, num_q_heads * head_dim), "fp32")
    check_pools(k_pool, v_pool, num_kv_heads, head_dim)
    check_state(page_table, pos)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    group = num_q_heads // num_kv_heads
    name = f"attention_prefill_d{head_dim}"
    kernel = rt.kernels.get(SOURCE, name, SIGNATURE)
    args = kernel.pack(ptr(q), ptr(out), ptr(k_pool), ptr(v_pool), ptr(page_table), ptr(pos), m,
                       num_q_heads, num_kv_heads, scale)
    grid = (ceil_div(m * group, ROWS_PER_BLOCK), num_kv_heads, 1)
    return LaunchSpec(kernel, grid, (THREADS, 1, 1), args, 0, name)
