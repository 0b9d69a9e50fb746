"""Launcher for ``cu/gemv_rope.cu``: the one-sequence decode step's QKV projection with RoPE and
the KV append in the GEMV's epilogue (one launch instead of ``gemv`` + ``rope_append``).

Bit-identical to the two launches (same sums, bias adds and rotation in the same order); it
covers what most checkpoints need — head_dim 64 or 128, no per-head q/k RMSNorm, every KV
block in HBM, ``x`` small enough to stage unsplit — and :func:`unfused_reason` says why a step
outside that keeps the two launches. ``NEXUSRT_FUSE_ROPE=0`` turns the fusion off (for
comparisons in the same run).
"""

from __future__ import annotations

import os

from . import rope
from .common import check_aligned, check_positive, check_tensor, epilogue_flags, pdl_ok, ptr
from .gemv import THREADS, gemv_bytes, plan_gemv, resident_grid
from .spec import BenchCase, LaunchSpec

SOURCE = "gemv_rope"
SIGNATURE = "ptr ptr ptr ptr f32 i32 i32 ptr ptr ptr ptr ptr ptr i32 i32"
HEAD_DIMS = (64, 128)


def enabled() -> bool:
    """The fusion is on unless ``NEXUSRT_FUSE_ROPE=0``."""
    return os.environ.get("NEXUSRT_FUSE_ROPE", "1") != "0"


def unfused_reason(*, hidden: int, head_dim: int, q_norm=None, k_norm=None, host_pools=None) -> str | None:
    """Why a decode step of this shape keeps ``gemv`` + ``rope_append`` (None: it can fuse)."""
    if head_dim not in HEAD_DIMS:
        return f"head_dim {head_dim} (the fused kernel has {HEAD_DIMS})"
    if q_norm is not None or k_norm is not None:
        return "per-head q/k RMSNorm (a reduction over the head)"
    if host_pools is not None:
        return "a host KV tier (rope_append's _host twin writes host blocks zero-copy)"
    plan = plan_gemv(1, hidden, 1, gate_up=True)
    if plan.vec != 8 or plan.splits != 1:
        return f"hidden {hidden} (needs a multiple of 8 that fits shared memory unsplit)"
    return None


def qkv_rope(rt, q_out, k_pool, v_pool, block_table, pos, w, x, inv_freq, *, num_q_heads: int,
             num_kv_heads: int, head_dim: int, norm_weight, eps: float, bias=None,
             bias_dtype: str | None = None) -> LaunchSpec:
    """Launch spec for ``q_out, K/V[*pos] = RoPE(W . rmsnorm(x) + bias)`` of one token.

    ``w`` bf16 ``[(Hq + 2*Hkv) * D, K]`` (q rows, then k, then v); ``x`` fp32 ``[1, K]``;
    ``norm_weight`` fp32 ``[K]`` (the input RMSNorm); ``bias`` ``[(Hq + 2*Hkv) * D]`` or None;
    ``q_out`` fp32 ``[1, Hq, D]``; ``k_pool``/``v_pool`` this layer's paged cache, written at
    slot ``*pos`` through ``block_table``; ``inv_freq`` fp32 ``[D/2]``.
    """
    check_positive(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    shape = getattr(x, "shape", None)
    if not shape or len(shape) != 2:
        raise ValueError(f"x must be a 2-d fp32 tensor [1, hidden], got shape {shape}")
    k = int(shape[-1])
    why = unfused_reason(hidden=k, head_dim=head_dim)
    if why is not None:
        raise ValueError(f"qkv_rope cannot take {why}; use gemv + rope_append")
    rows = (num_q_heads + 2 * num_kv_heads) * head_dim
    check_tensor(x, "x", (1, k), "fp32")
    check_tensor(w, "w", (rows, k), "bf16")
    if norm_weight is None:
        raise ValueError("qkv_rope needs norm_weight (the input RMSNorm is part of the fused launch)")
    flags = epilogue_flags(m=1, n=rows, k=k, rows=rows, bias=bias, bias_dtype=bias_dtype, residual=None,
                           norm_weight=norm_weight)
    rope.check_outputs(q_out, k_pool, v_pool, block_table, pos, inv_freq, m=1, num_q_heads=num_q_heads,
                       num_kv_heads=num_kv_heads, head_dim=head_dim)
    for t, name in ((w, "w"), (x, "x"), (norm_weight, "norm_weight")):
        check_aligned(t, name, 16)
    tasks = rows // 2  # one rotate_half pair of one head per warp
    plan = plan_gemv(tasks, k, 1, gate_up=True)
    kernel = rt.kernels.get(SOURCE, f"gemv_qkv_rope_d{head_dim}", SIGNATURE)
    grid_x = resident_grid(rt, kernel, plan.shared, tasks)
    args = kernel.pack(ptr(w), ptr(x), ptr(bias), ptr(norm_weight), float(eps), k, flags, ptr(inv_freq), ptr(pos),
                       ptr(block_table), ptr(q_out), ptr(k_pool), ptr(v_pool), num_q_heads, num_kv_heads)
    return LaunchSpec(kernel, (grid_x, 1, 1), (THREADS, 1, 1), args, plan.shared,
                      name=f"gemv_qkv_rope_d{head_dim}[{rows}x{k}]", pdl=pdl_ok(rt))


def bench_cases(rt, config) -> list[BenchCase]:
    """The fused QKV + RoPE + append of one decode token at position 1000, weights rotated so
    the L2 never holds them (compare with ``gemv qkv`` + ``rope_append`` of the same run)."""
    from . import bench_util

    hq, hkv, d, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    if unfused_reason(hidden=h, head_dim=d) is not None:
        return []
    rows = (hq + 2 * hkv) * d
    weights = bench_util.random_weights(rt, (rows, h))
    t = dict(x=bench_util.random_f32(rt, (1, h), seed=1),
             norm_weight=bench_util.random_f32(rt, (h,), seed=3, offset=1.0), **rope.bench_cache(config))
    specs = [qkv_rope(rt, w=w, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, eps=float(config.rms_norm_eps), **t)
             for w in weights]
    return [BenchCase(f"gemv qkv+rope {rows}x{h}", gemv_bytes(rows, h, norm=True), bench_util.rotate(specs),
                      group="gemv", notes={"copies": len(weights), "_keep": (weights, tuple(t.values()))})]
