"""``CudaBatchRunner``: the serving engine's :class:`~nexusrt.backends.base.BatchRunner` on the GPU.

It shares a :class:`~nexusrt.backends.cuda.runner.CudaRunner`'s weights and cuBLASLt plans
and owns one KV block pool for every sequence (the engine's block tables index it), plus
one spare *scratch* block: the rows of a padded chunk and the padding rows of a batch
bucket write there, never into another sequence's blocks.

A step (:meth:`run_tokens`) is, in stream order on the compute stream:

1. the entries of more than one id (prompt chunks): with ``ragged_prefill`` (the default) all
   together through each GEMM (:mod:`.ragged`); otherwise each alone: its table and ids copied
   in, the prefill graphs of its chunk sizes (over the shared pool), the LM-head graph;
2. the entries of one id (decodes, and one-id chunks), padded to a batch bucket (1, 2, 4,
   … ``max_batch``): one captured graph of GEMMs of that many rows, the rows kernels of
   RoPE/append and split-KV attention (each row its own slot and table), the LM head and
   the batched sampler. A lone decode takes the one-sequence decode graph (GEMVs) instead,
   unless ``deterministic`` or its sequence was pruned, then the batched sampler over its one row;
3. the batched sampler over the prompt chunks' logits rows, then the picks copied back.

Every logits row is picked on the device by the batched sampler (``ops.sampling.sample_rows``,
the algorithm of :mod:`nexusrt.reference.sampling`, so ids equal the CPU engine's rule): row
r's ``SampleParams`` and step are staged each step (zero bytes, i.e. greedy, for rows that
pick nothing or have no params). Greedy rows take the same kernels' greedy case rather than
a separate argmax: one pick path and one output array for every row, and the greedy case
spreads each row over ``ceil(vocab / 4096)`` blocks where a separate argmax gave a row one
block. No logits row is copied to the host by :meth:`run_tokens`.

Every host input of a step is staged in pinned buffers at its own offset first (the step
before ended with a synchronize), so no copy waits for the host.

KV pruning (``sink-window``, ``h2o``; :attr:`CudaBatchRunner.prune_policies`): a pruned sequence's
rows carry their RoPE position (``Rows.position``) apart from their cache slot (``Rows.start``) in
the rows kernels' ``meta``; RoPE reads the position, the KV append and attention the slot.
:meth:`CudaBatchRunner.compact` moves the kept slots to the front of the sequence's blocks on
the runner's stream (:mod:`.compact`, ``cu/kv_compact.cu``).

h2o's scores (``Rows.scores``): an entry that carries them runs in the batched decode graph's
``-scores`` twin, whose attention kernels also write each key's score and whose
``attention_scores_rows`` adds each slot's probability summed over the heads, layer after layer,
into one fp32 row per query row (``attention_decode.ScoresWorkspace``); the rows come back with
the picks and are added into ``Rows.scores`` (float64) on the host. A prompt chunk of such an
entry runs there too, one query row per id (id j at slot ``start + j``, attending to slots
``0 .. start + j``), so its rows contribute exactly as the CPU decoder's prompt rows do: every id
but the last in replays of up to ``max_batch`` rows (each waited for: its staging is reused),
then the last ids of every decode entry together. Attention over the chunk is then the decode
kernel's, row by row, not the ragged prefill's tensor-core tiles: the price of exact scores.

Tensor parallelism (``tp``, a :class:`~.collectives.RankComm`; ``base`` is then a rank's
``CudaRunner`` over its shard): every chain of the step takes the rank's three changes
(:mod:`.collectives`: the residual added by rank 0 only in O and down, an in-place all-reduce of
the residual rows after each, the LM head's vocab slice gathered), the batch rows' logits
gathered rank-major and unpacked into whole rows before the sampler. Every rank runs every step
with the same entries, so it makes the same choices (lone decode or bucket, ragged passes), runs
the same collectives in the same order, and samples the same rows alike (:mod:`.tp_worker`). h2o
is not offered: a rank's scores cover its own heads only.

``deterministic``: a row's ids do not depend on the batch it runs in: every decode runs the
batched graph of the largest bucket (one set of GEMM kernels; no GEMV path for a lone one),
ragged prompt rows pad to the largest row bucket, attention splits the keys in fixed
``fixed_chunk``-token pieces; the engine cuts prompts at fixed chunk boundaries
(``SchedulerConfig.fixed_chunks``).
"""

