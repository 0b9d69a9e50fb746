"""Launcher for causal attention of a chunk of M prompt rows at positions
``*pos .. *pos + M - 1`` over the paged cache (keys ``0 .. *pos + M - 1``).

Two implementations behind one launcher, chosen by the output's dtype:

- ``out`` bf16: ``cu/attention_prefill_mma.cu``, tensor cores (mma.sync bf16, fp32
  accumulate), FlashAttention-2 style; what the model's prefill runs, since the O
  projection GEMM reads bf16.
- ``out`` fp32: ``cu/attention_prefill.cu``, fp32 math on CUDA cores; the oracle the
  tensor-core kernel is tested against on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...kvcache.checks import HOST_TAIL, check_host_pools, check_pools, check_state, host_args
from .common import ceil_div, check_positive, check_tensor, dtype_name, ptr
from .spec import LaunchSpec

SOURCE = "attention_prefill"
SOURCE_MMA = "attention_prefill_mma"
SIGNATURE = "ptr ptr ptr ptr ptr ptr i32 i32 i32 f32"
HEAD_DIMS = (64, 128)
ROWS_PER_BLOCK = 16  # (row, head-in-group) pairs per block, kRows in the fp32 kernel
THREADS = 128
# Block shapes of the tensor-core kernel that are built, as (warps, m16 tiles per warp, Q kept in
# shared memory): a block holds 16 * warps * tiles query rows. MMA_SHAPE is the one used per
# head dim: the fastest at 8k causal on an H200 (scripts/sweep_attention.py;
# kernels/NOTES_attention.md).
MMA_SHAPES = {64: ((4, 1, False), (8, 1, False), (4, 2, False), (4, 2, True)),
              128: ((4, 1, False), (8, 1, False), (4, 2, True))}
MMA_SHAPE = {64: (4, 2, False), 128: (4, 2, True)}
MMA_KEYS = 64  # keys per shared-memory tile, kBlockN
LOG2E = 1.4426950408889634


def mma_kernel_name(head_dim: int, block: tuple) -> str:
    warps, tiles, q_smem = block
    return f"attention_prefill_mma_d{head_dim}_w{warps}_r{tiles}{'_qs' if q_smem else ''}"


def mma_shared_bytes(head_dim: int, block: tuple | None = None) -> int:
    """Dynamic shared memory of the tensor-core kernel: double-buffered K and V tiles (the Q tile
    is staged in the second buffer before the loop), plus the Q tile when it stays in shared memory."""
    warps, tiles, q_smem = MMA_SHAPE[head_dim] if block is None else block
    return (4 * MMA_KEYS + (16 * warps * tiles if q_smem else 0)) * head_dim * 2


def attention_prefill(rt, q, out, k_pool, v_pool, block_table, pos, *, num_q_heads: int,
                      num_kv_heads: int, head_dim: int, scale: float | None = None,
                      block: tuple[int, int] | None = None, host_pools=None) -> LaunchSpec:
    """Launch spec: ``q`` fp32 ``[M, Hq, D]`` -> ``out`` ``[M, Hq * D]``, bf16 (tensor cores)
    or fp32 (the CUDA-core oracle). ``block`` picks another built block shape of the tensor-core
    kernel, ``(warps, tiles per warp, Q in shared memory)`` from ``MMA_SHAPES`` (for sweeps and tests).

    The chunk's own K and V must already be in the pools (rope_append first). ``scale``
    defaults to ``1/sqrt(D)``. ``host_pools`` ``(k_host, v_host)``: the layer's host-tier pools,
    read zero-copy for negative table entries (``kvcache.tiers``); the tensor-core kernel only
    (the fp32 oracle reads device blocks only).
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
    out_dtype = dtype_name(getattr(out, "dtype", "fp32"))
    if out_dtype not in ("bf16", "fp32"):
        raise ValueError(f"attention_prefill writes bf16 (tensor cores) or fp32 (oracle) rows, got out dtype {out_dtype}")
    check_tensor(out, "out", (m, num_q_heads * head_dim), out_dtype)
    check_pools(k_pool, v_pool, num_kv_heads, head_dim)
    check_state(block_table, pos)
    host = check_host_pools(host_pools, num_kv_heads, head_dim)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if out_dtype == "bf16":
        block = MMA_SHAPE[head_dim] if block is None else tuple(block)
        if block not in MMA_SHAPES[head_dim]:
            raise ValueError(f"the tensor-core attention at head_dim {head_dim} is built for (warps, tiles, "
                             f"q_in_smem) {MMA_SHAPES[head_dim]}, got {block}")
        warps, tiles, _ = block
        name = mma_kernel_name(head_dim, block) + ("_host" if host else "")
        kernel = rt.kernels.get(SOURCE_MMA, name, SIGNATURE + (HOST_TAIL if host else ""))
        shared = mma_shared_bytes(head_dim, block)
        if shared > 48 * 1024:
            kernel.set_max_dynamic_shared(shared, rt.device.handle)
        args = kernel.pack(ptr(q), ptr(out), ptr(k_pool), ptr(v_pool), ptr(block_table), ptr(pos), m,
                           num_q_heads, num_kv_heads, scale * LOG2E, *host_args(host))
        return LaunchSpec(kernel, (num_q_heads, ceil_div(m, 16 * warps * tiles), 1), (32 * warps, 1, 1), args, shared,
                          name=f"{name}[{m}]")
    if host:
        raise ValueError("the fp32 oracle prefill attention reads device-resident KV blocks only; "
                         "host_pools needs bf16 out (the tensor-core kernel)")
    group = num_q_heads // num_kv_heads
    name = f"attention_prefill_d{head_dim}"
    kernel = rt.kernels.get(SOURCE, name, SIGNATURE)
    args = kernel.pack(ptr(q), ptr(out), ptr(k_pool), ptr(v_pool), ptr(block_table), ptr(pos), m,
                       num_q_heads, num_kv_heads, scale)
    grid = (ceil_div(m * group, ROWS_PER_BLOCK), num_kv_heads, 1)
    return LaunchSpec(kernel, grid, (THREADS, 1, 1), args, 0, name)


