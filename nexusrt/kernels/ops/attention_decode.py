"""Launcher for ``cu/attention_decode.cu``: split-KV decode attention over the paged cache (and for
``cu/attention_scores.cu``, its rows kernels' h2o twins and their accumulate kernel; for
``cu/attention_decode_cluster.cu``, the one-sequence kernels' thread-block-cluster twins; for
``cu/attention_decode_mma.cu``, the tensor-core twins of the one-sequence and rows kernels).

The grid is fixed at ``(Hkv, max_splits)`` (a captured graph cannot change it); the kernel
reads ``seq_len = *pos + 1`` and decides on the device how many of the splits do work.
:func:`choose_splits` sizes ``max_splits`` so that a long context fills the GPU with about
two blocks per SM; a short one uses as few splits as it has 32/64-token steps;
:func:`wide_splits` is the mma kernels' count for three blocks per SM at long context (head_dim
64), which a runner captures in a graph of its own. One :class:`DecodeWorkspace` serves every
layer (launches on one stream never overlap).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from ...kvcache.blocks import BLOCK_SIZE, blocks_for, pool_shape
from ...kvcache.checks import (FAULT_TAIL, HOST_TAIL, ROWS_HOST_REFUSAL, check_fault_ring, check_host_pools,
                               check_pools, check_rows, check_state, host_args)
from .common import cc_at_least, ceil_div, check_positive, check_tensor, pdl_ok, ptr, sm_count
from .spec import BenchCase, LaunchSpec

SOURCE = "attention_decode"
SIGNATURE = "ptr ptr ptr ptr ptr ptr ptr ptr ptr i32 i32 i32 f32"
ROWS_SIGNATURE = SIGNATURE + " i32 i32"
HEAD_DIMS = (64, 128)
MAX_GROUP = 8
MAX_SPLITS = 128  # kMaxSplits in the kernel
ONE_SPLIT_STEPS = 3  # kOneSplitSteps: a context of at most this many loop steps is one split
CLUSTER_SIZE = 8  # kClusterSize: the cluster kernels' blocks per cluster, and their short-context limit in steps
CLUSTER_SOURCE = "attention_decode_cluster"
MMA_SOURCE = "attention_decode_mma"
MMA_STAGES = {64: 4, 128: 3}  # nrt_decode_mma::stages<D>(): pages in flight per warp
MMA_ONE_SPLIT_STEPS = {64: 6, 128: 4}  # mma_one_split_steps<D>(): one split up to this many steps
MMA_MIN_SPLIT_STEPS = 2  # kMmaMinSplitSteps: above it, at least this many steps per split
# The one-sequence mma kernels' wide split count (wide_splits): from this many tokens on, at the
# head dims listed, splits sized for three blocks an SM stream faster than the two-block count.
MMA_WIDE_FROM = {64: 14336}
MMA_WIDE_BLOCKS_PER_SM = 3
THREADS = 128


def kernel_name(head_dim: int, group: int, rows: bool = False, host: bool = False, scores: bool = False,
                fault: bool = False) -> str:
    """The instantiation serving ``group``: exact for 1, 2, 4, 8; bounded (run-time G) else.
    ``host``: the twin that also reads host-tier blocks (negative table entries) zero-copy
    (one-sequence only: there is no rows twin); ``fault`` (with ``host``): the twin that also posts
    those blocks to the fault ring; ``scores`` (rows only): the twin that also writes each key's
    score (h2o)."""
    if rows and host:
        raise ValueError(ROWS_HOST_REFUSAL)
    if fault and not host:
        raise ValueError("fault: only the host-tier twins post faults (host=True)")
    prefix = ("attention_decode_rows" if rows else "attention_decode") + ("_host" if host else "")
    prefix += "_fault" if fault else ""
    prefix += "_scores" if scores else ""
    if group in (1, 2, 4, 8):
        return f"{prefix}_d{head_dim}_g{group}"
    return f"{prefix}_d{head_dim}_gmax{4 if group < 4 else 8}"


def tokens_per_step(head_dim: int, group: int, mma: bool = False) -> int:
    """Tokens one block consumes per loop step (the chunk granularity; kTokIter): for the mma
    kernels one 16-token block per warp."""
    if mma:
        return (THREADS // 32) * BLOCK_SIZE
    row_groups = THREADS // (head_dim // 8)
    return row_groups * (4 if group <= 4 else 2)


def mma_shared_bytes(head_dim: int) -> int:
    """Dynamic shared memory of an mma kernel's block (nrt_decode_mma::ring_bytes): per warp, a ring
    of ``MMA_STAGES`` K and V blocks of one KV head (64 KiB at head_dim 64, 96 KiB at 128)."""
    return (THREADS // 32) * MMA_STAGES[head_dim] * 2 * BLOCK_SIZE * head_dim * 2


def _twin_ok(rt, env: str, min_cc: tuple[int, int]) -> bool:
    """A twin kernel family can run on ``rt``'s device (compute capability ``min_cc`` or later)
    and is not turned off (``env`` = ``0``)."""
    if os.environ.get(env, "1") == "0":
        return False
    return cc_at_least(rt, min_cc)


def mma_ok(rt) -> bool:
    """The mma kernels can run (mma.sync bf16 and cp.async: sm_80+) and are not turned off
    (``NEXUSRT_ATTN_MMA=0``)."""
    return _twin_ok(rt, "NEXUSRT_ATTN_MMA", (8, 0))


def split_plan(seq_len: int, max_splits: int, step: int, cluster: bool = False,
               mma_head_dim: int | None = None) -> tuple[int, int]:
    """(chunk, nsplit) exactly as the kernel derives them from ``seq_len = *pos + 1``:
    chunks are multiples of ``step`` tokens and at most ``max_splits`` of them do work; a
    context of at most ``ONE_SPLIT_STEPS`` steps is one split (no combine). The cluster kernels
    (``cluster``) split a context of at most ``CLUSTER_SIZE`` steps one step per split (combined
    in the cluster, whatever ``max_splits``). The mma kernels (``mma_head_dim``: their head dim)
    take one split up to ``MMA_ONE_SPLIT_STEPS[d]`` steps and at least ``MMA_MIN_SPLIT_STEPS`` a
    split above it."""
    if cluster and seq_len <= CLUSTER_SIZE * step:
        return step, ceil_div(seq_len, step)
    one_split = ONE_SPLIT_STEPS if mma_head_dim is None else MMA_ONE_SPLIT_STEPS[mma_head_dim]
    per_split = seq_len if seq_len <= one_split * step else ceil_div(seq_len, max_splits)
    chunk = ceil_div(per_split, step) * step
    if mma_head_dim is not None:
        chunk = max(chunk, MMA_MIN_SPLIT_STEPS * step)
    return chunk, ceil_div(seq_len, chunk)


def cluster_context_limit(head_dim: int, group: int) -> int:
    """The longest context (tokens) the cluster kernels combine in the cluster (one step per split,
    ``CLUSTER_SIZE`` steps). Past it they take the workspace path, slower than the plain kernels'
    (H200, 1B shape: 22.0 against 13.4 µs at 8,192 tokens), so callers switch back to those."""
    return CLUSTER_SIZE * tokens_per_step(head_dim, group)


def cluster_ok(rt) -> bool:
    """The cluster kernels can run (sm_90+) and are not turned off (``NEXUSRT_ATTN_CLUSTER=0``)."""
    return _twin_ok(rt, "NEXUSRT_ATTN_CLUSTER", (9, 0))


def choose_splits(num_kv_heads: int, head_dim: int, group: int, max_context: int, sms: int,
                  blocks_per_sm: int = 2) -> int:
    """``max_splits`` for a context of up to ``max_context`` tokens on ``sms`` SMs (sized by the
    CUDA-core kernels' step, the smaller one: the mma kernels' extra splits exit at once)."""
    want = ceil_div(blocks_per_sm * sms, num_kv_heads)
    useful = ceil_div(max_context, tokens_per_step(head_dim, group))
    return max(1, min(MAX_SPLITS, want, useful))


def wide_splits(num_kv_heads: int, head_dim: int, group: int, max_context: int, sms: int) -> int:
    """``max_splits`` of the one-sequence mma kernels at long context, or 0 where none applies.

    At head_dim 64 an mma block holds a 64 KiB ring and ~110 registers, so three fit an SM where
    :func:`choose_splits` sizes the grid for two. Three blocks an SM stream a long context faster
    and a shorter one slower (more partials to combine, fewer steps a split): on an H200, the
    Llama-3.2-1B shape's layer at 12,288 tokens 10.4 µs with 33 splits against 11.2 with 49, at
    14,336 12.0 against 11.9, at 16,384 13.4 against 12.5, at 32,768 24.3 against 20.9
    (kernels/NOTES_attention.md). So a runner whose ``max_context`` reaches
    ``MMA_WIDE_FROM[head_dim]`` captures a second decode graph with this many splits and replays
    it from that context on. The count keeps the grid to one wave (rounded down, not up: 49 for 8
    KV heads on 132 SMs, where up would be 400 blocks for 396 places); head_dim 128 has no wide
    count (a 96 KiB ring: two blocks an SM), and neither has a shape whose wide count would not
    exceed :func:`choose_splits`'s (many KV heads on few SMs, or both at ``MAX_SPLITS``)."""
    check_positive(num_kv_heads=num_kv_heads, head_dim=head_dim, group=group, max_context=max_context, sms=sms)
    start = MMA_WIDE_FROM.get(head_dim)
    if start is None or max_context < start:
        return 0
    wide = min(MAX_SPLITS, MMA_WIDE_BLOCKS_PER_SM * sms // num_kv_heads)
    return wide if wide > choose_splits(num_kv_heads, head_dim, group, max_context, sms) else 0


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
                     scale: float | None = None, fixed_chunk: int = 0, host_pools=None,
                     scores: ScoresWorkspace | None = None, fault_ring=None, cluster: bool = False,
                     mma: bool = False) -> LaunchSpec:
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

    ``fault_ring`` (a ``kvcache.fault_ring.DeviceRing``, with ``host_pools``): the twin that also posts
    every host block a split reads to the ring (the producer rule of ``kvcache/fault_ring.py``) so
    the runner's drain can move it into HBM; this launch still reads it zero-copy.

    ``scores`` (rows only, device pools only): the twin that also writes each key's raw score
    and each head's softmax state to the :class:`ScoresWorkspace` (h2o KV pruning); follow it
    with :func:`accumulate_scores`. Each row's slot must lie below ``scores.stride``.

    ``cluster`` (sm_90, one sequence, device blocks; :func:`cluster_ok`): the
    ``attention_decode_cluster_*`` twin, launched in clusters of ``CLUSTER_SIZE`` blocks along
    the splits: a context of at most ``CLUSTER_SIZE`` loop steps takes one step per block and is
    combined in the cluster's shared memory (:func:`split_plan` with ``cluster=True``); a longer
    one takes the workspace as without it.

    ``mma`` (sm_80+, no scores; :func:`mma_ok`): the ``attention_decode_mma_*`` twin
    (``attention_decode_mma_rows_*`` with a rows workspace, ``attention_decode_mma_host[_fault]_*``
    with ``host_pools`` [and ``fault_ring``]): each warp streams its own KV blocks into shared
    memory (``mma_shared_bytes``; host-tier blocks by the same copies, so a block's tier does not
    change the result) and multiplies them on tensor cores; a loop step is
    ``tokens_per_step(..., mma=True)`` tokens.
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
    host = check_host_pools(host_pools, num_kv_heads, head_dim, rows)
    ring_args = check_fault_ring(fault_ring, host)
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
    if scores is not None:  # rows only, so device blocks only (a rows host tier is refused above)
        check_scores(scores, rows, num_q_heads)
    if cluster and (rows or host is not None or scores is not None):
        raise ValueError("cluster: the cluster kernels are one-sequence, device blocks only "
                         "(no rows workspace, host_pools, fault_ring or scores)")
    if mma and (cluster or scores is not None):
        raise ValueError("mma: the mma kernels write no scores and run no clusters (no scores or cluster)")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    name = kernel_name(head_dim, group, rows=bool(rows), host=host is not None, scores=scores is not None,
                       fault=bool(ring_args))
    signature = (ROWS_SIGNATURE if rows else SIGNATURE) + (HOST_TAIL if host else "") + (FAULT_TAIL if ring_args else "")
    signature = SCORES_SIGNATURE if scores is not None else signature
    source = SOURCE if scores is None else SCORES_SOURCE
    if cluster or mma:
        source = CLUSTER_SOURCE if cluster else MMA_SOURCE
        name = name.replace("attention_decode", source, 1)
    kernel = rt.kernels.get(source, name, signature)
    tail = (int(block_table.shape[1]), int(fixed_chunk)) if rows else ()
    tail += host_args(host) + ring_args
    tail += (ptr(scores.raw), ptr(scores.ml), scores.stride) if scores is not None else ()
    args = kernel.pack(ptr(q), ptr(out), ptr(k_pool), ptr(v_pool), ptr(block_table), ptr(pos),
                       ptr(workspace.acc), ptr(workspace.ml), ptr(workspace.tickets), num_kv_heads,
                       group, splits, scale, *tail)
    if cluster:  # the grid's splits a whole number of clusters (blocks past the work exit at once)
        return LaunchSpec(kernel, (num_kv_heads, ceil_div(splits, CLUSTER_SIZE) * CLUSTER_SIZE, 1), (THREADS, 1, 1),
                          args, 0, name, pdl=pdl_ok(rt), cluster=(1, CLUSTER_SIZE, 1))
    shared = 0
    if mma:
        shared = mma_shared_bytes(head_dim)
        kernel.set_max_dynamic_shared(shared, rt.device.handle)
    return LaunchSpec(kernel, (num_kv_heads, splits, max(rows, 1)), (THREADS, 1, 1), args, shared, name,
                      pdl=pdl_ok(rt))


