"""A CUDA rank's place in a tensor-parallel group, as the stage chains (:mod:`.step`) use it.

The chains stay the single-device ones over the rank's *local* config (``Hq/N`` heads,
``Hkv/N`` KV heads, ``I/N`` MLP width, :meth:`~nexusrt.parallel.ShardPlan.local_config`); a
:class:`RankComm` adds three things where the plan needs them:

- **The residual on rank 0 only.** The row-parallel O and down products are partial sums. On
  one device their GEMV/GEMM adds the residual in its epilogue (``x = W·a + x``); a rank does
  the same on rank 0 and writes its bare partial into ``x`` elsewhere, so an in-place
  all-reduce of ``x`` gives every rank ``x + Σ partials``: the sum with no extra buffer and no
  extra kernel, and every rank then holds the same residual rows (the next layer's input).
- **An all-reduce stage** after each of those products (two per layer), in place on ``x``.
- **A vocab-parallel LM head**: the rank's GEMV writes its ``V/N`` rows straight into its own
  slice of the full logits row, and an in-place all-gather (NCCL's ``send == recv + rank ·
  count`` form) fills in the other ranks' slices. Every rank then samples the same logits, so
  every rank's device-side token and state advance alike and the decode graph stays SPMD.

The collectives are host stages (callables given the stream): run inside stream capture
they enqueue NCCL's kernels into the captured graph, so a decode step is still one
``cuGraphLaunch`` with its all-reduces inside. The group is anything with NcclGroup's
``rank``, ``size``, ``all_reduce(tensor, stream)`` and ``all_gather(send, recv, stream)``.

:func:`time_step_collectives` times those collectives of one decode step alone on a rank
(``nexusrt-bench --stage decode --tensor-parallel N`` reports the slowest rank's).
"""

from __future__ import annotations

import numpy as np

from ... import memory, scheduler
from ...driver.streams import Event
from ...memory.copy import copy_2d_params, queue_copy_2d
from ...parallel.comm import check_repeats

TIMING_TAG = "tp-timing"


class RankComm:
    """Rank ``group.rank`` of ``group.size`` for a model of ``vocab_size`` (the whole vocabulary)."""

    def __init__(self, group, vocab_size: int):
        if vocab_size % group.size:  # the plan refuses this first; a direct caller gets it here
            raise ValueError(f"vocab_size {vocab_size} is not divisible by the group size {group.size}")
        self.group, self.rank, self.size = group, group.rank, group.size
        self.vocab_part = vocab_size // group.size

    def residual(self, x):
        """The ``residual=`` of a row-parallel product writing ``x``: ``x`` on rank 0, else None."""
        return x if self.rank == 0 else None

    def vocab_slice(self, logits):
        """This rank's ``[1, V/N]`` slice of the fp32 ``[1, V]`` logits row (a view)."""
        v = self.vocab_part
        return logits.reshape(logits.shape[-1])[self.rank * v:(self.rank + 1) * v].reshape(1, v)

    def all_reduce(self, x):
        """A stage callable: ``x`` summed over the ranks in place, on the stage's stream."""
        group = self.group

        def all_reduce(stream):
            group.all_reduce(x, stream)

        return all_reduce

    def all_gather(self, send, recv):
        """A stage callable: every rank's ``send`` into ``recv`` in rank order, on the stage's stream."""
        group = self.group

        def all_gather(stream):
            group.all_gather(send, recv, stream)

        return all_gather

    def unpack_rows(self, gathered, logits):
        """A stage callable: ``gathered`` (fp32, every rank's ``[m, V/N]`` block in rank order, as
        an all-gather of ``m`` logits rows leaves them) into ``logits`` (fp32 ``[m, V]``), rank
        ``r``'s block into columns ``r·V/N ..``: one 2D copy per rank on the stage's stream, so the
        batched sampler reads whole rows. (One row needs none: :meth:`vocab_slice` gathers in place.)"""
        m, vocab = logits.shape
        part, size, base = self.vocab_part, self.size, gathered.ptr
        if gathered.numel != size * m * part:
            raise ValueError(f"gathered holds {gathered.numel} values; {size} ranks of {m} x {part} rows need "
                             f"{size * m * part}")

        # Built once: an eager program (the ragged prompt's logits) runs this closure every step.
        copies = [copy_2d_params(logits.ptr + 4 * r * part, 4 * vocab, base + 4 * r * m * part, 4 * part, 4 * part, m)
                  for r in range(size)]

        def unpack_rows(stream):
            for p in copies:
                queue_copy_2d(p, stream.handle)

        return unpack_rows

    def warm_up(self, rows: list, logits, stream, gathers=()) -> None:
        """Eager all-reduces of each of ``rows`` (the sizes the graphs reduce: one decode row, a
        whole chunk), an all-gather of ``logits`` and of each ``(send, recv)`` of ``gathers`` (a
        batch's logits rows) before any capture: NCCL may connect peers or set up buffers on a
        size's first collective (host work a capturing stream must not see), so the captures then
        record only its kernels. What they write is overwritten by the first step."""
        for x in rows:
            self.all_reduce(x)(stream)
        self.all_gather(self.vocab_slice(logits), logits)(stream)
        for send, recv in gathers:
            self.all_gather(send, recv)(stream)
        stream.synchronize()