# The argument slots of SIGNATURE that say which rows a launch reads and writes (rebind).
_ARG_Q, _ARG_OUT, _ARG_TABLE, _ARG_POS, _ARG_M = 0, 1, 4, 5, 6


@dataclass(frozen=True)
class RowsBinding:
    """Rows for :func:`rebind`, checked and resolved to addresses once (:func:`bind_rows`)."""

    values: tuple  # q, out, block table, position word addresses, and M, in their argument slots' order
    grid_y: int
    name: str


def bind_rows(q, out, block_table, pos, *, block: tuple | None = None) -> RowsBinding:
    """``q`` fp32 ``[M, Hq, D]`` and ``out`` bf16 ``[M, Hq * D]`` rows (slices of the buffers a spec
    was made for), a block table and a position word, for :func:`rebind` of a tensor-core spec of
    ``block`` (default: the one :func:`attention_prefill` picks)."""
    shape = getattr(q, "shape", None)
    if shape is None or len(shape) != 3:
        raise ValueError(f"q must be a 3-d tensor [M, Hq, D], got shape {shape}")
    m, d = int(shape[0]), int(shape[2])
    if m < 1 or tuple(getattr(out, "shape", ())) != (m, int(shape[1]) * d):
        raise ValueError(f"out must have shape {(m, int(shape[1]) * d)} for q of shape {tuple(shape)}, "
                         f"got {getattr(out, 'shape', None)}")
    block = MMA_SHAPE.get(d) if block is None else tuple(block)
    if block is None or block not in MMA_SHAPES.get(d, ()):
        raise ValueError(f"no tensor-core attention of block {block} at head_dim {d}")
    warps, tiles, _ = block
    return RowsBinding((ptr(q), ptr(out), ptr(block_table), ptr(pos), m), ceil_div(m, 16 * warps * tiles),
                       mma_kernel_name(d, block))


