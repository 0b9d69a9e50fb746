"""The serving engine's host tier on the GPU: pinned host pools that preempted sequences'
KV blocks are swapped into and back (:mod:`nexusrt.serving.swap` decides which).

One pinned pool per layer for K and one for V, laid out as the device pools
(``[host_blocks, Hkv, BLOCK_SIZE, D]`` bf16), so a block is one contiguous span on both sides.
:meth:`HostSwapPools.copy` issues, on the runner's stream, every swap-out (device to host)
and then every swap-in (host to device): pairs that continue a run of consecutive blocks on
both sides share one copy per layer and K/V (:func:`~nexusrt.kvcache.blocks.pair_runs`), so
a run of n blocks costs ``2 * layers`` driver calls, not ``2 * layers * n``. Stream order puts
them after the previous step's kernels (which wrote the blocks swapped out) and before the
next step's (which may reuse those device blocks, and read the ones swapped in); the host
never touches the pinned pools, so nothing waits here.
"""

from __future__ import annotations

import numpy as np

from ... import memory
from ...kvcache.blocks import pair_runs, pool_shape
from .buffers import OwnedBuffers

TAG = "kv_swap"


class HostSwapPools(OwnedBuffers):
    """``host_blocks`` pinned blocks of every layer's K and V beside the device pools
    ``k_pools``/``v_pools`` (``num_blocks`` usable blocks each); ``memcpy(name, dst_ptr, src_ptr,
    nbytes)`` enqueues the driver copy ``name`` on the runner's stream."""

    def __init__(self, cfg, k_pools, v_pools, *, num_blocks: int, host_blocks: int, memcpy):
        super().__init__()
        if isinstance(host_blocks, bool) or not isinstance(host_blocks, int) or host_blocks < 1:
            raise ValueError(f"host_blocks must be an integer >= 1, got {host_blocks!r}")
        self.k_pools, self.v_pools, self.memcpy = k_pools, v_pools, memcpy
        self.num_blocks, self.host_blocks = num_blocks, host_blocks
        shape = pool_shape(host_blocks, cfg.num_key_value_heads, cfg.head_dim)
        self.block_bytes = int(np.prod(shape[1:])) * 2  # one layer's K (or V) of one block, bf16
        self.k_host, self.v_host = [], []
        try:
            for _ in range(cfg.num_hidden_layers):
                self.k_host.append(self._t(memory.pinned(shape, "bf16", tag=TAG)))
                self.v_host.append(self._t(memory.pinned(shape, "bf16", tag=TAG)))
        except BaseException:
            self.free()
            raise

    @property
    def nbytes(self) -> int:
        return 2 * len(self.k_host) * self.host_blocks * self.block_bytes

    def _check(self, pairs, src_blocks: int, dst_blocks: int, what: str) -> None:
        if not pairs:
            return
        src, dst = (np.asarray(x, np.int64) for x in zip(*pairs))
        if src.min() < 0 or src.max() >= src_blocks or dst.min() < 0 or dst.max() >= dst_blocks:
            raise ValueError(f"swap_blocks: a {what} pair names a block outside its pool "
                             f"({src_blocks} source / {dst_blocks} destination blocks)")

    def copy(self, outs, ins) -> None:
        """Enqueue ``outs`` ((device, host) pairs) then ``ins`` ((host, device) pairs); every pair
        is checked before any copy is issued."""
        self._check(outs, self.num_blocks, self.host_blocks, "swap-out")
        self._check(ins, self.host_blocks, self.num_blocks, "swap-in")
        size, memcpy = self.block_bytes, self.memcpy
        device = list(zip(self.k_pools, self.v_pools))
        host = list(zip(self.k_host, self.v_host))
        for d, h, n in pair_runs(outs):
            for dev_kv, host_kv in zip(device, host):
                for dev, hst in zip(dev_kv, host_kv):
                    memcpy("cuMemcpyDtoHAsync", hst.ptr + h * size, dev.ptr + d * size, n * size)
        for h, d, n in pair_runs(ins):
            for dev_kv, host_kv in zip(device, host):
                for dev, hst in zip(dev_kv, host_kv):
                    memcpy("cuMemcpyHtoDAsync", dev.ptr + d * size, hst.ptr + h * size, n * size)