SCORES_SOURCE = "attention_scores"  # the twins' module: the other kernels' machine code stays as it was
SCORES_SIGNATURE = ROWS_SIGNATURE + " ptr ptr i32"
ACCUMULATE = "attention_scores_rows"
ACCUMULATE_SIGNATURE = "ptr ptr ptr ptr i32 i32"


@dataclass
class ScoresWorkspace:
    """The h2o scores of a rows launch (``cu/attention_scores.cu``, the ``_scores`` twins): ``raw``
    fp32 ``[rows, Hq, stride]`` (each key's exp2-domain logit at its cache slot), ``ml`` fp32
    ``[rows, Hq, 2]`` (each head's final softmax max and sum) and ``scores`` fp32 ``[rows, stride]``,
    into which every launch of :func:`accumulate_scores` adds each slot's probability summed over
    the heads (the caller zeroes it before a step's first layer). ``stride``: at least the last
    cache slot + 1 of every row. Bytes: ``4 * rows * (Hq + 1) * stride + 8 * rows * Hq``; the 8B
    shape (Hq 32) at 64 rows and an 8192-token context holds 66 MiB."""

    raw: object
    ml: object
    scores: object
    rows: int
    stride: int

    def free(self) -> None:
        for t in (self.raw, self.ml, self.scores):
            t.free()


