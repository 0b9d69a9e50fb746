"""The batch runner's ragged prefill: every prompt chunk of a step through each GEMM together.

:class:`~nexusrt.backends.cuda.batch.CudaBatchRunner` (``ragged_prefill=True``) hands a step's
chunks (entries of more than one id) to :meth:`RaggedPrefill.run`, which lays their rows out
one after another (:mod:`.ragged_layout`), pads them to a row bucket and runs
:func:`~.step.ragged_prefill_stages` for that bucket: embedding, norms, the four GEMMs and
SiLU*mul once over all rows, RoPE/append once with the rows kernel (each row its position,
slot and table row; padding rows write the scratch block), and per layer one tensor-core
attention launch per chunk on its slice of ``q``/``attn``, with its own table row and start
word. Then each chunk's last row is copied to ``bb.hidden[j]`` and one LM-head GEMM over those
rows fills the chunks' logits rows ``bb.logits[bmax + j]``, where ``run_tokens`` reads them.

How it is submitted, and why: the mix of chunks changes every step, so a captured graph per
(bucket, chunk count) would still need every attention node's rows, table and grid patched
per step (``cuGraphExecKernelNodeSetParams``, one driver call each, about as many as the
launches themselves), and 24 buckets x up to 64 chunk counts of ~400-node graphs. Instead the
non-attention launches are cached per bucket as a flat *program* (built and validated as a
task graph when the runner is made), and a step walks it, launching each entry in stream
order; the attention specs are made once per (layer, chunk slot) and re-pointed in place per
step (:func:`~nexusrt.kernels.ops.attention_prefill.rebind`, ~1.5 us against ~35 us for the
launcher). Not through ``nexusrt.scheduler.submit``: it would build and validate a 400-2,300
stage graph and ring a progress doorbell after every stage, each step. Measured on this
project's 2-core CPU with no-op launches (``scripts/probe_ragged_host.py``, 32 layers, ~1,930
ids): walking the program costs 0.35 ms at 4 chunks and 3.9 ms at 64; building the stage list
and validating it costs 19 ms and 136 ms. The step stays one chain on the compute stream,
which the task-graph tests check for steps of 1, 3 and 7 chunks.
"""

from __future__ import annotations

from ... import memory
from ...kernels.ops import attention_prefill as attn_pre
from ...scheduler.graph import TaskGraph
from . import step as steps
from .buffers import OwnedBuffers
from .ragged_layout import Staging, bucket_for_rows, cut_pieces, group_passes, lay_out, row_buckets

TAG = "batch"


class RaggedBuffers(OwnedBuffers):
    """Per-row meta and per-chunk tables and start words on the device (``slots`` chunk rows and
    the all-scratch row ``slots`` after them), and their pinned staging."""

    def __init__(self, rows: int, slots: int, width: int):
        super().__init__()
        try:
            self.meta = self._t(memory.zeros((rows, 4), "int32", tag=TAG))
            self.tables = self._t(memory.zeros((slots + 1, width), "int32", tag=TAG))
            self.starts = self._t(memory.zeros((slots,), "int32", tag=TAG))
            self.h_ids = self._t(memory.pinned((rows,), "int32", tag=TAG))
            self.h_meta = self._t(memory.pinned((rows, 4), "int32", tag=TAG))
            self.h_tables = self._t(memory.pinned((slots + 1, width), "int32", tag=TAG))
            self.h_starts = self._t(memory.pinned((slots,), "int32", tag=TAG))
        except BaseException:
            self.free()
            raise
        self.staging = Staging(self.h_ids.array, self.h_meta.array, self.h_tables.array, self.h_starts.array)


def program(stages) -> list:
    """A validated stage chain as what a step launches: a callable taking the stream per stage,
    and in place of each ``layer{i}.attention`` marker the layer index ``i``."""
    TaskGraph(stages, stages[0].name.split(".")[0]).validate()
    out, layer = [], 0
    for s in stages:
        if s.kind == "marker":
            out.append(layer)
            layer += 1
        elif s.kind == "launch":
            out.append(s.kernel.launch)
        else:
            out.append(s.kernel)
    return out


