"""Tensor parallelism on the CPU: N rank decoders over their shards, combined by a communicator.

:class:`ShardedDecoder` has :class:`~nexusrt.backends.cpu.decoder.PagedDecoder`'s interface
(``config``, ``new_pools``, ``forward``, ``logits``, ``close``), so both CPU runners take it
unchanged (``CpuRunner(weights, decoder=...)``, ``CpuBatchRunner(decoder, ...)``). Each rank
is an ordinary single-device ``PagedDecoder`` over its shard
(:func:`nexusrt.parallel.shard`: local heads, local MLP width, a vocab slice of the LM head)
with a KV pool of its own KV heads. Per layer, the ranks' attention outputs (after the
row-parallel O) are all-reduced before the residual add, then likewise the MLP's (after the
row-parallel down); the LM head's vocab slices are all-gathered. These are the collectives
the GPU path runs over NCCL, here through :class:`~nexusrt.parallel.LocalGroup` in lockstep.
"""

from __future__ import annotations

import numpy as np

from ...models.weights import WeightSource
from ...parallel import LocalGroup, ShardPlan, shard
from ..base import Rows
from .decoder import PagedDecoder


class ShardedDecoder:
    """``weights`` split over ``size`` in-process ranks (``size=1`` is one unsplit rank)."""

    def __init__(self, weights: WeightSource, size: int):
        self.config = weights.config
        self.plan = ShardPlan(weights.config, size)  # bad degrees and indivisible shapes fail here
        self.group = LocalGroup(size)
        self.ranks = [PagedDecoder(shard(weights, self.plan, 0))]
        # The embedding is replicated: one table serves every rank (a copy each would be dead memory).
        self.ranks += [PagedDecoder(shard(weights, self.plan, r), embed=self.ranks[0].embed) for r in range(1, size)]

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
        # The embedding is replicated, so rank 0's rows are every rank's (and its checks everyone's).
        x, positions = self.ranks[0].embed_rows(batch)
        rank_pools = [self._rank_pools(pools, r) for r in range(self.size)]
        for li in range(self.config.num_hidden_layers):
            x = x + self.group.all_reduce([d.attention_out(li, x, positions, batch, p)
                                           for d, p in zip(self.ranks, rank_pools)])
            x = x + self.group.all_reduce([d.mlp_out(li, x) for d in self.ranks])
        return x

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """fp32 ``[R, vocab]``: each rank's vocab slice of the LM head, gathered in rank order."""
        return self.group.all_gather([d.logits(hidden) for d in self.ranks], axis=-1)

    def close(self) -> None:
        for d in self.ranks:
            d.close()