def scores_bytes(num_q_heads: int, rows: int, stride: int) -> int:
    """Device bytes of a :class:`ScoresWorkspace`."""
    return 4 * rows * (num_q_heads + 1) * stride + 8 * rows * num_q_heads


def alloc_scores(num_q_heads: int, rows: int, stride: int, tag: str = "attention") -> ScoresWorkspace:
    """Allocate a :class:`ScoresWorkspace` on the running runtime (``scores`` zeroed)."""
    from ... import memory

    check_positive(num_q_heads=num_q_heads, rows=rows, stride=stride)
    return ScoresWorkspace(raw=memory.empty((rows, num_q_heads, stride), "fp32", tag=tag),
                           ml=memory.empty((rows, num_q_heads, 2), "fp32", tag=tag),
                           scores=memory.zeros((rows, stride), "fp32", tag=tag), rows=rows, stride=stride)


def check_scores(scores: ScoresWorkspace, rows: int, num_q_heads: int) -> None:
    """ValueError unless ``scores`` serves a rows launch of ``rows`` rows and ``num_q_heads`` heads."""
    if not isinstance(scores, ScoresWorkspace):
        raise ValueError(f"scores must be a ScoresWorkspace, got {type(scores).__name__}")
    if not rows:
        raise ValueError("scores are written by the rows kernels only (a workspace with rows > 0)")
    if scores.rows < rows:
        raise ValueError(f"the scores workspace holds {scores.rows} rows; the launch has {rows}")
    check_positive(stride=scores.stride)
    check_tensor(scores.raw, "scores.raw", (scores.rows, num_q_heads, scores.stride), "fp32")
    check_tensor(scores.ml, "scores.ml", (scores.rows, num_q_heads, 2), "fp32")
    check_tensor(scores.scores, "scores.scores", (scores.rows, scores.stride), "fp32")


