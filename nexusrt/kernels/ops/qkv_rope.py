"""Launcher for ``cu/gemv_rope.cu``: the one-sequence decode step's QKV projection with RoPE and
the KV append in the GEMV's epilogue (one launch instead of ``gemv`` + ``rope_append``).

Bit-identical to the two launches (same sums, bias adds and rotation in the same order); it
covers what most checkpoints need — head_dim 64 or 128, no per-head q/k RMSNorm, every KV
block in HBM, ``x`` small enough to stage unsplit — and :func:`unfused_reason` says why a step
outside that keeps the two launches. ``NEXUSRT_FUSE_ROPE=0`` turns the fusion off (for
comparisons in the same run).

Two depths of the kernel's loop (``DEPTHS``): 4 loads per lane and row in flight (two blocks
per SM) or 2 (three blocks per SM). The launcher takes the one that covers the shape's pair
tasks in fewer waves of resident warps, the deeper on a tie; ``NEXUSRT_QKV_ROPE_DEPTH=4|2``
pins one (for comparisons in the same run). Both give the same bits.
"""

from __future__ import annotations

import os

from . import gemv_ring, rope
from .common import ceil_div, check_aligned, check_positive, check_tensor, epilogue_flags, pdl_ok, ptr
from .gemv import THREADS, WARPS, gemv_bytes, plan_gemv, resident_grid
from .spec import BenchCase, LaunchSpec

SOURCE = "gemv_rope"
SIGNATURE = "ptr ptr ptr ptr f32 i32 i32 ptr ptr ptr ptr ptr ptr i32 i32"
RING_SIGNATURE = SIGNATURE + " i32"  # gemv_qkv_rope_ring_d<D>: + stages
HEAD_DIMS = (64, 128)
DEPTHS = (4, 2)  # 16-byte loads per lane and row per step; the first is the default on a tie
DEPTH_ENV = "NEXUSRT_QKV_ROPE_DEPTH"


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


def kernel_name(head_dim: int, depth: int) -> str:
    """The entry point of ``gemv_rope.cu`` for this head_dim and loop depth."""
    return f"gemv_qkv_rope_d{head_dim}" if depth == DEPTHS[0] else f"gemv_qkv_rope_u{depth}_d{head_dim}"


def _depths(depth: int | None) -> tuple[int, ...]:
    """The depths to choose from: ``depth`` if given, else the environment's pin, else all."""
    if depth is None:
        pinned = os.environ.get(DEPTH_ENV, "").strip()
        if not pinned:
            return DEPTHS
        if pinned not in {str(d) for d in DEPTHS}:
            raise ValueError(f"{DEPTH_ENV}={pinned!r}: expected one of {', '.join(map(str, DEPTHS))} or unset")
        depth = int(pinned)
    if depth not in DEPTHS:
        raise ValueError(f"qkv_rope depth must be one of {DEPTHS}, got {depth!r}")
    return (depth,)


def _choose_kernel(rt, head_dim: int, shared: int, tasks: int, depth: int | None):
    """(kernel, grid.x) of the depth whose resident warps cover ``tasks`` in the fewest waves."""
    best = None
    for d in _depths(depth):
        kernel = rt.kernels.get(SOURCE, kernel_name(head_dim, d), SIGNATURE)
        grid_x = resident_grid(rt, kernel, shared, tasks)
        waves = ceil_div(tasks, grid_x * WARPS)
        if best is None or waves < best[0]:
            best = (waves, kernel, grid_x)
    return best[1], best[2]


def qkv_rope(rt, q_out, k_pool, v_pool, block_table, pos, w, x, inv_freq, *, num_q_heads: int,
             num_kv_heads: int, head_dim: int, norm_weight, eps: float, bias=None,
             bias_dtype: str | None = None, depth: int | None = None, ring: bool | None = None) -> LaunchSpec:
    """Launch spec for ``q_out, K/V[*pos] = RoPE(W . rmsnorm(x) + bias)`` of one token.

    ``w`` bf16 ``[(Hq + 2*Hkv) * D, K]`` (q rows, then k, then v); ``x`` fp32 ``[1, K]``;
    ``norm_weight`` fp32 ``[K]`` (the input RMSNorm); ``bias`` ``[(Hq + 2*Hkv) * D]`` or None;
    ``q_out`` fp32 ``[1, Hq, D]``; ``k_pool``/``v_pool`` this layer's paged cache, written at
    slot ``*pos`` through ``block_table``; ``inv_freq`` fp32 ``[D/2]``; ``depth`` one of
    ``DEPTHS`` to pin the loop's depth (None: the environment's pin, else chosen by waves).
    ``ring`` True (or None with ``NEXUSRT_GEMV_RING=1``) runs the bulk-copy ring kernel instead where
    it applies (gemv_ring.py) unless a depth is pinned (argument or environment); same bits.
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
    operands = (ptr(w), ptr(x), ptr(bias), ptr(norm_weight), float(eps), k, flags, ptr(inv_freq), ptr(pos),
                ptr(block_table), ptr(q_out), ptr(k_pool), ptr(v_pool), num_q_heads, num_kv_heads)
    pinned = _depths(depth) != DEPTHS  # an argument or the environment names one depth
    stages = None if pinned else gemv_ring.stages_for(rt, k, ring)
    if stages is not None:
        kernel = rt.kernels.get(SOURCE, f"gemv_qkv_rope_ring_d{head_dim}", RING_SIGNATURE)
        shared = gemv_ring.shared_bytes(k, stages)
        grid_x = resident_grid(rt, kernel, shared, tasks)
        args = kernel.pack(*operands, stages)
    else:
        shared = plan_gemv(tasks, k, 1, gate_up=True).shared
        kernel, grid_x = _choose_kernel(rt, head_dim, shared, tasks, depth)
        args = kernel.pack(*operands)
    return LaunchSpec(kernel, (grid_x, 1, 1), (THREADS, 1, 1), args, shared,
                      name=f"{kernel.name}[{rows}x{k}]", pdl=pdl_ok(rt))


def bench_cases(rt, config) -> list[BenchCase]:
    """The fused QKV + RoPE + append of one decode token at position 1000, weights rotated so
    the L2 never holds them (compare with ``gemv qkv`` + ``rope_append`` of the same run): the
    depth the decode step takes, then each other depth, named by its depth."""
    from . import bench_util

    hq, hkv, d, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
    if unfused_reason(hidden=h, head_dim=d) is not None:
        return []
    rows = (hq + 2 * hkv) * d
    weights = bench_util.random_weights(rt, (rows, h))
    t = dict(x=bench_util.random_f32(rt, (1, h), seed=1),
             norm_weight=bench_util.random_f32(rt, (h,), seed=3, offset=1.0), **rope.bench_cache(config))
    cases, seen = [], set()
    # The kernel the decode step takes, then the ring (where it applies) and each register depth.
    for depth, ring in [(None, None), (None, True)] + [(dp, False) for dp in DEPTHS]:
        specs = [qkv_rope(rt, w=w, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, eps=float(config.rms_norm_eps),
                          depth=depth, ring=ring, **t) for w in weights]
        name = specs[0].kernel.name
        if name in seen:
            continue
        seen.add(name)
        label = "" if ring is None else " (ring)" if ring else f" (depth {depth})"
        cases.append(BenchCase(f"gemv qkv+rope {rows}x{h}{label}", gemv_bytes(rows, h, norm=True),
                               bench_util.rotate(specs), group="gemv",
                               notes={"copies": len(weights), "kernel": name,
                                      "_keep": (weights, tuple(t.values()))}))
    return cases
