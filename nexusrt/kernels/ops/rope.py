"""Launcher for ``cu/rope.cu``: per-head q/k norm, RoPE, and the append of K and V to the
paged cache of one layer, for M consecutive positions starting at ``*pos`` (device).

The kernel reads the position from device memory, so one captured launch serves every
decode step; everything else (pointers, head counts, eps) is fixed at capture.
"""

from __future__ import annotations

import numpy as np

from ...kvcache.blocks import pool_shape
from ...kvcache.checks import HOST_TAIL, check_host_pools, check_pools, check_rows, check_state, host_args
from .common import ceil_div, check_positive, check_tensor, pdl_ok, ptr
from .spec import BenchCase, LaunchSpec

SOURCE = "rope"
SIGNATURE = "ptr ptr ptr ptr ptr ptr ptr ptr ptr f32 i32 i32 i32"
ROWS_SIGNATURE = SIGNATURE + " i32"
HEAD_DIMS = (64, 128, 256)
HEADS_PER_BLOCK = 4  # one warp per head, kWarps in rope.cu


def rope_append(rt, qkv, q_out, k_pool, v_pool, block_table, pos, inv_freq, *, num_q_heads: int,
                num_kv_heads: int, head_dim: int, q_norm=None, k_norm=None,
                eps: float = 1e-6, rows: bool = False, host_pools=None) -> LaunchSpec:
    """Launch spec for RoPE + KV append of ``M = qkv.shape[0]`` rows.

    Parameters
    ----------
    qkv : fp32 ``[M, (Hq + 2*Hkv) * D]``, the fused QKV projection (bias added).
    q_out : fp32 ``[M, Hq, D]``: the normed, rotated queries.
    k_pool, v_pool : bf16 ``[num_blocks, Hkv, BLOCK_SIZE, D]``, this layer's cache.
    block_table : int32 ``[max_blocks]``: logical KV block -> physical block (covers *pos + M - 1).
    pos : int32 device word; row m is position ``*pos + m``.
    rows : the batched step of many sequences: ``block_table`` is int32 ``[S, W]`` (one table
        per row of it) and ``pos`` is int32 ``[M, 4]``: row m's RoPE position, cache slot,
        table row, unused.
    inv_freq : fp32 ``[D/2]`` (RoPE scaling already folded in).
    q_norm, k_norm : fp32 ``[D]`` per-head RMSNorm weights (Qwen3) or None.
    host_pools : ``(k_host, v_host)``, the layer's host-tier pools: a row whose table entry is
        ``~h`` (negative) is written zero-copy into host block ``h`` (``kvcache.tiers``).
        The one-sequence path only: refused with ``rows``.
    """
    check_positive(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"rope_append supports head_dim in {HEAD_DIMS}, got {head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    heads = num_q_heads + 2 * num_kv_heads
    shape = getattr(qkv, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"qkv must be a 2-d tensor [M, {heads * head_dim}], got shape {shape}")
    m = int(shape[0])
    check_tensor(qkv, "qkv", (m, heads * head_dim), "fp32")
    check_outputs(q_out, k_pool, v_pool, block_table, pos, inv_freq, m=m, num_q_heads=num_q_heads,
                  num_kv_heads=num_kv_heads, head_dim=head_dim)
    host = check_host_pools(host_pools, num_kv_heads, head_dim, rows)
    if rows:
        check_rows(block_table, pos, m)
    for name, w in (("q_norm", q_norm), ("k_norm", k_norm)):
        if w is not None:
            check_tensor(w, name, (head_dim,), "fp32")
    kind = ("_rows" if rows else "") + ("_host" if host else "")
    name = f"rope_append{kind}_d{head_dim}"
    kernel = rt.kernels.get(SOURCE, name, (ROWS_SIGNATURE if rows else SIGNATURE) + (HOST_TAIL if host else ""))
    tail = (int(block_table.shape[1]),) if rows else ()
    tail += host_args(host)
    args = kernel.pack(ptr(qkv), ptr(q_out), ptr(k_pool), ptr(v_pool), ptr(block_table), ptr(pos),
                       ptr(inv_freq), ptr(q_norm), ptr(k_norm), float(eps), m, num_q_heads, num_kv_heads, *tail)
    grid = (ceil_div(heads, HEADS_PER_BLOCK), m, 1)
    return LaunchSpec(kernel, grid, (HEADS_PER_BLOCK * 32, 1, 1), args, 0, name, pdl=pdl_ok(rt))


def check_outputs(q_out, k_pool, v_pool, block_table, pos, inv_freq, *, m: int, num_q_heads: int,
                  num_kv_heads: int, head_dim: int) -> None:
    """What RoPE + KV append writes and reads besides its input, checked by name: ``q_out`` fp32
    ``[m, Hq, D]``, the layer's pools, the table and position words, ``inv_freq`` fp32 ``[D/2]``
    (also the fused QKV launch's, ``qkv_rope``)."""
    check_tensor(q_out, "q_out", (m, num_q_heads, head_dim), "fp32")
    check_pools(k_pool, v_pool, num_kv_heads, head_dim)
    check_state(block_table, pos)
    check_tensor(inv_freq, "inv_freq", (head_dim // 2,), "fp32")


def bench_cache(config, position: int = 1000) -> dict:
    """The operands besides the input of one decode token's RoPE + append at ``position`` for
    ``config``'s heads (random tables over a 64-block cache): ``q_out``, ``k_pool``, ``v_pool``,
    ``block_table``, ``pos``, ``inv_freq``; the kernels benches of ``rope_append`` and
    ``qkv_rope`` share them."""
    from ... import memory
    from ...reference.ops import rope_inv_freq

    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    rng = np.random.default_rng(0)
    kv_blocks = 64
    return dict(
        q_out=memory.empty((1, hq, d), "fp32"),
        k_pool=memory.zeros(pool_shape(kv_blocks, hkv, d), "bf16"),
        v_pool=memory.zeros(pool_shape(kv_blocks, hkv, d), "bf16"),
        block_table=memory.from_numpy(rng.permutation(kv_blocks).astype(np.int32)),
        pos=memory.from_numpy(np.array([position], dtype=np.int32)),
        inv_freq=memory.from_numpy(rope_inv_freq(config)),
    )


def bytes_moved(m: int, num_q_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """Fewest bytes: read qkv, write q (fp32) and K, V (bf16), read inv_freq."""
    heads = num_q_heads + 2 * num_kv_heads
    return m * (heads * head_dim * 4 + num_q_heads * head_dim * 4 + 2 * num_kv_heads * head_dim * 2) \
        + head_dim // 2 * 4


def bench_cases(rt, config) -> list[BenchCase]:
    """rope_append of one decode token (M = 1) at position 1000 for ``config``'s heads."""
    from ... import memory

    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if d not in HEAD_DIMS:
        return []
    rng = np.random.default_rng(0)
    tensors = dict(qkv=memory.from_numpy(rng.standard_normal((1, (hq + 2 * hkv) * d), dtype=np.float32)),
                   **bench_cache(config))
    spec = rope_append(rt, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                       eps=float(config.rms_norm_eps), **tensors)

    return [BenchCase(f"rope_append hq{hq} hkv{hkv} d{d}", bytes_moved(1, hq, hkv, d), spec.launch,
                      group="attention", notes={"M": 1, "_keep": tuple(tensors.values())})]