def accumulate_scores(rt, scores: ScoresWorkspace, meta, *, rows: int, num_q_heads: int) -> LaunchSpec:
    """Launch spec adding the last scores launch's probabilities into ``scores.scores``: slot t of row
    r gains ``sum_h exp2(raw[r, h, t] - max[r, h]) / sum[r, h]`` for t up to the row's slot
    (``meta`` int32 ``[rows, 4]``, as the rows kernels read it). Reads the workspace, never the KV;
    the caller keeps every row's slot below ``scores.stride``."""
    check_positive(rows=rows, num_q_heads=num_q_heads)
    check_scores(scores, rows, num_q_heads)
    check_tensor(meta, "meta", (rows, 4), "int32")
    kernel = rt.kernels.get(SCORES_SOURCE, ACCUMULATE, ACCUMULATE_SIGNATURE)
    args = kernel.pack(ptr(scores.raw), ptr(scores.ml), ptr(meta), ptr(scores.scores), num_q_heads, scores.stride)
    return LaunchSpec(kernel, (ceil_div(scores.stride, THREADS), rows, 1), (THREADS, 1, 1), args, 0, ACCUMULATE)


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
        kinds = [""] + (["cluster"] if cluster_ok(rt) else []) + (["mma"] if mma_ok(rt) else [])
        for kind in kinds:  # the cluster and mma twins beside the plain kernel
            specs = [attention_decode(rt, q, out, k, v, table, pos, ws, num_q_heads=hq, num_kv_heads=hkv,
                                      head_dim=d, cluster=kind == "cluster", mma=kind == "mma") for k, v in kv]
            state = {"i": 0}

            def launch(stream, specs=specs, state=state):  # rotates copies, also while captured
                specs[state["i"] % len(specs)].launch(stream)
                state["i"] += 1

            cases.append(BenchCase(f"attention_decode{f'[{kind}]' if kind else ''} ctx{ctx} hq{hq} hkv{hkv} d{d}",
                                   bytes_moved(ctx, hq, hkv, d), launch, group="attention",
                                   notes={"context": ctx, "max_splits": splits, "pool_copies": copies,
                                          "cluster": kind == "cluster", "mma": kind == "mma",
                                          "_keep": (kv, q, out, table, pos, ws)}))
    return cases