def time_step_collectives(tp: RankComm, rt, config, stream, repeats: int) -> dict:
    """One decode step's collectives alone on this rank, ``repeats`` times: the ``2 x layers``
    all-reduces of one fp32 hidden row and the all-gather of the logits row, the sizes and
    in-place forms the decode graph runs, over scratch tensors (the runner's own rows are left as
    they are) filled with the same random normal values on every rank: never zeros, whose low bit
    toggling would flatter the timing. The in-place sums grow them by a factor of ``size`` per
    all-reduce until they saturate at +/-inf (same-signed on every rank, so never NaN); NCCL's fp32
    sum costs the same for any finite or infinite operand.

    On CUDA they are captured into one graph, as the decode graph holds them (launching them one
    by one would time the host's launches too), and each step is a replay between two events on
    ``stream``, the rank's stream. Before the timed steps: one untimed replay (a graph's first
    launch uploads it), then one eager all-reduce as a barrier, so every rank starts its first
    timed step together instead of waiting in it for a peer that read the request later. On
    the CPU backend (tests, with a stand-in NCCL) the calls run eagerly on ``stream`` and the
    events are host clocks. Every rank must be asked at once: the collectives are collective.

    Returns ``{"rank", "all_reduces", "all_gathers", "step_s": [seconds per step], "clock"}``.
    """
    check_repeats(repeats)
    layers, h = config.num_hidden_layers, config.hidden_size
    with memory.empty((1, h), "fp32", tag=TIMING_TAG) as row, \
            memory.empty((1, tp.vocab_part * tp.size), "fp32", tag=TIMING_TAG) as logits:
        rng = np.random.default_rng(1234)  # one seed: every rank holds the same values
        row.copy_from(rng.standard_normal((1, h), dtype=np.float32))
        logits.copy_from(rng.standard_normal(logits.shape, dtype=np.float32))
        ops = [("all_reduce", tp.all_reduce(row), row, row)] * (2 * layers)
        ops.append(("all_gather", tp.all_gather(tp.vocab_slice(logits), logits), logits, logits))
        graph = _capture(ops, stream) if rt.is_cuda else None
        marks = [Event(rt.backend) for _ in range(repeats + 1)]
        try:
            step = graph.replay if graph is not None else (lambda: [op(stream) for _, op, _, _ in ops])
            step()
            tp.all_reduce(row)(stream)  # the barrier
            marks[0].record(stream)
            for mark in marks[1:]:
                step()
                mark.record(stream)
            marks[-1].synchronize()
            step_s = [a.elapsed_ms(b) / 1e3 for a, b in zip(marks, marks[1:])]
        finally:
            stream.synchronize()  # nothing may still read the scratch when it is freed
            for mark in marks:
                mark.destroy()
            if graph is not None:
                graph.close()
    clock = ("CUDA events around a replayed graph of them on the rank's stream" if rt.is_cuda
             else "host clock, eager calls (CPU backend)")
    return {"rank": tp.rank, "all_reduces": 2 * layers, "all_gathers": 1, "step_s": step_s, "clock": clock}


def _capture(ops, stream):
    """``ops`` (name, stage callable, input, output) as one captured graph on ``stream``'s role."""
    stages, prev = [], ()
    for i, (name, fn, src, dst) in enumerate(ops):
        stages.append(scheduler.stage(name=f"tp_timing.{i}.{name}", kernel=fn, inputs=[src], outputs=[dst],
                                      depends_on=prev, stream=stream.role))
        prev = (stages[-1].name,)
    return scheduler.capture(stages, stream=stream.role)
