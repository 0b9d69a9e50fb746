"""The host tier of the serving engine: preemption by swap instead of recompute.

When the scheduler must preempt a running sequence and the host tier has room for its
filled blocks, the sequence keeps what it computed: its blocks are copied to host blocks
(one host block per device block, all layers' K and V), its device blocks go back to the
pool, and it waits at the front of the queue holding ``host_table``. When it is admitted
again it first takes those of its leading full blocks still in the prefix cache (a victim's
keyed blocks go to the cache's LRU list when it gives them back), then fresh device blocks
for the rest, which the host blocks are copied back into; all its host blocks are freed, and
it resumes exactly where it stopped (same KV, same pruning state, same next id): no prompt
is recomputed. Without room on the host it is preempted by recompute, as before.

This class is the bookkeeping only (which host block holds which sequence's block, and the
copies a step owes). The copies themselves are the runner's (:meth:`BatchRunner.swap_blocks`),
issued by :meth:`~nexusrt.serving.engine.Engine.step` before the step's work and in this
order: every swap-out first (a device block a victim gives back may be handed to a sequence
swapped in, or written by the step), then every swap-in. A host block a swap-in frees can
only be taken by a later step's swap-out, whose copy the runner issues after this step's.
"""

from __future__ import annotations

from ..kvcache.blocks import BlockPool, blocks_for
from .sequence import Sequence


class HostSwap:
    """``num_blocks`` host blocks for swapped-out sequences, and the copies owed to the runner."""

    def __init__(self, num_blocks: int):
        self.pool = BlockPool(num_blocks)
        self.num_blocks = self.pool.num_blocks
        self.outs: list[tuple[int, int]] = []  # (device block, host block) to copy, this step
        self.ins: list[tuple[int, int]] = []  # (host block, device block) to copy, this step
        self.out_seqs: list[Sequence] = []  # the sequences whose blocks this step's outs copy
        self.in_seqs: list[Sequence] = []  # and those whose blocks its ins copy back
        self.swapped_out = self.swapped_in = 0  # sequences, over the engine's life
        self.blocks_out = self.blocks_in = 0
        self.blocks_reused = 0  # blocks a swap-in found in the prefix cache instead of copying

    @staticmethod
    def blocks_of(seq: Sequence) -> int:
        """The device blocks holding ``seq``'s filled cache slots (what a swap-out copies)."""
        return blocks_for(seq.num_slots)

    def fits(self, seq: Sequence) -> bool:
        """Whether ``seq``'s filled blocks fit in the free host blocks (and it has any)."""
        n = self.blocks_of(seq)
        return 0 < n <= self.pool.num_free and len(seq.block_table) >= n

    def out(self, seq: Sequence) -> None:
        """Take host blocks for ``seq``'s filled device blocks and owe their copies; the caller
        then gives the device blocks back (``BlockManager.release``)."""
        n = self.blocks_of(seq)
        seq.host_table = self.pool.alloc(n)
        self.outs += zip(seq.block_table[:n], seq.host_table)
        self.out_seqs.append(seq)
        self.swapped_out += 1
        self.blocks_out += n

    def into(self, seq: Sequence, skip: int = 0) -> None:
        """Owe the copies of ``seq``'s host blocks into its device blocks, but for its first ``skip``
        (found in the prefix cache: the same K/V is already on the device), and free them all."""
        host, seq.host_table = seq.host_table, []
        self.ins += zip(host[skip:], seq.block_table[skip:len(host)])
        self.pool.free(host)
        self.in_seqs.append(seq)
        self.swapped_in += 1
        self.blocks_in += len(host) - skip
        self.blocks_reused += skip

    def take(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[Sequence], list[Sequence]]:
        """This step's copies (outs, ins) and the sequences they swap out and in; cleared here."""
        owed = self.outs, self.ins, self.out_seqs, self.in_seqs
        self.outs, self.ins, self.out_seqs, self.in_seqs = [], [], [], []
        return owed

    def drop(self, seq: Sequence) -> None:
        """Free ``seq``'s host blocks (it ended while swapped out, or its copy failed)."""
        if seq.host_table:
            self.pool.free(seq.host_table)
            seq.host_table = []

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.pool.num_free

    def counts(self) -> dict:
        return {"host_blocks": self.num_blocks, "host_blocks_used": self.num_used,
                "swapped_out": self.swapped_out, "swapped_in": self.swapped_in,
                "blocks_swapped_out": self.blocks_out, "blocks_swapped_in": self.blocks_in,
                "blocks_reused": self.blocks_reused}