class RaggedPrefill:
    """The ragged prompt half of a batch runner's step over ``pre``'s rows (``pre.chunk`` of them:
    the runner sizes them by its token budget) and ``bb``'s chunk logits rows. ``h2d(dst, src_ptr, nbytes)`` and
    ``d2d(dst_ptr, src_ptr, nbytes)`` enqueue copies on ``stream`` (the runner's)."""

    def __init__(self, rt, cfg, w, lt, pre, bb, *, scratch: int, stream, batch_buckets, h2d, d2d,
                 deterministic: bool = False, tp=None):
        self.rt, self.cfg, self.pre, self.bb, self.stream = rt, cfg, pre, bb, stream
        self.scratch, self.deterministic = scratch, bool(deterministic)
        self.h2d, self.d2d = h2d, d2d
        self.batch_buckets = batch_buckets
        self.rows = pre.chunk
        self.buckets = row_buckets(self.rows)
        self.slots = bb.bmax
        self.buf = RaggedBuffers(self.rows, self.slots, bb.width)
        try:
            buf = self.buf
            buf.h_tables.array[self.slots] = scratch  # padding rows' table row: every block is scratch
            w4 = 4 * bb.width
            h2d(buf.tables[self.slots], buf.h_tables.ptr + self.slots * w4, w4)
            # Deterministic mode pads every pass to the largest row bucket and every chunk-logits
            # step to the largest batch bucket (batch invariance), so only those are built.
            row_buckets_used = self.buckets[-1:] if self.deterministic else self.buckets
            logit_buckets = batch_buckets[-1:] if self.deterministic else batch_buckets
            # tp: a rank's programs hold its all-reduces as host stages, called with the stream in order.
            self.programs = {m: program(steps.ragged_prefill_stages(rt, cfg, w, pre, buf, m, lt, tp=tp))
                             for m in row_buckets_used}
            hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            q, out = pre.q[0:self.rows], pre.attn[0:self.rows]
            # One spec per layer (only the pools differ between layers), re-pointed at each chunk's
            # rows right before its launch (a launch copies its arguments).
            self.attention = [attn_pre.attention_prefill(
                rt, q, out, pre.k_pools[i], pre.v_pools[i], buf.tables[0], buf.starts[0:1], num_q_heads=hq,
                num_kv_heads=hkv, head_dim=d) for i in range(cfg.num_hidden_layers)]
            self.logits = {m: program(steps.chunk_logits_stages(rt, cfg, w, bb, m, lt, tp)) for m in logit_buckets}
        except BaseException:
            self.free()
            raise

    def run(self, entries) -> None:
        """Enqueue every prompt chunk of a step (``entries``: :class:`~nexusrt.backends.base.Rows` of
        more than one id, at most ``bmax``), leaving chunk ``j``'s logits in ``bb.logits[bmax + j]``.
        The staging buffers must be free (the runner synchronized before the step)."""
        if not entries or len(entries) > self.slots:
            raise ValueError(f"a ragged step takes 1..{self.slots} prompt chunks, got {len(entries)}")
        pre, bb, buf = self.pre, self.bb, self.buf
        h = self.cfg.hidden_size
        pieces = cut_pieces(entries, self.rows)
        last = {p.owner: p for p in pieces}  # the piece holding each chunk's last id
        for k, group in enumerate(group_passes(pieces, self.rows)):
            if k:  # a later pass restages the pinned buffers: the earlier pass's copies must be done
                self.stream.synchronize()
            lay = lay_out(entries, group, self.buckets, self.scratch, self.slots, buf.staging,
                          fixed_bucket=self.deterministic)
            m, n = lay.bucket, len(group)
            self.h2d(pre.ids, buf.h_ids.ptr, 4 * m)
            self.h2d(buf.meta, buf.h_meta.ptr, 16 * m)
            self.h2d(buf.tables, buf.h_tables.ptr, 4 * bb.width * n)
            self.h2d(buf.starts, buf.h_starts.ptr, 4 * n)
            self._launch(self.programs[m], [(o, c) for o, c in zip(lay.offsets, lay.lengths)])
            for j, p in enumerate(group):
                if last[p.owner] is p:  # gather the chunk's last row for the LM head
                    self.d2d(bb.hidden.ptr + 4 * h * p.owner, pre.hidden.ptr + 4 * h * lay.last_rows[j], 4 * h)
        m = bb.bmax if self.deterministic else bucket_for_rows(len(entries), self.batch_buckets)
        for f in self.logits[m]:
            f(self.stream)

    def _launch(self, prog: list, slices: list[tuple[int, int]]) -> None:
        pre, buf, stream = self.pre, self.buf, self.stream
        rows = [attn_pre.bind_rows(pre.q[o:o + c], pre.attn[o:o + c], buf.tables[j], buf.starts[j:j + 1])
                for j, (o, c) in enumerate(slices)]  # checked once per pass, re-used by every layer
        rebind = attn_pre.rebind
        for f in prog:
            if f.__class__ is int:  # layer f's attention, one launch per chunk
                spec = self.attention[f]
                for r in rows:
                    rebind(spec, r).launch(stream)
            else:
                f(stream)

    def free(self) -> None:
        """Release the buffers (the specs and programs hold no device memory of their own)."""
        if self.buf is not None:
            self.buf.free()
            self.buf = None
