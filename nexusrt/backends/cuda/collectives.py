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
"""

from __future__ import annotations


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

    def warm_up(self, rows: list, logits, stream) -> None:
        """Eager all-reduces of each of ``rows`` (the sizes the graphs reduce: one decode row, a
        whole chunk) and an all-gather of ``logits`` before any capture: NCCL may connect peers
        or set up buffers on a size's first collective (host work a capturing stream must not
        see), so the captures then record only its kernels. What they write is overwritten
        by the first step."""
        for x in rows:
            self.all_reduce(x)(stream)
        self.all_gather(self.vocab_slice(logits), logits)(stream)
        stream.synchronize()
