"""The in-process communicator: NCCL's collectives, for ranks that run in lockstep in one process.

On the GPU each rank is a process that calls ``all_reduce(its buffer)`` and receives the
sum. On the CPU all ranks live in one process and run one after another, so a collective
takes every rank's buffer at once and returns the one array each rank would receive.

**Deterministic order.** ``all_reduce`` sums in rank order, ``((p0 + p1) + p2) + ...`` in
the buffers' dtype (fp32), so a run is reproducible bit for bit; it differs from TP=1 only
by where the fp32 sums of a row-parallel product are split (NCCL's ring sums in another
order again, so GPU and CPU agree to rounding, not bits).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def check_repeats(repeats) -> int:
    """``repeats`` (the steps a collective timing runs, on either backend's ranks) if it is an
    integer >= 1, else ValueError: checked before a rank runs one collective, so no rank is
    left waiting in one its peers refused."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    return repeats


class LocalGroup:
    """A communicator over ``size`` in-process ranks (rank ``r``'s buffer is ``parts[r]``)."""

    def __init__(self, size: int):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"group size must be an integer >= 1, got {size!r}")
        self.size = size

    def all_reduce(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """The elementwise sum of every rank's buffer, in rank order (read-only: all ranks share it)."""
        self._check(parts, same_shape=True)
        total = np.array(parts[0], copy=True)
        for p in parts[1:]:
            total += p
        total.flags.writeable = False
        return total

    def all_gather(self, parts: Sequence[np.ndarray], axis: int = -1) -> np.ndarray:
        """Every rank's buffer concatenated along ``axis`` in rank order (a vocab-parallel head's logits)."""
        self._check(parts, same_shape=False)
        return np.concatenate(parts, axis=axis)

    def _check(self, parts: Sequence[np.ndarray], same_shape: bool) -> None:
        if len(parts) != self.size:
            raise ValueError(f"a collective of {self.size} ranks got {len(parts)} buffers")
        if same_shape and any(p.shape != parts[0].shape for p in parts):
            raise ValueError(f"all_reduce buffers differ in shape: {[p.shape for p in parts]}")
