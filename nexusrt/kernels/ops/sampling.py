"""Launchers for ``cu/sampling.cu``: the next token on the device, per
:mod:`nexusrt.reference.sampling` (greedy or temperature/top-k/top-p with a seeded draw).

Three launches per token: ``sample_argmax_partial`` and ``sample_gather`` (a block per 1024
logits each) and ``sample_finish`` (one block), which writes the token to a device word and to
``ring[step % ring_size]`` (pinned host memory the host polls), then advances ``*pos`` and
``*step``. Greedy: partial argmaxes, a gather that does nothing, their combine. Sampled: the
grid-wide exact top-K of ``cu/sampling_grid.cuh`` (a key histogram, a candidate pool of at most
4,096 keys, the draw over the pool), in the buffers :class:`SamplerBuffers` holds; the
persistent decode kernel runs the same three phases on the same buffers. The parameters live in
a 24-byte device struct (:func:`pack_params`), so a new ``generate()`` call rewrites it instead
of the graph.

The batched form (:func:`sample_rows`, the serving engine's step): ``sample_rows_partial``
and ``sample_rows_finish`` pick each row of logits ``[M, vocab]`` with its own struct
(:func:`pack_params_rows`, uint8 ``[M, 24]``) and step (int32 ``[M]``) into ``out[M]``, the
same algorithm and device code as the one-row pair, in one launch pair for all rows.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .common import ceil_div, check_aligned, check_positive, check_tensor, pdl_ok, ptr
from .spec import BenchCase, LaunchSpec

SOURCE = "sampling"
PARTIAL_SIGNATURE = "ptr i32 ptr ptr ptr ptr"
GATHER_SIGNATURE = "ptr i32 ptr ptr ptr"
FINISH_SIGNATURE = "ptr i32 ptr ptr ptr i32 ptr ptr ptr ptr ptr ptr i32"
ROWS_PARTIAL_SIGNATURE = "ptr i32 ptr ptr ptr i32"
ROWS_FINISH_SIGNATURE = "ptr i32 ptr ptr ptr ptr i32 ptr i32"
MAX_ROWS = 65535  # sample_rows_partial puts the rows on grid.y
PART_CHUNK = 1024  # logits per partial / gather block (kPartChunk)
PART_THREADS = 256
FINISH_THREADS = 1024
MAX_PARTS = FINISH_THREADS  # one partial per thread of sample_finish
PARAMS_FORMAT = "<fifiQ"  # struct SampleParams: temperature, top_k, top_p, pad, seed
PARAMS_BYTES = struct.calcsize(PARAMS_FORMAT)
# The grid-wide top-K's words in global memory (sampling_grid.cuh; zero before the first step,
# every sampled finish zeroes them after it): the histogram of kBuckets bins followed by the
# pool cursor (int32), and the candidate pool of kPoolMax 64-bit keys.
TOPK_HIST_WORDS = 4096 + 1
TOPK_POOL_WORDS = 4096


def pack_params(temperature: float, top_k: int, top_p: float, seed: int) -> np.ndarray:
    """The device ``SampleParams`` struct as 24 bytes (uint8), ready to copy to the device.

    ``temperature`` 0 is greedy; ``top_k`` 0 means the 1024 cap; ``top_p`` in (0, 1].
    The values are checked by :class:`nexusrt.reference.sampling.SamplingParams`; here only
    what the struct can hold is enforced.
    """
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed!r}")
    if int(top_k) < 0 or int(top_k) >= 2**31:
        raise ValueError(f"top_k must be in [0, 2**31), got {top_k!r}")
    raw = struct.pack(PARAMS_FORMAT, float(temperature), int(top_k), float(top_p), 0, int(seed))
    return np.frombuffer(raw, dtype=np.uint8).copy()


def pack_params_rows(rows) -> np.ndarray:
    """The ``SampleParams`` structs of many rows as uint8 ``[M, 24]`` (row r: :func:`pack_params`
    of ``rows[r]``, a ``(temperature, top_k, top_p, seed)`` tuple), for :func:`sample_rows`."""
    packed = [pack_params(*row) for row in rows]
    if not packed:
        return np.zeros((0, PARAMS_BYTES), dtype=np.uint8)
    return np.stack(packed)


def num_parts(vocab: int) -> int:
    return ceil_div(vocab, PART_CHUNK)


@dataclass
class SamplerBuffers:
    """Device buffers of the sampler: ``params`` (uint8 [24]), the partial argmax
    (``part_val`` fp32, ``part_idx`` int32, ``num_parts(vocab)`` each) and the grid-wide
    top-K's ``topk_hist`` (int32 [:data:`TOPK_HIST_WORDS`]) and ``topk_pool`` (int64
    [:data:`TOPK_POOL_WORDS`]), which must be zero before the first sampled step (each leaves
    them zero: so the graph path and the persistent kernel, one stream, share them)."""

    params: object
    part_val: object
    part_idx: object
    topk_hist: object
    topk_pool: object

    def set_params(self, temperature: float, top_k: int, top_p: float, seed: int) -> None:
        """Rewrite the parameters (a synchronous copy; do it between graph launches)."""
        self.params.copy_from(pack_params(temperature, top_k, top_p, seed))

    def free(self) -> None:
        for t in (self.params, self.part_val, self.part_idx, self.topk_hist, self.topk_pool):
            t.free()


def alloc_buffers(vocab: int, tag: str = "sampling") -> SamplerBuffers:
    """Buffers for a ``vocab``-sized sampler on the running runtime (greedy parameters)."""
    from ... import memory

    check_positive(vocab=vocab)
    n = num_parts(vocab)
    if n > MAX_PARTS:
        raise ValueError(f"vocab {vocab} is above the supported {MAX_PARTS * PART_CHUNK}")
    made = []
    try:
        for make in (lambda: memory.from_numpy(pack_params(0.0, 0, 1.0, 0), tag=tag),
                     lambda: memory.empty((n,), "fp32", tag=tag), lambda: memory.empty((n,), "int32", tag=tag),
                     lambda: memory.zeros((TOPK_HIST_WORDS,), "int32", tag=tag),
                     lambda: memory.zeros((TOPK_POOL_WORDS,), "int64", tag=tag)):
            made.append(make())
    except BaseException:
        for t in made:
            t.free()
        raise
    return SamplerBuffers(*made)


def sample(rt, logits, buffers: SamplerBuffers, pos, step, token_out, ring, ring_size: int
           ) -> tuple[LaunchSpec, LaunchSpec, LaunchSpec]:
    """The three launch specs (partial, gather, finish; run in order) that sample one token
    from ``logits`` fp32 [vocab].

    ``pos``, ``step``, ``token_out``: int32 device words; ``ring``: int32 ``[ring_size]`` that
    the device can write (pinned host memory, mapped: with unified addressing its host
    address is its device address).
    """
    shape = getattr(logits, "shape", None)
    if shape is None:
        raise ValueError("logits must be a tensor with a shape ([vocab] fp32)")
    vocab = int(np.prod(shape))
    check_positive(vocab=vocab, ring_size=ring_size)
    n = num_parts(vocab)
    if n > MAX_PARTS:
        raise ValueError(f"vocab {vocab} is above the supported {MAX_PARTS * PART_CHUNK}")
    check_tensor(logits, "logits", (vocab,), "fp32")
    check_tensor(buffers.params, "buffers.params", (PARAMS_BYTES,), "uint8")
    check_tensor(buffers.part_val, "buffers.part_val", (n,), "fp32")
    check_tensor(buffers.part_idx, "buffers.part_idx", (n,), "int32")
    check_tensor(buffers.topk_hist, "buffers.topk_hist", (TOPK_HIST_WORDS,), "int32")
    check_tensor(buffers.topk_pool, "buffers.topk_pool", (TOPK_POOL_WORDS,), "int64")
    for name, t in (("pos", pos), ("step", step), ("token_out", token_out)):
        check_tensor(t, name, None, "int32")
    check_tensor(ring, "ring", (ring_size,), "int32")
    partial = rt.kernels.get(SOURCE, "sample_argmax_partial", PARTIAL_SIGNATURE)
    gather = rt.kernels.get(SOURCE, "sample_gather", GATHER_SIGNATURE)
    finish = rt.kernels.get(SOURCE, "sample_finish", FINISH_SIGNATURE)
    hist, pool = ptr(buffers.topk_hist), ptr(buffers.topk_pool)
    p_args = partial.pack(ptr(logits), vocab, ptr(buffers.params), ptr(buffers.part_val),
                          ptr(buffers.part_idx), hist)
    g_args = gather.pack(ptr(logits), vocab, ptr(buffers.params), hist, pool)
    f_args = finish.pack(ptr(logits), vocab, ptr(buffers.params), ptr(buffers.part_val),
                         ptr(buffers.part_idx), n, hist, pool, ptr(pos), ptr(step), ptr(token_out), ptr(ring),
                         ring_size)
    pdl = pdl_ok(rt)
    return (LaunchSpec(partial, (n, 1, 1), (PART_THREADS, 1, 1), p_args, 0, "sample_argmax_partial", pdl),
            LaunchSpec(gather, (n, 1, 1), (PART_THREADS, 1, 1), g_args, 0, "sample_gather", pdl),
            LaunchSpec(finish, (1, 1, 1), (FINISH_THREADS, 1, 1), f_args, 0, "sample_finish", pdl))


def sample_rows(rt, logits, params, steps, part_val, part_idx, out) -> tuple[LaunchSpec, LaunchSpec]:
    """The two launch specs (run in order) that pick one token for every row of ``logits`` fp32
    ``[M, vocab]`` into ``out`` int32 ``[M]``: row r by the struct ``params[r]`` (uint8 ``[M, 24]``,
    :func:`pack_params_rows`; 8-byte aligned) at ``steps[r]`` (int32 ``[M]``), per
    :func:`nexusrt.reference.sampling.sample`. ``part_val`` fp32 / ``part_idx`` int32
    ``[M, num_parts(vocab)]`` hold the greedy rows' partial argmax. A greedy row of NaN gives
    2**31-1 (the caller reports it). Nothing else is written: the caller tracks the steps.
    """
    shape = getattr(logits, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"logits must be a 2-d fp32 tensor [rows, vocab], got shape {shape}")
    m, vocab = int(shape[0]), int(shape[1])
    check_positive(rows=m, vocab=vocab)
    if m > MAX_ROWS:
        raise ValueError(f"{m} rows are above the supported {MAX_ROWS}")
    n = num_parts(vocab)
    if n > MAX_PARTS:
        raise ValueError(f"vocab {vocab} is above the supported {MAX_PARTS * PART_CHUNK}")
    check_tensor(logits, "logits", (m, vocab), "fp32")
    check_tensor(params, "params", (m, PARAMS_BYTES), "uint8")
    check_aligned(params, "params", 8)  # the struct holds a 64-bit seed
    check_tensor(steps, "steps", (m,), "int32")
    check_tensor(part_val, "part_val", (m, n), "fp32")
    check_tensor(part_idx, "part_idx", (m, n), "int32")
    check_tensor(out, "out", (m,), "int32")
    partial = rt.kernels.get(SOURCE, "sample_rows_partial", ROWS_PARTIAL_SIGNATURE)
    finish = rt.kernels.get(SOURCE, "sample_rows_finish", ROWS_FINISH_SIGNATURE)
    p_args = partial.pack(ptr(logits), vocab, ptr(params), ptr(part_val), ptr(part_idx), m)
    f_args = finish.pack(ptr(logits), vocab, ptr(params), ptr(steps), ptr(part_val), ptr(part_idx), n,
                         ptr(out), m)
    pdl = pdl_ok(rt)
    return (LaunchSpec(partial, (n, m, 1), (PART_THREADS, 1, 1), p_args, 0, "sample_rows_partial", pdl),
            LaunchSpec(finish, (m, 1, 1), (FINISH_THREADS, 1, 1), f_args, 0, "sample_rows_finish", pdl))


def bench_cases(rt, config) -> list[BenchCase]:
    """Greedy and top-k/top-p sampling over ``config.vocab_size`` random logits."""
    from ... import memory

    vocab = config.vocab_size
    rng = np.random.default_rng(0)
    logits = memory.from_numpy((rng.standard_normal(vocab, dtype=np.float32) * 4).astype(np.float32))
    words = memory.zeros((3,), "int32")  # pos, step, token
    ring = memory.zeros((64,), "int32")  # device memory is fine for timing
    cases = []
    for label, params in (("greedy", (0.0, 0, 1.0, 0)), ("top-k 50 top-p 0.9", (0.8, 50, 0.9, 1)),
                          ("top-p 0.95 (1024 cap)", (1.0, 0, 0.95, 2))):
        bufs = alloc_buffers(vocab)
        bufs.set_params(*params)
        specs = sample(rt, logits, bufs, words[0:1], words[1:2], words[2:3], ring, 64)

        def launch(stream, specs=specs):
            for s in specs:
                s.launch(stream)

        cases.append(BenchCase(f"sampling {label} vocab{vocab}", vocab * 4, launch, group="sampling",
                               notes={"vocab": vocab, "_keep": (bufs,)}))
    cases[0].notes["_keep"] += (logits, words, ring)  # shared by the cases: freed once
    # The serving step's batched form: 64 rows, one greedy in four, the others top-k 50 top-p 0.9.
    m, n = 64, num_parts(vocab)
    rows = memory.from_numpy((rng.standard_normal((m, vocab), dtype=np.float32) * 4).astype(np.float32))
    params = memory.from_numpy(pack_params_rows([(0.0, 0, 1.0, 0) if r % 4 == 0 else (0.8, 50, 0.9, r)
                                                 for r in range(m)]))
    keep = (rows, params, memory.from_numpy(np.arange(m, dtype=np.int32)), memory.empty((m, n), "fp32"),
            memory.empty((m, n), "int32"), memory.empty((m,), "int32"))
    specs = sample_rows(rt, *keep)

    def launch_rows(stream, specs=specs):
        for s in specs:
            s.launch(stream)

    cases.append(BenchCase(f"sampling rows {m} (3/4 top-k 50) vocab{vocab}", m * vocab * 4, launch_rows,
                           group="sampling", notes={"vocab": vocab, "rows": m, "_keep": keep}))
    return cases
