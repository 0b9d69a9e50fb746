"""The CPU backend's batched step: many sequences' rows through one shared KV block pool.

The serving engine (:mod:`nexusrt.serving`) decides which sequence holds which block and
what each computes; this runner owns the pools ``[num_blocks, Hkv, BLOCK_SIZE, D]`` per
layer and runs :class:`~nexusrt.backends.cpu.decoder.PagedDecoder` over the step. All rows
of a step go through each linear together (one batch, in fixed-size BLAS tiles), so a step
of 32 decodes costs about two tiles' GEMMs per linear rather than 32 GEMVs.
"""

from __future__ import annotations

import numpy as np

from ...kvcache.blocks import BLOCK_SIZE, check_keep, check_pairs
from ..base import Rows, sample_rows
from .decoder import PagedDecoder


def cpu_block_bytes(config) -> int:
    """Bytes of one KV block on the CPU: K and V of every layer, fp32."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * BLOCK_SIZE * config.head_dim * 4


def blocks_for_bytes(config, kv_bytes: int) -> int:
    """KV blocks (K and V of every layer, fp32) that fit in ``kv_bytes``."""
    return int(kv_bytes) // cpu_block_bytes(config)


class CpuBatchRunner:
    """A :class:`~nexusrt.backends.base.BatchRunner` in NumPy over ``decoder``'s weights."""

    def __init__(self, decoder: PagedDecoder, num_blocks: int, max_context: int, host_blocks: int = 0):
        """``host_blocks``: a second set of pools the engine swaps preempted sequences' blocks
        into (:meth:`swap_blocks`; the serving engine's host tier, here plain memory too)."""
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        if isinstance(host_blocks, bool) or not isinstance(host_blocks, int) or host_blocks < 0:
            raise ValueError(f"host_blocks must be an integer >= 0, got {host_blocks!r}")
        self.decoder, self.config = decoder, decoder.config
        # The decoder knows what it can prune (the worker processes do not sum h2o's scores across ranks).
        self.prune_policies = decoder.prune_policies
        self.num_blocks, self.max_context, self.host_blocks = num_blocks, max_context, host_blocks
        self._pools = decoder.new_pools(num_blocks)
        self._host = decoder.new_pools(host_blocks) if host_blocks else ([], [])
        if host_blocks and not all(isinstance(p, np.ndarray) for p in self._pools[0]):
            raise ValueError("host_blocks needs the decoder's pools in this process (not a worker's)")

    def run(self, batch: list[Rows]) -> list[np.ndarray | None]:
        if not batch:
            return []
        for r in batch:
            if r.start + len(r.token_ids) > self.max_context:
                raise ValueError(f"{r.start + len(r.token_ids)} tokens exceed the context of {self.max_context}")
            if any(not 0 <= b < self.num_blocks for b in r.table):
                raise ValueError(f"a block table names blocks outside 0..{self.num_blocks - 1}")
        ends = np.cumsum([len(r.token_ids) for r in batch]) - 1
        want = [i for i, r in enumerate(batch) if r.logits]
        logits = self.decoder.forward_logits(batch, self._pools, ends[want])
        out: list[np.ndarray | None] = [None] * len(batch)
        for row, i in enumerate(want):
            out[i] = logits[row]
        return out

    def run_tokens(self, batch: list[Rows]) -> list[int | None]:
        return sample_rows(batch, self.run(batch))

    def compact(self, table: list[int], keep) -> None:
        """Move slots ``keep`` to the front of ``table`` in every layer's K and V pool (KV pruning)."""
        self.decoder.compact_pools(self._pools, table, check_keep(table, keep, self.num_blocks))

    def swap_blocks(self, outs, ins) -> None:
        """Copy device blocks to host blocks (``outs``: (device, host) pairs), then host blocks to
        device blocks (``ins``: (host, device)), every layer's K and V; every pair is checked before
        anything is copied."""
        check_pairs(outs, self.num_blocks, self.host_blocks, "swap-out")
        check_pairs(ins, self.host_blocks, self.num_blocks, "swap-in")
        for pairs, src, dst in ((outs, self._pools, self._host), (ins, self._host, self._pools)):
            if not pairs:
                continue
            frm, to = (np.array(x, np.int64) for x in zip(*pairs))
            for s_pools, d_pools in zip(src, dst):  # K, then V
                for s_pool, d_pool in zip(s_pools, d_pools):
                    d_pool[to] = s_pool[frm]

    def close(self) -> None:
        self._host = ([], [])
        self._pools = ([], [])