def rebind(spec: LaunchSpec, rows: RowsBinding) -> LaunchSpec:
    """Point a tensor-core ``spec`` made by :func:`attention_prefill` at other ``rows``, in place,
    and return it; the grid follows the row count. Pools, heads, scale and block shape stay.

    For a host path that launches many such specs per step (the batch runner's ragged prefill:
    one per layer and chunk): the launcher's checks and packing cost ~35 us each on the host, a
    rebind ~1.5 us (scripts/probe_ragged_host.py). The args pack is rewritten, so launch the spec before rebinding it again (a
    launch copies its arguments), and never rebind a spec a captured graph was made from.
    """
    if not spec.name.startswith(rows.name):
        raise ValueError(f"rows bound for {rows.name} cannot rebind {spec.name!r}")
    args = spec.args
    q, out, table, pos, m = rows.values
    args[_ARG_Q], args[_ARG_OUT], args[_ARG_TABLE], args[_ARG_POS], args[_ARG_M] = q, out, table, pos, m
    spec.grid = (spec.grid[0], rows.grid_y, 1)
    spec.name = f"{rows.name}[{m}]"
    return spec


def causal_flops(m: int, start: int, num_q_heads: int, head_dim: int) -> int:
    """FLOPs of the chunk's attention: row i sees ``start + i + 1`` keys, 4 * D per (row, key,
    head) (Q K^T and P V, a multiply and an add each)."""
    pairs = m * start + m * (m + 1) // 2
    return 4 * head_dim * num_q_heads * pairs


def random_cache(rt, tokens: int, num_kv_heads: int, head_dim: int, seed: int = 3) -> dict:
    """K/V pools of random bf16 holding ``tokens`` tokens in order, an identity block table and a
    zero position word, for benchmarks (fresh random data, never zeros)."""
    import numpy as np

    from ... import memory
    from ...kvcache.blocks import blocks_for, pool_shape
    from .elementwise import fill_uniform_bf16

    kv_blocks = blocks_for(tokens)
    shape = pool_shape(kv_blocks, num_kv_heads, head_dim)
    n = int(np.prod(shape))
    out = {"k_pool": memory.empty(shape, "bf16", tag="bench"), "v_pool": memory.empty(shape, "bf16", tag="bench")}
    for i, t in enumerate(out.values()):
        fill_uniform_bf16(rt, t.reshape(n), n, seed, 1.0, tensor_index=i).launch(rt.streams["compute"])
    out["block_table"] = memory.from_numpy(np.arange(kv_blocks, dtype=np.int32), tag="bench")
    return out


def bench_cases(rt, config, tokens: int = 4096) -> list:
    """The model's prefill attention on tensor cores for a ``tokens``-row chunk starting at 0
    and at ``tokens`` (the second chunk of a long prompt), and the fp32 oracle for 1024 rows."""
    import numpy as np

    from ... import memory
    from . import bench_util
    from .spec import BenchCase

    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if d not in HEAD_DIMS:
        return []
    cache = random_cache(rt, 2 * tokens, hkv, d)
    q = bench_util.random_f32(rt, (tokens, hq, d), seed=5)
    out16 = memory.empty((tokens, hq * d), "bf16", tag="bench")
    out32 = memory.empty((1024, hq * d), "fp32", tag="bench")
    keep = (list(cache.values()), q, out16, out32)
    cases = []
    for start in (0, tokens):
        pos = memory.from_numpy(np.array([start], np.int32), tag="bench")
        keep += (pos,)
        for shape in MMA_SHAPES[d]:
            spec = attention_prefill(rt, q, out16, pos=pos, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                                     block=shape, **cache)
            kv_bytes = 2 * (start + tokens) * hkv * d * 2
            cases.append(BenchCase(f"{mma_kernel_name(d, shape)} rows {start}..{start + tokens}",
                                   kv_bytes + tokens * hq * d * 6, spec.launch, group="attention",
                                   notes={"flops": causal_flops(tokens, start, hq, d), "_keep": keep}))
    pos0 = keep[-2]
    spec = attention_prefill(rt, q[0:1024], out32, pos=pos0, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, **cache)
    cases.append(BenchCase(f"attention_prefill fp32 oracle d{d} rows 0..1024", 2 * 1024 * hkv * d * 2 + 1024 * hq * d * 8,
                           spec.launch, group="attention", notes={"flops": causal_flops(1024, 0, hq, d)}))
    return cases
