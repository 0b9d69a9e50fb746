"""The read-bandwidth probe: the denominator of every "% of bandwidth" NexusRT prints.

:func:`measure_read_bandwidth` sums every 32-bit word of a large buffer (>= 1 GiB by
default, far past the L2) with 16-byte loads on every SM, times each pass with CUDA
events and returns the median. The buffer is filled with a known word, and each pass's
sum is checked on the host: a probe whose loads were dropped or cut short fails loudly
instead of reporting an impossible number.
"""

from __future__ import annotations

import statistics

import numpy as np

from .common import blocks_per_sm, check_positive, ptr, sm_count
from .spec import LaunchSpec

SOURCE = "membw"
KERNEL = "membw_read"
SIGNATURE = "ptr ptr u64"
THREADS = 512
FILL_WORD = 0x3F8A5C21  # arbitrary, not a pattern a compiler or the hardware could shortcut
DEFAULT_BYTES = 2 << 30


def read_probe(rt, partial, buf, nbytes: int, blocks: int) -> LaunchSpec:
    """One pass of the probe over ``nbytes`` (multiple of 16) of ``buf``; ``partial`` int32 [blocks]."""
    check_positive(nbytes=nbytes, blocks=blocks)
    if nbytes % 16:
        raise ValueError(f"nbytes must be a multiple of 16, got {nbytes}")
    if ptr(buf) % 16:
        raise ValueError("buf must be 16-byte aligned")
    kernel = rt.kernels.get(SOURCE, KERNEL, SIGNATURE)
    return LaunchSpec(kernel, (blocks, 1, 1), (THREADS, 1, 1),
                      kernel.pack(ptr(partial), ptr(buf), nbytes // 16), name=KERNEL)


def expected_sum(nbytes: int, word: int = FILL_WORD) -> int:
    """What the probe must return (mod 2**32) over ``nbytes`` filled with ``word``."""
    return ((nbytes // 4) * word) & 0xFFFFFFFF


def measure_read_bandwidth(rt, nbytes: int = DEFAULT_BYTES, repeats: int = 20, warmup: int = 3) -> float:
    """Median read bandwidth in bytes/s over ``repeats`` timed passes (CUDA backend only)."""
    from ... import memory
    from ...errors import NexusRTError
    from ...driver.calls import call
    from ...driver.streams import Event

    if not rt.is_cuda:
        raise NexusRTError("measure_read_bandwidth needs the CUDA backend")
    check_positive(nbytes=nbytes, repeats=repeats)
    nbytes -= nbytes % 16
    stream = rt.streams["compute"]
    buf = memory.empty((nbytes,), "uint8", tag="membw")
    kernel = rt.kernels.get(SOURCE, KERNEL, SIGNATURE)
    blocks = blocks_per_sm(kernel, THREADS, 0) * sm_count(rt)
    partial = memory.empty((blocks,), "int32", tag="membw")
    try:
        call("cuMemsetD32Async", ptr(buf), FILL_WORD, nbytes // 4, stream.handle)
        spec = read_probe(rt, partial, buf, nbytes, blocks)
        start, stop = Event("cuda"), Event("cuda")
        times = []
        for i in range(warmup + repeats):
            # Poison the sums so a pass that did not run cannot pass the check on stale data.
            call("cuMemsetD32Async", ptr(partial), 0xFFFFFFFF, blocks, stream.handle)
            start.record(stream)
            spec.launch(stream)
            stop.record(stream)
            stop.synchronize()
            if i >= warmup:
                times.append(start.elapsed_ms(stop) * 1e-3)
            got = int(partial.to_numpy().view(np.uint32).astype(np.uint64).sum()) & 0xFFFFFFFF
            if got != expected_sum(nbytes):
                raise NexusRTError(f"bandwidth probe read wrong data: sum {got:#x}, expected "
                                   f"{expected_sum(nbytes):#x}; the measurement would not be honest")
        start.destroy()
        stop.destroy()
    finally:
        partial.free()
        buf.free()
    return nbytes / statistics.median(times)