from __future__ import annotations

import time

import numpy as np

from ... import scheduler
from ...driver.calls import call
from ...errors import NexusRTError
from ...kernels.ops import attention_decode as attn_dec
from ...kernels.ops import sampling as sampling_ops
from ...kernels.ops.common import sm_count
from ...kvcache.blocks import BLOCK_SIZE, blocks_for
from ...memory.copy import copy_batch_supported, queue_copy_batch
from ..base import Rows
from . import step as steps
from .batch_buffers import BatchBuffers, batch_buckets, check_entry
from .buffers import RunnerBuffers
from .chunks import buckets_for, plan_chunks
from .compact import Compactor
from .host_swap import HostSwapPools
from .ragged import RaggedPrefill
from .ragged_layout import bucket_for_rows


def _pruned(r: Rows) -> bool:
    """Whether the entry's RoPE position differs from its cache slot (its sequence was pruned)."""
    return r.first_position != r.start


class CudaBatchRunner:
    """Many sequences over one KV pool of ``num_blocks`` blocks, on ``base``'s weights.

    ``max_batch``: most sequences in one step; ``max_chunk``: most ids of one prompt chunk
    (the engine's token budget); ``deterministic``: see the module docstring;
    ``ragged_prefill=False``: the per-sequence prompt path, kept to compare the two. A
    tensor-parallel rank's ``base`` (built with a :class:`~.collectives.RankComm`) makes this one
    a rank too: its ``tp`` is the base's.
    """

    def __init__(self, base, num_blocks: int, max_batch: int = 32, max_chunk: int = 2048,
                 deterministic: bool = False, ragged_prefill: bool = True, host_blocks: int = 0):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        if isinstance(host_blocks, bool) or not isinstance(host_blocks, int) or host_blocks < 0:
            raise ValueError(f"host_blocks must be an integer >= 0, got {host_blocks!r}")
        tp = self.tp = getattr(base, "tp", None)  # the weights are the shard its comm was made for
        if tp is not None and host_blocks:
            raise ValueError("host_blocks on a tensor-parallel rank: the host tier is not wired through the ranks")
        cfg, rt = base.config, base.rt
        self.base, self.config, self.rt = base, cfg, rt
        self.num_blocks, self.max_context, self.host_blocks = num_blocks, base.max_context, host_blocks
        self.scratch = num_blocks  # the extra block no sequence is given
        self.deterministic, self.ragged_prefill = bool(deterministic), bool(ragged_prefill)
        self.batch_buckets = batch_buckets(max_batch)
        self.prefill_buckets = buckets_for(min(max(int(max_chunk), 1), self.max_context), base.buckets)
        self.capacity = self.max_context + self.prefill_buckets[0] - 1  # a padded chunk's rows
        self.width = blocks_for(self.capacity)
        self.stream = base.stream
        self._graphs: dict = {}
        self._samplers: dict = {}  # (first row, rows) -> the batched sampler's two launch specs
        self._row_of: dict[int, int] = {}  # the last step's batch index -> logits row
        self.timings = {"steps": 0, "enqueue_s": 0.0, "wait_s": 0.0, "picks_s": 0.0}  # summed over run_tokens
        self.pre = self.bb = self.ragged = self.compactor = self.swapper = None
        # KV pruning: the rows kernels take each row's RoPE position apart from its cache slot, and
        # compact() moves kept slots (kv_compact.cu). The per-sequence prompt path's graphs use one
        # word for both, so it cannot run a pruned sequence's chunk. h2o's scored entries (prompt
        # chunks too) run as decode rows whose attention writes the scores (module docstring).
        self.prune_policies = frozenset({"sink-window", "h2o"}) if self.ragged_prefill else frozenset()
        if tp is not None:  # a rank's attention mass covers its own heads; nothing sums them across ranks
            self.prune_policies -= {"h2o"}
        self.scores = self.h_scores = None  # h2o's score rows, made at the first scored step
        rt.device.make_current()
        try:
            # Ragged: a step's chunks share the rows, so as many as the token budget whatever the
            # context (one pass per engine step); per sequence: the largest chunk bucket.
            rows = max(self.prefill_buckets[-1], -(-int(max_chunk) // 64) * 64 if self.ragged_prefill else 0)
            vp = None if tp is None else tp.vocab_part
            self.pre = RunnerBuffers(rt, cfg, self.max_context, rows, positions=self.capacity, pool_blocks=num_blocks + 1,
                                     lm_head_rows=vp)
            bmax = self.batch_buckets[-1]
            # A step's chunks hold at most max_chunk ids; each is padded by <= 1/8 or < 64 rows.
            self.prompt_rows = 2 * int(max_chunk) + self.prefill_buckets[0] * (bmax + 1)
            self.bb = BatchBuffers(rt, cfg, bmax, self.width, self.prompt_rows, self.pre.k_pools,
                                   self.pre.v_pools, vocab_part=vp, ranks=1 if tp is None else tp.size)
            self.compactor = Compactor(rt, cfg, self.pre.k_pools, self.pre.v_pools, num_blocks=num_blocks,
                                       width=self.width, scratch=self.scratch, rows=min(bmax, 16),
                                       stream=self.stream, h2d=self._h2d)
            if host_blocks:  # the engine's host tier: preempted sequences' blocks swapped out and back
                self.swapper = HostSwapPools(cfg, self.pre.k_pools, self.pre.v_pools, num_blocks=num_blocks,
                                             host_blocks=host_blocks, memcpy=self._memcpy,
                                             memcpy_batch=self._memcpy_batch if copy_batch_supported() else None)
            self.fixed_chunk = self._fixed_chunk() if self.deterministic else 0
            if tp is not None:  # NCCL connects on first use: outside the captures below
                self._warm_up()
            self._capture()
            if self.ragged_prefill:
                self.ragged = RaggedPrefill(rt, cfg, base.weights, base.lt, self.pre, self.bb, scratch=self.scratch,
                                            stream=self.stream, batch_buckets=self.batch_buckets, h2d=self._h2d,
                                            d2d=self._d2d, deterministic=self.deterministic, tp=tp)
        except BaseException:
            self.close()
            raise

    # -- setup ----------------------------------------------------------------------------------
    def _fixed_chunk(self) -> int:
        """Tokens per attention split in deterministic mode: the smallest multiple of the kernel's
        step that keeps every context within the kernel's split cap."""
        cfg = self.config
        step = attn_dec.tokens_per_step(cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads)
        chunk = max(256, -(-self.max_context // attn_dec.MAX_SPLITS))
        return -(-chunk // step) * step

    def _splits(self, rows: int) -> int:
        cfg = self.config
        hkv, group = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
        if self.deterministic:
            return -(-self.max_context // self.fixed_chunk)
        # Four blocks per SM: one row's blocks are few and short, so more of them hide latency
        # (at 64 rows of the 8B shape, 2 splits ran 3% faster than 1; 8 and 16 slower).
        return attn_dec.choose_splits(hkv * rows, cfg.head_dim, group, self.max_context, sm_count(self.rt),
                                      blocks_per_sm=4)

    def _decode_buckets(self) -> tuple[int, ...]:
        """The batch buckets with a graph: deterministic decodes always take the largest's."""
        return self.batch_buckets[-1:] if self.deterministic else self.batch_buckets

    def _warm_up(self) -> None:
        """One eager collective of every size the captured graphs hold (:meth:`RankComm.warm_up`)."""
        pre, bb, tp = self.pre, self.bb, self.tp
        rows = [pre.hidden[0:1]] + [bb.hidden[0:m] for m in self._decode_buckets()]
        if not self.ragged_prefill:
            rows += [pre.hidden[0:m] for m in self.prefill_buckets]
        gathers = [(bb.rank_logits[0:m], bb.gathered[0:tp.size * m * tp.vocab_part]) for m in self._decode_buckets()]
        tp.warm_up(rows, pre.logits, self.stream, gathers)

    def _capture(self) -> None:
        rt, cfg, w, lt, tp = self.rt, self.config, self.base.weights, self.base.lt, self.tp
        if not self.ragged_prefill:  # the per-sequence prompt path's graphs
            for m in self.prefill_buckets:
                self._graphs[("prefill", m)] = scheduler.capture(
                    steps.prefill_stages(rt, cfg, w, self.pre, m, lt, tp=tp), stream="compute")
            self._graphs[("logits",)] = scheduler.capture(steps.logits_stages(rt, cfg, w, self.pre, tp),
                                                          stream="compute")
        if not self.deterministic:  # deterministic decodes always take the largest bucket's graph
            # A lone request's step: the one-sequence chain, its attention on tensor cores where the
            # batched step's is too (mma_ok).
            self._graphs[("decode1",)] = scheduler.capture(
                steps.decode_stages(rt, cfg, w, self.pre, sample=False, meta=self.bb.one_meta, tp=tp,
                                    mma=attn_dec.mma_ok(rt)), stream="compute")
        for m in self._decode_buckets():
            ws = self.bb.workspace(cfg, m, self._splits(m))
            self._graphs[("batch", m)] = scheduler.capture(
                steps.batch_decode_stages(rt, cfg, w, self.bb, m, lt, ws, self.fixed_chunk, tp=tp), stream="compute")

    # -- helpers --------------------------------------------------------------------------------
    def _fill_table(self, dst: np.ndarray, table: list[int]) -> None:
        dst[:len(table)] = table
        dst[len(table):] = self.scratch

    def _h2d(self, dst, src_ptr: int, nbytes: int) -> None:
        call("cuMemcpyHtoDAsync", dst.ptr, src_ptr, nbytes, self.stream.handle)

    def _d2d(self, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        call("cuMemcpyDtoDAsync", dst_ptr, src_ptr, nbytes, self.stream.handle)

    def _memcpy(self, name: str, dst_ptr: int, src_ptr: int, nbytes: int) -> None:
        call(name, dst_ptr, src_ptr, nbytes, self.stream.handle)

    def _memcpy_batch(self, copies) -> None:
        queue_copy_batch(copies, self.stream.handle)

    def _set_word(self, word, value: int) -> None:
        call("cuMemsetD32Async", word.ptr, int(value) & 0xFFFFFFFF, 1, self.stream.handle)

    def _sample(self, first: int, count: int) -> None:
        """Launch the batched sampler over logits rows ``first .. first+count-1`` into ``bb.next``."""
        key = (first, count)
        specs = self._samplers.get(key)
        if specs is None:
            bb, rows = self.bb, slice(first, first + count)
            specs = self._samplers[key] = sampling_ops.sample_rows(
                self.rt, bb.logits[rows], bb.params[rows], bb.steps[rows], bb.part_val[rows], bb.part_idx[rows],
                bb.next[rows])
        for spec in specs:
            spec.launch(self.stream)

    def _stage_sampling(self, batch: list[Rows], row_of: dict[int, int]) -> None:
        """Each logits row's sampler inputs staged (:meth:`BatchBuffers.stage_sampling`), then one copy
        of each array, ahead of every launch of the step."""
        bb = self.bb
        bb.stage_sampling([(row, batch[i].params, batch[i].step) for i, row in row_of.items()])
        self._h2d(bb.params, bb.h_params.ptr, bb.h_params.nbytes)
        self._h2d(bb.steps, bb.h_steps.ptr, bb.h_steps.nbytes)

    # -- one step ---------------------------------------------------------------------------------
    def _prefill(self, r: Rows, slot: int, staged: int, logits_row: int | None) -> int:
        """Enqueue one prompt chunk; returns the staged ids it used (its padded length)."""
        pre, h = self.pre, self.config.hidden_size
        n = len(r.token_ids)
        table_h = self.bb.h_pre_tables.array[slot]
        self._fill_table(table_h, r.table)
        self._h2d(pre.block_table, self.bb.h_pre_tables.ptr + slot * self.width * 4, self.width * 4)
        chunks = plan_chunks(n, self.prefill_buckets, r.start, self.width * BLOCK_SIZE)
        padded = sum(b for b, _ in chunks)
        if staged + padded > self.prompt_rows:
            raise ValueError(f"a step's prompt chunks ({staged + padded} staged ids) exceed this runner's "
                             f"max_chunk; the engine's token budget must not be above it")
        ids_h = self.bb.h_prompt.array
        ids_h[staged:staged + n] = r.token_ids
        ids_h[staged + n:staged + padded] = 0
        done = 0
        for bucket, real in chunks:
            self._h2d(pre.ids, self.bb.h_prompt.ptr + 4 * (staged + done), 4 * bucket)
            self._set_word(pre.pos, r.start + done)
            self._graphs[("prefill", bucket)].replay()
            done += real
        if logits_row is not None:
            if real > 1:  # the chunk's last row to row 0, where the LM-head graph reads it
                self._d2d(pre.hidden.ptr, pre.hidden.ptr + 4 * h * (real - 1), 4 * h)
            self._graphs[("logits",)].replay()
            vocab = self.config.vocab_size
            self._d2d(self.bb.logits.ptr + 4 * vocab * logits_row, pre.logits.ptr, 4 * vocab)
        return staged + padded

    def _decode_one(self, r: Rows) -> None:
        """A lone decode through the one-sequence graph (GEMVs); its logits to row 0 (the caller samples)."""
        pre = self.pre
        slot = self.bb.h_pre_tables.shape[0] - 1
        self._fill_table(self.bb.h_pre_tables.array[slot], r.table)
        self._h2d(pre.block_table, self.bb.h_pre_tables.ptr + slot * self.width * 4, self.width * 4)
        self._set_word(pre.token, int(r.token_ids[0]))
        self._set_word(pre.pos, r.start)  # attention's length: the slot count
        self._set_word(self.bb.one_meta[0:1], r.first_position)  # RoPE's position (past the slot once pruned)
        self._set_word(self.bb.one_meta[1:2], r.start)
        self._graphs[("decode1",)].replay()
        self._d2d(self.bb.logits.ptr, pre.logits.ptr, 4 * self.config.vocab_size)

    def _score_graphs(self) -> None:
        """h2o's score workspace, its pinned copy (``bmax`` rows of ``max_context`` slots) and the
        batch graphs' scores twins for every bucket, made at the first scored step while the stream
        is idle (as ``__init__`` captures the others), so a runner without h2o never holds them."""
        if self.scores is not None:
            return
        from ... import memory

        cfg, bb, stride = self.config, self.bb, self.max_context
        scores = attn_dec.alloc_scores(cfg.num_attention_heads, bb.bmax, stride, tag="batch")
        try:
            self.h_scores = memory.pinned((bb.bmax, stride), "fp32", tag="batch")
            for m in self._decode_buckets():
                self._graphs[("batch-scores", m)] = scheduler.capture(steps.batch_decode_stages(
                    self.rt, cfg, self.base.weights, bb, m, self.base.lt, bb.workspace(cfg, m, self._splits(m)),
                    self.fixed_chunk, scores=scores), stream="compute")
        except BaseException:  # nothing half-made stays: the next scored step tries again
            steps.close_graphs(self.stream, {k: self._graphs.pop(k) for k in list(self._graphs) if k[0] == "batch-scores"})
            for t in (scores, self.h_scores):
                if t is not None:
                    t.free()
            self.h_scores = None
            raise
        self.scores = scores

    def _decode_batch(self, rows: list[Rows]) -> bool:
        """Enqueue the batched decode graph over ``rows``, one query row each; returns whether it is
        the scores twin (some entry carries ``Rows.scores``). An h2o prompt chunk's ids but its last
        run first, ``bmax`` query rows a replay in order (each replay's K/V appended before the next
        attends to them: causal), each replay waited for and its scores added on the host; the final
        replay then holds every entry's last id, as a step of plain decodes does."""
        early = [(r, j) for r in rows for j in range(len(r.token_ids) - 1)]
        for first in range(0, len(early), self.bb.bmax):
            group = early[first:first + self.bb.bmax]
            self._replay_rows(group)
            self.stream.synchronize()  # its staging is free again, its scores are here
            self._add_scores(group)
        return self._replay_rows([(r, len(r.token_ids) - 1) for r in rows])

    def _replay_rows(self, rows: list[tuple[Rows, int]]) -> bool:
        """Stage query rows ``(entry, j)`` (id j of the entry, at its slot and position + j) and replay
        the batch graph of their bucket (its scores twin if an entry carries scores, whose rows
        then come back to ``h_scores``); returns whether the twin ran."""
        bb = self.bb
        n = len(rows)
        # Deterministic: always the largest bucket, so every row runs the same GEMM kernels
        # (cuBLASLt picks its algorithm per row count) whatever the batch around it.
        m = bb.bmax if self.deterministic else bucket_for_rows(n, self.batch_buckets)
        ids, meta, tables = bb.h_ids.array, bb.h_meta.array, bb.h_tables.array
        ids[:n] = np.fromiter((r.token_ids[j] for r, j in rows), np.int32, n)
        meta[:n, 0] = np.fromiter((r.first_position + j for r, j in rows), np.int32, n)  # RoPE position
        meta[:n, 1] = np.fromiter((r.start + j for r, j in rows), np.int32, n)  # cache slot: attention covers 0..slot
        meta[:n, 2] = np.arange(n, dtype=np.int32)
        tables[:min(m, n + 1)] = self.scratch
        for k, (r, _) in enumerate(rows):
            tables[k, :len(r.table)] = r.table
        if m > n:  # padding rows: slot 0 of the scratch block (table row n is all scratch)
            ids[n:m] = 0
            meta[n:m] = (0, 0, n, 0)
        self._h2d(bb.ids, bb.h_ids.ptr, 4 * m)
        self._h2d(bb.meta, bb.h_meta.ptr, 16 * m)
        self._h2d(bb.tables, bb.h_tables.ptr, 4 * self.width * min(m, n + 1))
        if all(r.scores is None for r, _ in rows):
            self._graphs[("batch", m)].replay()
            return False
        scores = self.scores
        call("cuMemsetD32Async", scores.scores.ptr, 0, m * scores.stride, self.stream.handle)
        self._graphs[("batch-scores", m)].replay()
        call("cuMemcpyDtoHAsync", self.h_scores.ptr, scores.scores.ptr, 4 * n * scores.stride, self.stream.handle)
        return True

    def _add_scores(self, rows: list[tuple[Rows, int]]) -> None:
        """Add the score rows of the last replay (in ``h_scores`` once the stream ran) into each
        entry's ``Rows.scores``: query row ``(entry, j)`` covers the entry's slots ``0 .. start + j``."""
        got = self.h_scores.array
        for k, (r, j) in enumerate(rows):
            if r.scores is not None:
                top = r.start + j + 1
                r.scores[:top] += got[k, :top]

    def run_tokens(self, batch: list[Rows]) -> list[int | None]:
        if not batch:
            return []
        t0 = time.perf_counter()
        for r in batch:
            check_entry(r, self.max_context, self.width, self.num_blocks, self.config.vocab_size)
            if self.ragged is None and len(r.token_ids) > 1 and _pruned(r) and r.scores is None:
                raise ValueError(f"the per-sequence prompt path (ragged_prefill=False) cannot run a pruned "
                                 f"sequence's chunk (RoPE position {r.first_position}, cache slot {r.start}): its "
                                 "prefill graphs use one number for both; use the ragged path")
            if self.tp is not None and r.scores is not None:
                raise ValueError("h2o scores (Rows.scores) on a tensor-parallel rank would cover its own heads only; "
                                 "not offered (prune_policies)")
        self.rt.device.make_current()
        self.stream.synchronize()  # the staging buffers are free once the last step's copies ran
        self.compactor.reset()
        if any(r.scores is not None for r in batch):
            self._score_graphs()
        # Single ids, and every entry with h2o scores (one query row per id), run as decode rows.
        singles = [i for i, r in enumerate(batch) if len(r.token_ids) == 1 or r.scores is not None]
        chunks = [i for i, r in enumerate(batch) if len(r.token_ids) > 1 and r.scores is None]
        if len(singles) > self.bb.bmax or len(chunks) > self.bb.bmax:
            raise ValueError(f"a step of {len(batch)} entries exceeds max_batch {self.bb.bmax}")
        # batch index -> logits row: a single's is its batch row, a chunk's follows the bmax batch rows
        row_of = {i: k for k, i in enumerate(singles) if batch[i].logits}
        row_of.update((i, self.bb.bmax + j) for j, i in enumerate(chunks) if batch[i].logits)
        # The batch decode graph samples its rows itself, so their inputs go first; otherwise the
        # sampler runs eagerly after the step's work, and staging its inputs after that work is
        # enqueued keeps the host off the device's path (a lone decode's step is ~5 ms).
        # A lone decode, pruned or not, takes the one-sequence GEMV graph (its RoPE/append reads
        # the position and slot apart from bb.one_meta), unless it needs scores (h2o): the scores
        # twin is the batch graph's.
        lone = len(singles) == 1 and not self.deterministic and batch[singles[0]].scores is None
        graph_samples = bool(singles) and not lone
        if graph_samples:
            self._stage_sampling(batch, row_of)
        if self.ragged is None:
            staged = 0
            for j, i in enumerate(chunks):
                staged = self._prefill(batch[i], j, staged, row_of.get(i))
        elif chunks:
            self.ragged.run([batch[i] for i in chunks])
        scored = False
        if lone:
            self._decode_one(batch[singles[0]])
        elif singles:
            scored = self._decode_batch([batch[i] for i in singles])
        if not graph_samples:
            self._stage_sampling(batch, row_of)
        if lone:
            self._sample(0, 1)
        if chunks:
            self._sample(self.bb.bmax, len(chunks))
        rows = len(self.bb.h_next.array)
        call("cuMemcpyDtoHAsync", self.bb.h_next.ptr, self.bb.next.ptr, 4 * rows, self.stream.handle)
        t1 = time.perf_counter()
        self.stream.synchronize()
        t2 = time.perf_counter()
        if scored:
            self._add_scores([(batch[i], len(batch[i].token_ids) - 1) for i in singles])
        picks = self.bb.h_next.array
        self._row_of = row_of
        out: list[int | None] = [None] * len(batch)
        for i, row in row_of.items():
            token = int(picks[row])
            if not 0 <= token < self.config.vocab_size:
                raise NexusRTError(f"the logits of a row were all NaN (pick {token})")
            out[i] = token
        t = self.timings
        t["steps"] += 1
        t["enqueue_s"] += t1 - t0  # checks, staging, launches (the device may idle meanwhile)
        t["wait_s"] += t2 - t1  # until the device finished the step
        t["picks_s"] += time.perf_counter() - t2
        return out

    def run(self, batch: list[Rows]) -> list[np.ndarray | None]:
        """:meth:`run_tokens`' step, returning the logits rows instead (tests; a host copy each)."""
        self.run_tokens([Rows(r.token_ids, r.start, r.table, r.logits, r.position, r.scores) for r in batch])
        out: list[np.ndarray | None] = [None] * len(batch)
        for i, row in self._row_of.items():  # the logits row of each entry, as run_tokens placed it
            out[i] = self.bb.logits[row:row + 1].to_numpy().reshape(-1).copy()
        return out

    def compact(self, table: list[int], keep) -> None:
        """Move slots ``keep`` to the front of ``table`` in every layer's K and V pool (KV pruning), on
        the runner's stream after the step's work (:mod:`.compact`)."""
        self.rt.device.make_current()
        self.compactor.run(table, keep)

    def swap_blocks(self, outs, ins) -> None:
        """Copy device blocks to the host tier (``outs``: (device, host) pairs), then host blocks
        back (``ins``: (host, device)), every layer's K and V, on the runner's stream ahead of the
        next step's work (:mod:`.host_swap`)."""
        if self.swapper is None:
            raise ValueError("swap_blocks: this runner has no host tier (host_blocks=0)")
        self.rt.device.make_current()
        self.swapper.copy(outs, ins)

    def close(self) -> None:
        steps.close_graphs(self.stream, self._graphs)  # waits for the stream: no swap copy is in flight
        self._samplers.clear()
        for part in (self.ragged, self.compactor, self.swapper, self.scores, self.h_scores, self.bb, self.pre):
            if part is not None:
                part.free()
        self.bb = self.pre = self.ragged = self.compactor = self.swapper = self.scores = self.h_scores = None
