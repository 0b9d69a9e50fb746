"""KV pruning's compaction on the GPU, for :class:`~nexusrt.backends.cuda.batch.CudaBatchRunner`.

After a step, the serving engine calls the runner's ``compact(table, keep)`` for each sequence
past its budget (:mod:`nexusrt.serving.pruning`). :meth:`Compactor.run` checks ``table`` and
``keep`` on the host (:func:`~nexusrt.kvcache.blocks.check_keep`, the CPU runner's check),
stages both in pinned memory, copies them to the device and launches ``kv_compact`` once for
every layer's K and V pool, all on the runner's stream, so the next step's work on that
stream sees the compacted cache. Slots of keep's identity prefix (the sinks) are not moved;
a keep that moves nothing launches nothing.

Staging: the engine compacts several sequences after one step without waiting for the device,
so each call stages into its own pinned row; when every row is in use the stream is
synchronized first (the copies that read the rows have then run). The runner calls
:meth:`Compactor.reset` after the synchronize that starts each of its steps. The device
``table``/``keep`` arrays need no such care: stream order puts each call's copies after the
previous call's kernel.
"""

from __future__ import annotations

import numpy as np

from ... import memory
from ...kernels.ops import kv_compact as compact_ops
from ...kvcache.blocks import BLOCK_SIZE, check_keep
from .buffers import OwnedBuffers

TAG = "batch"


class Compactor(OwnedBuffers):
    """Compaction of one pool set (``k_pools``/``v_pools``, one per layer, ``num_blocks`` usable
    blocks) for block tables of up to ``width`` blocks; ``rows`` calls per step before a
    synchronize; ``h2d(dst, src_ptr, nbytes)`` enqueues a copy on ``stream``."""

    def __init__(self, rt, cfg, k_pools, v_pools, *, num_blocks: int, width: int, scratch: int, rows: int,
                 stream, h2d):
        super().__init__()
        self.rt, self.stream, self.h2d = rt, stream, h2d
        self.num_blocks, self.width, self.scratch, self.rows = num_blocks, width, scratch, rows
        self.layers, self.hkv, self.head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        addresses = compact_ops.pool_addresses(k_pools, v_pools, self.hkv, self.head_dim)
        try:
            self.pools = self._t(memory.empty((len(addresses),), "int64", tag=TAG))
            self.pools.copy_from(addresses)  # once: the pools never move
            self.table = self._t(memory.empty((width,), "int32", tag=TAG))
            self.keep = self._t(memory.empty((width * BLOCK_SIZE,), "int32", tag=TAG))
            # Row r: a table (width words), then up to width * BLOCK_SIZE kept slots.
            self.h_stage = self._t(memory.pinned((rows, width * (1 + BLOCK_SIZE)), "int32", tag=TAG))
            # Checked and packed once; each call re-points its count and first (kv_compact.rebind).
            self.spec = compact_ops.kv_compact(rt, self.pools, self.table, self.keep, count=width * BLOCK_SIZE,
                                               first=0, num_layers=self.layers, num_kv_heads=self.hkv,
                                               head_dim=self.head_dim)
        except BaseException:
            self.free()
            raise
        self.used = 0  # staging rows used since the stream was last idle

    def reset(self) -> None:
        """The stream is idle (the runner synchronized): every staging row is free again."""
        self.used = 0

    def run(self, table: list[int], keep) -> None:
        """Move slots ``keep`` (ascending) of ``table`` to slots ``0 .. len(keep)-1`` in every layer's
        K and V pool, on the stream. Checked before any device work."""
        keep = check_keep(table, keep, self.num_blocks)
        if len(table) > self.width:
            raise ValueError(f"compact: the block table ({len(table)} blocks) is longer than this runner's "
                             f"tables ({self.width} blocks)")
        n = len(keep)
        moved = np.flatnonzero(keep != np.arange(n))
        if not len(moved):
            return  # every kept slot is where it stays
        if self.used == self.rows:  # every row may still be read by a queued copy
            self.stream.synchronize()
            self.used = 0
        w, row = self.width, self.h_stage.array[self.used]
        row[:len(table)] = table
        row[len(table):w] = self.scratch  # never read: every kept slot lies inside the table
        row[w:w + n] = keep
        src = self.h_stage.ptr + self.used * row.nbytes
        self.used += 1
        self.h2d(self.table, src, 4 * w)
        self.h2d(self.keep, src + 4 * w, 4 * n)
        compact_ops.rebind(self.spec, n, int(moved[0]))
        self.spec.launch(self.stream)
