"""Where each item's raw bytes land, and the conversion that finishes it.

Verbatim items land in their destination. Converting items land in a device scratch
tensor of the stored dtype, allocated when the first piece arrives; once every byte
is in, the conversion kernel runs on the copy stream (after the copies, in stream
order) and the scratch is retired. Retired scratch is freed as soon as its kernel is
done, and at most ``scratch_cap`` bytes of it wait, so an fp32 checkpoint never needs
its whole fp32 image on the device. On the CPU backend NumPy converts in place.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from ... import memory
from ...driver.streams import Event
from .plan import LoadItem, Route

SCRATCH_TAG = "load_scratch"


class Targets:
    """Addresses and completion of every item of one load (see the module docstring)."""

    def __init__(self, rt, items: list[LoadItem], routes: list[Route], stream, scratch_cap: int = 1 << 30):
        self.rt, self.items, self.routes, self.stream = rt, items, routes, stream
        self.remaining = [it.info.nbytes for it in items]
        self.scratch: dict[int, object] = {}
        self.retired: deque = deque()  # (scratch tensor, event after its conversion)
        self.scratch_cap = scratch_cap
        self.converted = 0
        for i, n in enumerate(self.remaining):
            if n == 0:
                self._finish(i)  # nothing to read: an empty tensor is complete already

    def address(self, i: int) -> int:
        """The device address item ``i``'s byte 0 lands at (allocating its scratch if needed)."""
        route = self.routes[i]
        if not route.converts:
            return self.items[i].dst.ptr
        t = self.scratch.get(i)
        if t is None:
            t = self.scratch[i] = memory.empty((self.items[i].info.numel,), route.scratch_dtype, tag=SCRATCH_TAG)
        return t.ptr

    def received(self, i: int, nbytes: int) -> None:
        """``nbytes`` more of item ``i`` are in (their copies queued on ``stream``)."""
        self.remaining[i] -= nbytes
        if self.remaining[i] < 0:
            raise AssertionError(f"item {self.items[i].info.name!r} received more bytes than it holds")
        if self.remaining[i] == 0:
            self._finish(i)

    def incomplete(self) -> list[str]:
        return [it.info.name for it, r in zip(self.items, self.remaining) if r]

    def _finish(self, i: int) -> None:
        route = self.routes[i]
        if not route.converts or self.items[i].info.nbytes == 0:
            return
        src, dst = self.scratch.pop(i), self.items[i].dst
        n = dst.numel
        if self.rt.is_cuda:
            from ...kernels.ops import elementwise as ew

            getattr(ew, route.kernel)(self.rt, dst.reshape(n), src, n=n).launch(self.stream)
            self.retired.append((src, Event(self.rt.backend, timing=False).record(self.stream)))
            self._sweep()
        else:
            dst.array.reshape(n)[...] = src.array.astype(dst.numpy_dtype)
            src.free()
        self.converted += 1

    def _sweep(self) -> None:
        """Free retired scratch whose conversion is done; wait for the oldest past the cap."""
        while self.retired:
            t, ev = self.retired[0]
            waiting = sum(x.nbytes for x, _ in self.retired)
            if not ev.query() and waiting <= self.scratch_cap:
                break
            ev.synchronize()
            self.retired.popleft()
            t.free()
            ev.destroy()

    def close(self) -> None:
        """Wait for queued conversions and free every scratch tensor (after success or failure)."""
        if self.stream is not None:
            self.stream.synchronize()
        errors = []
        for t in list(self.scratch.values()) + [t for t, _ in self.retired]:
            try:
                if t.is_live:
                    t.free()
            except Exception as exc:  # keep freeing; report the first
                errors.append(exc)
        for _, ev in self.retired:
            ev.destroy()
        self.scratch.clear()
        self.retired.clear()
        if errors:
            raise errors[0]


def np_view(t) -> np.ndarray:
    """A host tensor's bytes as a flat uint8 array (staging buffers)."""
    return t.array.reshape(-1).view(np.uint8)
