"""The serving engine's host tier on the GPU: pinned host memory that preempted sequences'
KV blocks are swapped into and back (:mod:`nexusrt.serving.swap` decides which).

The tier's ``host_blocks`` are pinned lazily, a *slab* of ``slab_blocks`` blocks at a time,
when a swap-out first names a block of that slab: a server started with a budget pins
nothing until it preempts, and then only as much as the swapped-out sequences hold (the
engine hands out the lowest free host blocks first). A slab is one pinned allocation laid
out ``[layer][K, V][slab_blocks][Hkv, BLOCK_SIZE, D]`` (bf16), so a run of consecutive blocks
of one layer's K (or V) is contiguous on both sides. Slabs stay until the runner closes.

:meth:`HostSwapPools.copy` issues, on the runner's stream, every swap-out (device to host)
and then every swap-in (host to device): pairs that continue a run of consecutive blocks on
both sides, within one slab, share one copy per layer and K/V
(:func:`~nexusrt.kvcache.blocks.pair_runs`), so a run of n blocks is ``2 * layers`` copies, not
``2 * layers * n``. Where the driver has ``cuMemcpyBatchAsync`` (CUDA 12.8+) all the swap-outs
of a step are one driver call and all its swap-ins another (the copies of one direction never
touch the same block twice: ``check_pairs`` refuses a repeated destination, and a swap-out
reads only device blocks and writes only host ones); elsewhere each copy is its own call.
Stream order puts them after the previous step's kernels (which wrote the blocks swapped out)
and before the next step's (which may reuse those device blocks, and read the ones swapped
in); the host never touches the pinned slabs, so nothing waits here.
"""

from __future__ import annotations

import numpy as np

from ... import memory
from ...kvcache.blocks import BLOCK_SIZE, check_pairs, pair_runs

TAG = "kv_swap"
SLAB_BYTES = 256 << 20  # pinned per slab (all layers' K and V of its blocks), at least one block


class HostSwapPools:
    """``host_blocks`` pinned blocks of every layer's K and V beside the device pools
    ``k_pools``/``v_pools`` (``num_blocks`` usable blocks each); ``memcpy(name, dst_ptr, src_ptr,
    nbytes)`` enqueues the driver copy ``name`` on the runner's stream; ``memcpy_batch(copies)``,
    if given, enqueues a list of ``(dst_ptr, src_ptr, nbytes)`` copies of one direction in one
    call (:func:`~nexusrt.memory.copy.queue_copy_batch`)."""

    def __init__(self, cfg, k_pools, v_pools, *, num_blocks: int, host_blocks: int, memcpy,
                 memcpy_batch=None, slab_bytes: int = SLAB_BYTES):
        if isinstance(host_blocks, bool) or not isinstance(host_blocks, int) or host_blocks < 1:
            raise ValueError(f"host_blocks must be an integer >= 1, got {host_blocks!r}")
        self.k_pools, self.v_pools, self.memcpy, self.memcpy_batch = k_pools, v_pools, memcpy, memcpy_batch
        self.num_blocks, self.host_blocks = num_blocks, host_blocks
        self.layers = cfg.num_hidden_layers
        self.block_shape = (cfg.num_key_value_heads, BLOCK_SIZE, cfg.head_dim)
        self.block_bytes = int(np.prod(self.block_shape)) * 2  # one layer's K (or V) of one block, bf16
        self.slab_blocks = max(1, min(host_blocks, slab_bytes // (2 * self.layers * self.block_bytes)))
        self.slabs: list = [None] * -(-host_blocks // self.slab_blocks)

    @property
    def nbytes(self) -> int:
        """Bytes pinned so far."""
        return sum(s.nbytes for s in self.slabs if s is not None)

    def _pin(self, hosts) -> None:
        """Pin the slabs of host blocks ``hosts`` not pinned yet."""
        for s in sorted({int(h) // self.slab_blocks for h in hosts}):
            if self.slabs[s] is None:
                self.slabs[s] = memory.pinned((2 * self.layers, self.slab_blocks, *self.block_shape), "bf16", tag=TAG)

    def _runs(self, pairs, host_first: bool) -> list[tuple[int, int, int]]:
        """:func:`pair_runs` of ``pairs``, cut where the host side crosses into another slab."""
        out = []
        for a, b, n in pair_runs(pairs):
            h, d = (a, b) if host_first else (b, a)
            while n:
                take = min(n, self.slab_blocks - h % self.slab_blocks)
                out.append((h, d, take))
                h, d, n = h + take, d + take, n - take
        return out

    def _host_ptr(self, h: int, layer: int, kv: int) -> int:
        slab = self.slabs[h // self.slab_blocks]
        return slab.ptr + ((2 * layer + kv) * self.slab_blocks + h % self.slab_blocks) * self.block_bytes

    def copy(self, outs, ins) -> None:
        """Enqueue ``outs`` ((device, host) pairs) then ``ins`` ((host, device) pairs); every pair
        is checked, and every slab a swap-out names pinned, before any copy is issued."""
        check_pairs(outs, self.num_blocks, self.host_blocks, "swap-out")
        check_pairs(ins, self.host_blocks, self.num_blocks, "swap-in")
        written = {int(h) // self.slab_blocks for _, h in outs} | {i for i, s in enumerate(self.slabs) if s is not None}
        if any(int(h) // self.slab_blocks not in written for h, _ in ins):
            raise ValueError("swap_blocks: a swap-in names a host block no swap-out wrote")
        self._pin([h for _, h in outs])
        size = self.block_bytes
        for out, runs in ((True, self._runs(outs, False)), (False, self._runs(ins, True))):
            copies = []  # (dst, src, nbytes)
            for h, d, n in runs:
                for layer in range(self.layers):
                    for kv, pool in enumerate((self.k_pools[layer], self.v_pools[layer])):
                        host, dev = self._host_ptr(h, layer, kv), pool.ptr + d * size
                        copies.append((host, dev, n * size) if out else (dev, host, n * size))
            if self.memcpy_batch is not None:
                self.memcpy_batch(copies)
            else:
                for dst, src, nbytes in copies:
                    self.memcpy("cuMemcpyDtoHAsync" if out else "cuMemcpyHtoDAsync", dst, src, nbytes)

    def free(self) -> None:
        """Unpin every slab (the runner waited for its stream first)."""
        for i, slab in enumerate(self.slabs):
            if slab is not None and getattr(slab, "is_live", True):
                slab.free()
            self.slabs[i] = None
