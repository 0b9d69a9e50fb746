"""Tensor parallelism on the CPU: rank decoders over their shards, combined by a communicator.

The per-layer math of one rank is written once, as the coroutine :func:`layer_steps`: it
yields each partial output (attention after the row-parallel O, the MLP after the
row-parallel down) and receives the sum over ranks to add to the residual. Two drivers run it:

- :class:`RankDecoder` (SPMD): one rank, one process; it calls its communicator's
  ``all_reduce`` itself, so any communicator with that call (the shared memory one of
  :mod:`nexusrt.parallel.shm`, NCCL later) runs the same code, and its logits are its own vocab
  slice, which the front joins (only the front needs the whole row). The worker processes of
  :mod:`nexusrt.backends.cpu.tp_worker` each hold one.
- :class:`ShardedDecoder` (lockstep): all ranks in one process, advanced together, their
  partials summed by :class:`~nexusrt.parallel.LocalGroup`.

Both have :class:`~nexusrt.backends.cpu.decoder.PagedDecoder`'s interface (``config``,
``new_pools``, ``forward``, ``logits``, ``forward_logits``, ``close``), so both CPU runners take
them unchanged (``CpuRunner(weights, decoder=...)``, ``CpuBatchRunner(decoder, ...)``). Each
rank is an ordinary single-device ``PagedDecoder`` over its shard (:func:`nexusrt.parallel.shard`:
local heads, local MLP width, a vocab slice of the LM head) with a KV pool of its own KV heads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator

import numpy as np

from ...models.weights import WeightSource
from ...parallel import LocalGroup, ShardedWeights, ShardPlan, shard
from ...parallel.comm import check_repeats
from ..base import Rows
from .decoder import DecoderSteps, PagedDecoder


def rank_decoder(weights: ShardedWeights, embed: np.ndarray | None = None) -> PagedDecoder:
    """A :class:`PagedDecoder` over one rank's shard; ``embed``: the replicated embedding table
    if already loaded. With tied embeddings the LM head is this rank's vocab rows of that table:
    a view, so the table is read once, not again as the head."""
    embed = weights.load("embed") if embed is None else embed
    lm_head = None
    if weights.plan.config.tie_word_embeddings:
        split = weights.plan.split("lm_head", weights.rank)  # vocab-parallel: rows of the table
        lm_head = embed[split.start:split.stop]
    return PagedDecoder(weights, embed=embed, lm_head=lm_head)


def time_steps(step: Callable[[], None], repeats: int) -> list[float]:
    """Seconds (``perf_counter``) of each of ``repeats`` calls of ``step``, after one untimed call:
    between processes it is a barrier (every rank leaves its first collective together, so the
    timed steps start aligned), in one process a warm-up."""
    check_repeats(repeats)
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def layer_steps(d: PagedDecoder, batch: list[Rows], pools) -> Generator[np.ndarray, np.ndarray, np.ndarray]:
    """One rank's forward pass as a coroutine: yields every partial sum the ranks must add up
    (two per layer) and is sent the total; returns the final hidden rows ``[N, hidden]``."""
    x, positions = d.embed_rows(batch)  # the embedding is replicated: every rank has the same rows
    for li in range(d.config.num_hidden_layers):
        x = x + (yield d.attention_out(li, x, positions, batch, pools))
        x = x + (yield d.mlp_out(li, x))
    return x


class RankDecoder(DecoderSteps):
    """One rank of a tensor-parallel group (SPMD): ``weights`` is this rank's shard, ``comm`` a
    communicator with ``rank``, ``size`` and ``all_reduce(buf)``.

    ``config`` is the *whole* model's (the rank's local shape is ``decoder.config``): what the
    rank computes after its collectives is the whole model's hidden rows; its logits are its
    vocab slice (the ranks' slices in rank order are the whole row).
    """

    def __init__(self, weights: ShardedWeights, comm, config):
        self.decoder, self.comm, self.config = rank_decoder(weights), comm, config

    def new_pools(self, num_blocks: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """This rank's K and V pools (its own KV heads)."""
        return self.decoder.new_pools(num_blocks)

    def forward(self, batch: list[Rows], pools) -> np.ndarray:
        """The final hidden rows ``[N, hidden]`` (the same on every rank); appends this rank's KV."""
        steps = layer_steps(self.decoder, batch, pools)
        try:
            part = next(steps)
            while True:
                part = steps.send(self.comm.all_reduce(part))
        except StopIteration as done:
            return done.value

    def collective_times(self, repeats: int) -> dict:
        """One decode step's collectives alone, ``repeats`` times, on this rank: the ``2 x layers``
        all-reduces of one fp32 hidden row of random values (never zeros; the sum is a new array,
        so the row stays as it is). No all-gather: the ranks send their logits slices to the front. Returns
        ``{"rank", "all_reduces", "all_gathers", "step_s": [seconds per step], "clock"}``;
        every rank must be asked at once (the all-reduces are collective)."""
        layers = self.config.num_hidden_layers
        row = np.random.default_rng(1234 + self.comm.rank).standard_normal((1, self.config.hidden_size),
                                                                           dtype=np.float32)

        def step():
            for _ in range(2 * layers):
                self.comm.all_reduce(row)

        return {"rank": self.comm.rank, "all_reduces": 2 * layers, "all_gathers": 0,
                "step_s": time_steps(step, repeats), "clock": "perf_counter in the rank's process"}

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """fp32 ``[R, vocab / size]``: this rank's vocab slice. No collective: the front joins the
        ranks' slices (:func:`join_logits`); gathering every row on every rank would be work
        all ranks but one throw away."""
        return self.decoder.logits(hidden)

    def close(self) -> None:
        self.decoder.close()


def join_logits(slices: list[np.ndarray]) -> np.ndarray:
    """The whole logits rows from the ranks' vocab slices, in rank order (what an all-gather along
    the vocab would give; the vocab-parallel LM head's ranks hold consecutive slices)."""
    return np.concatenate(slices, axis=-1)


class ShardedDecoder(DecoderSteps):
    """``weights`` split over ``size`` in-process ranks (``size=1`` is one unsplit rank)."""

    def __init__(self, weights: WeightSource, size: int):
        self.config = weights.config
        self.plan = ShardPlan(weights.config, size)  # bad degrees and indivisible shapes fail here
        self.group = LocalGroup(size)
        # The embedding is replicated: one table serves every rank (a copy each would be dead memory).
        embed = weights.load("embed")
        self.ranks = [rank_decoder(shard(weights, self.plan, r), embed) for r in range(size)]

    @property
    def size(self) -> int:
        return self.plan.size

    def new_pools(self, num_blocks: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Every rank's per-layer K and V pools (its own KV heads), rank after rank in one list
        each, so code that walks every pool (KV compaction) works as for one decoder."""
        per_rank = [d.new_pools(num_blocks) for d in self.ranks]
        return [k for ks, _ in per_rank for k in ks], [v for _, vs in per_rank for v in vs]

    def _rank_pools(self, pools, rank: int):
        n = self.config.num_hidden_layers
        return pools[0][rank * n:(rank + 1) * n], pools[1][rank * n:(rank + 1) * n]

    def forward(self, batch: list[Rows], pools) -> np.ndarray:
        """The final hidden rows ``[N, hidden]``; every rank appends its KV heads to its pools."""
        ranks = [layer_steps(d, batch, self._rank_pools(pools, r)) for r, d in enumerate(self.ranks)]
        try:  # every rank stops after the same layer; rank 0's hidden rows are everyone's
            parts = [next(s) for s in ranks]
            while True:
                total = self.group.all_reduce(parts)
                parts = [s.send(total) for s in ranks]
        except StopIteration as done:
            return done.value

    def collective_times(self, repeats: int) -> list[dict]:
        """One decode step's collectives alone, ``repeats`` times: the ``2 x layers`` sums of every
        rank's fp32 hidden row and the gather of their logits slices, as :meth:`forward` and
        :meth:`logits` call them. One entry (``rank`` None): every rank's part runs in this
        process, so there is one clock; the keys are :meth:`RankDecoder.collective_times`'s."""
        layers, n = self.config.num_hidden_layers, self.size
        rng = np.random.default_rng(1234)  # random, never zeros; the sums are new arrays
        rows = [rng.standard_normal((1, self.config.hidden_size), dtype=np.float32) for _ in range(n)]
        slices = [rng.standard_normal((1, self.config.vocab_size // n), dtype=np.float32) for _ in range(n)]

        def step():
            for _ in range(2 * layers):
                self.group.all_reduce(rows)
            self.group.all_gather(slices, axis=-1)

        return [{"rank": None, "all_reduces": 2 * layers, "all_gathers": 1, "step_s": time_steps(step, repeats),
                 "clock": "perf_counter, every rank in this process"}]

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """fp32 ``[R, vocab]``: each rank's vocab slice of the LM head, gathered in rank order."""
        return self.group.all_gather([d.logits(hidden) for d in self.ranks], axis=-1)

    def close(self) -> None:
        for d in self.ranks:
            d.close()
