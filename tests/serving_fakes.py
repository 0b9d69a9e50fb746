"""A fake BatchRunner whose "KV" is the token ids themselves, stored through the block tables.

The next id is a hash of every id the sequence's table holds, read back from the pool; so
a wrong table, a block shared by mistake or overwritten, or a recompute that differs gives
different ids. Records each step's batch for the scheduling tests.
"""

from __future__ import annotations

import numpy as np

from nexusrt.kvcache.blocks import BLOCK_SIZE

VOCAB = 101


class FakeRunner:
    max_context = 4096
    prune_policies = frozenset()  # no compact(): the engine refuses pruning policies on it

    def __init__(self, num_blocks: int, fail_on_step: int | None = None, fail_with: type = RuntimeError,
                 host_blocks: int = 0, fail_swap: int | None = None, wipe_swapped: bool = False):
        self.num_blocks, self.host_blocks = num_blocks, host_blocks
        self.pool = np.full((num_blocks, BLOCK_SIZE), -1, np.int64)
        self.host = np.full((host_blocks, BLOCK_SIZE), -1, np.int64)
        self.swaps: list[tuple[list, list]] = []  # each swap_blocks call's (outs, ins)
        self.fail_swap = fail_swap  # the swap_blocks call (1-based) that raises
        # Wipe a device block once swapped out (its old contents must not be read again): only
        # where no block is shared (no prefix cache), since a shared block stays in use.
        self.wipe_swapped = wipe_swapped
        self.steps: list[list[tuple[int, int, bool]]] = []  # per step: (start, count, logits)
        self.fail_on_step, self.fail_with = fail_on_step, fail_with

    def run(self, batch):
        self.steps.append([(r.start, len(r.token_ids), r.logits) for r in batch])
        if self.fail_on_step == len(self.steps):
            raise self.fail_with("injected runner failure")
        out = []
        for r in batch:
            t = np.arange(r.start, r.start + len(r.token_ids))
            table = np.asarray(r.table)
            self.pool[table[t // BLOCK_SIZE], t % BLOCK_SIZE] = r.token_ids
            if not r.logits:
                out.append(None)
                continue
            end = r.start + len(r.token_ids)
            p = np.arange(end)
            seen = self.pool[table[p // BLOCK_SIZE], p % BLOCK_SIZE]
            assert (seen >= 0).all(), "read a slot never written"
            h = int((seen * (p + 7)).sum() % VOCAB)
            logits = np.zeros(VOCAB, np.float32)
            logits[h] = 1.0
            out.append(logits)
        return out

    def run_tokens(self, batch):
        from nexusrt.backends.base import sample_rows

        return sample_rows(batch, self.run(batch))

    def swap_blocks(self, outs, ins):
        """The host tier's copies: outs (device, host) first, then ins (host, device)."""
        self.swaps.append((list(outs), list(ins)))
        if self.fail_swap == len(self.swaps):
            raise RuntimeError("injected swap failure")
        for d, h in outs:
            self.host[h] = self.pool[d]
            if self.wipe_swapped:
                self.pool[d] = -1
        for h, d in ins:
            self.pool[d] = self.host[h]
            self.host[h] = -1

    def close(self):
        pass
