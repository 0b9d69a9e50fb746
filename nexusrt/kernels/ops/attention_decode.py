"""Launcher for ``cu/attention_decode.cu``: split-KV decode attention over the paged cache.

The grid is fixed at ``(Hkv, max_splits)`` (a captured graph cannot change it); the kernel
reads ``seq_len = *pos + 1`` and decides on the device how many of the splits do work.
:func:`choose_splits` sizes ``max_splits`` so that a long context fills the GPU with about
two blocks per SM; a short one uses as few splits as it has 32/64-token steps. One
:class:`DecodeWorkspace` serves every layer (launches on one stream never overlap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...kvcache.blocks import BLOCK_SIZE, blocks_for, pool_shape
from ...kvcache.checks import HOST_TAIL, check_host_pools, check_pools, check_rows, check_state, host_args
from .common import ceil_div, check_positive, check_tensor, pdl_ok, ptr, sm_count
from .spec import BenchCase, LaunchSpec

SOURCE = "attention_decode"
SIGNATURE = "ptr ptr ptr ptr ptr ptr ptr ptr ptr i32 i32 i32 f32"
ROWS_SIGNATURE = SIGNATURE + " i32 i32"
HEAD_DIMS = (64, 128)
MAX_GROUP = 8
MAX_SPLITS = 128  # kMaxSplits in the kernel
THREADS = 128
ROWS_HOST_REFUSAL = ("host_pools: the host tier is for the one-sequence path; the batched (rows) "
                     "kernels read device-resident KV blocks only")


def kernel_name(head_dim: int, group: int, rows: bool = False, host: bool = False) -> str:
    """The instantiation serving ``group``: exact for 1, 2, 4, 8; bounded (run-time G) else.
    ``host``: the twin that also reads host-tier blocks (negative table entries) zero-copy
    (one-sequence only: there is no rows twin)."""
    if rows and host:
        raise ValueError(ROWS_HOST_REFUSAL)
    prefix = ("attention_decode_rows" if rows else "attention_decode") + ("_host" if host else "")
    if group in (1, 2, 4, 8):
        return f"{prefix}_d{head_dim}_g{group}"
    return f"{prefix}_d{head_dim}_gmax{4 if group < 4 else 8}"


def tokens_per_step(head_dim: int, group: int) -> int:
    """Tokens one block consumes per loop step (the chunk granularity; kTokIter)."""
    row_groups = THREADS // (head_dim // 8)
    return row_groups * (4 if group <= 4 else 2)


def split_plan(seq_len: int, max_splits: int, step: int) -> tuple[int, int]:
    """(chunk, nsplit) exactly as the kernel derives them from ``seq_len = *pos + 1``:
    chunks are multiples of ``step`` tokens and at most ``max_splits`` of them do work."""
    chunk = ceil_div(ceil_div(seq_len, max_splits), step) * step
    return chunk, ceil_div(seq_len, chunk)


def choose_splits(num_kv_heads: int, head_dim: int, group: int, max_context: int, sms: int,
                  blocks_per_sm: int = 2) -> int:
    """``max_splits`` for a context of up to ``max_context`` tokens on ``sms`` SMs."""
    want = ceil_div(blocks_per_sm * sms, num_kv_heads)
    useful = ceil_div(max_context, tokens_per_step(head_dim, group))
    return max(1, min(MAX_SPLITS, want, useful))


@dataclass
class DecodeWorkspace:
    """Partial results of the splits: ``acc`` fp32 ``[Hkv, max_splits, G, D]``, ``ml`` fp32
    ``[Hkv, max_splits, G, 2]`` (running max and sum) and ``tickets`` int32 ``[Hkv]``, which
    must be zero before the first launch (the kernel leaves them zero)."""

    acc: object
    ml: object
    tickets: object
    max_splits: int
    rows: int = 0  # > 0: a workspace of the batched kernel, every array with a leading [rows]

    def free(self) -> None:
        for t in (self.acc, self.ml, self.tickets):
            t.free()


def alloc_workspace(num_q_heads: int, num_kv_heads: int, head_dim: int, max_splits: int,
                    tag: str = "attention", rows: int = 0) -> DecodeWorkspace:
    """Allocate a workspace on the running runtime (tickets zeroed); ``rows`` > 0 for the
    batched kernel (one workspace per query row)."""
    from ... import memory

    check_positive(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   max_splits=max_splits)
    if max_splits > MAX_SPLITS:
        raise ValueError(f"max_splits is {max_splits}; the kernel supports at most {MAX_SPLITS}")
    g = num_q_heads // num_kv_heads
    lead = (rows,) if rows else ()
    return DecodeWorkspace(
        acc=memory.empty(lead + (num_kv_heads, max_splits, g, head_dim), "fp32", tag=tag),
        ml=memory.empty(lead + (num_kv_heads, max_splits, g, 2), "fp32", tag=tag),
        tickets=memory.zeros(lead + (num_kv_heads,), "int32", tag=tag),
        max_splits=max_splits, rows=rows)


def attention_decode(rt, q, out, k_pool, v_pool, block_table, pos, workspace: DecodeWorkspace, *,
                     num_q_heads: int, num_kv_heads: int, head_dim: int,
                     scale: float | None = None, fixed_chunk: int = 0, host_pools=None) -> LaunchSpec:
    """Launch spec for one query token: ``q`` fp32 ``[Hq, D]`` -> ``out`` fp32 ``[Hq * D]``.

    Keys and values are positions ``0 .. *pos`` of the paged bf16 pools
    ``[num_blocks, Hkv, BLOCK_SIZE, D]`` (rope_append wrote position ``*pos`` already).
    ``scale`` defaults to ``1/sqrt(D)``.

    With a workspace of ``rows`` > 0 (the batched step): ``q`` fp32 ``[rows, Hq, D]``, ``out``
    bf16 ``[rows, Hq * D]``, ``block_table`` int32 ``[S, W]`` and ``pos`` the rows' meta int32
    ``[rows, 4]`` (position, slot, table row, unused): row r attends to slots ``0 .. slot``
    of its table. ``fixed_chunk`` > 0 (a multiple of :func:`tokens_per_step`) fixes the tokens
    per split, so a row's result does not depend on the batch it runs in.

    ``host_pools`` ``(k_host, v_host)``: the layer's host-tier pools (pinned, bf16
    ``[host_blocks, Hkv, BLOCK_SIZE, D]``); table entries ``~h`` (negative) name host block ``h``
    (``kvcache.tiers``) and are read zero-copy. None: every entry is a device block (the
    original kernels, unchanged). The one-sequence path only: refused with a rows workspace.
    """
    check_positive(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"attention_decode supports head_dim in {HEAD_DIMS}, got {head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    group = num_q_heads // num_kv_heads
    if group > MAX_GROUP:
        raise ValueError(f"GQA group {group} (= {num_q_heads}/{num_kv_heads}) is above the "
                         f"supported {MAX_GROUP}")
    rows = workspace.rows
    lead = (rows,) if rows else ()
    check_tensor(q, "q", lead + (num_q_heads, head_dim), "fp32")
    check_tensor(out, "out", lead + (num_q_heads * head_dim,), "bf16" if rows else "fp32")
    check_pools(k_pool, v_pool, num_kv_heads, head_dim)
    check_state(block_table, pos)
    host = check_host_pools(host_pools, num_kv_heads, head_dim)
    if rows and host:
        raise ValueError(ROWS_HOST_REFUSAL)
    if rows:
        check_rows(block_table, pos, rows)
    if fixed_chunk < 0 or fixed_chunk % tokens_per_step(head_dim, group):
        raise ValueError(f"fixed_chunk must be 0 or a multiple of {tokens_per_step(head_dim, group)}, got {fixed_chunk}")
    splits = workspace.max_splits
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"workspace.max_splits is {splits}; it must be in 1..{MAX_SPLITS}")
    check_tensor(workspace.acc, "workspace.acc", lead + (num_kv_heads, splits, group, head_dim), "fp32")
    check_tensor(workspace.ml, "workspace.ml", lead + (num_kv_heads, splits, group, 2), "fp32")
    check_tensor(workspace.tickets, "workspace.tickets", lead + (num_kv_heads,), "int32")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    name = kernel_name(head_dim, group, rows=bool(rows), host=host is not None)
    signature = (ROWS_SIGNATURE if rows else SIGNATURE) + (HOST_TAIL if host else "")
    kernel = rt.kernels.get(SOURCE, name, signature)
    tail = (int(block_table.shape[1]), int(fixed_chunk)) if rows else ()
    tail += host_args(host)
    args = kernel.pack(ptr(q), ptr(out), ptr(k_pool), ptr(v_pool), ptr(block_table), ptr(pos),
                       ptr(workspace.acc), ptr(workspace.ml), ptr(workspace.tickets), num_kv_heads,
                       group, splits, scale, *tail)
    return LaunchSpec(kernel, (num_kv_heads, splits, max(rows, 1)), (THREADS, 1, 1), args, 0, name,
                      pdl=pdl_ok(rt))


def bytes_moved(context: int, num_q_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """K and V rows read (bf16) plus q read and out written (fp32)."""
    return 2 * context * num_kv_heads * head_dim * 2 + 2 * num_q_heads * head_dim * 4


# Enough distinct pools that a case never finds its K/V in the 50 MB L2 of an H100.
_ROTATE_BYTES = 160 << 20
_MAX_COPIES = 16


def bench_cases(rt, config, contexts=(128, 1024, 8192)) -> list[BenchCase]:
    """Decode attention of ``config``'s heads at each context length.

    Each case rotates over several copies of the K/V pools (KV blocks scattered through a
    shuffled block table) so the bytes come from HBM, as in a real decode step where every
    layer reads its own cache.
    """
    from ... import memory

    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if d not in HEAD_DIMS or hq % hkv or hq // hkv > MAX_GROUP:
        return []
    rng = np.random.default_rng(0)
    cases = []
    for ctx in contexts:
        kv_blocks = blocks_for(ctx)
        pool_bytes = kv_blocks * hkv * BLOCK_SIZE * d * 2
        copies = max(1, min(_MAX_COPIES, ceil_div(_ROTATE_BYTES, 2 * pool_bytes)))
        host = rng.standard_normal(pool_shape(kv_blocks, hkv, d), dtype=np.float32)
        kv = [(memory.from_numpy(host, dtype="bf16"), memory.from_numpy(host[::-1].copy(), dtype="bf16"))
              for _ in range(copies)]
        q = memory.from_numpy(rng.standard_normal((hq, d), dtype=np.float32))
        out = memory.empty((hq * d,), "fp32")
        table = memory.from_numpy(rng.permutation(kv_blocks).astype(np.int32))
        pos = memory.from_numpy(np.array([ctx - 1], dtype=np.int32))
        # Sized for the longest context, as a runner sizes it for max_context: the short
        # cases then show what the empty splits cost.
        splits = choose_splits(hkv, d, hq // hkv, max(contexts), sm_count(rt))
        ws = alloc_workspace(hq, hkv, d, splits)
        specs = [attention_decode(rt, q, out, k, v, table, pos, ws, num_q_heads=hq, num_kv_heads=hkv,
                                  head_dim=d) for k, v in kv]
        state = {"i": 0}

        def launch(stream, specs=specs, state=state):  # rotates copies, also while captured
            specs[state["i"] % len(specs)].launch(stream)
            state["i"] += 1

        cases.append(BenchCase(f"attention_decode ctx{ctx} hq{hq} hkv{hkv} d{d}",
                               bytes_moved(ctx, hq, hkv, d), launch, group="attention",
                               notes={"context": ctx, "max_splits": splits, "pool_copies": copies,
                                      "_keep": (kv, q, out, table, pos, ws)}))
    return cases
