"""Doorbells: a 32-bit word that streams wait on and that the host or a stream rings.

The word lives in pinned, device-mapped host memory (``cuMemHostAlloc``), the one place
both the host (a plain store) and the device (``cuStreamWaitValue32`` /
``cuStreamWriteValue32``) can reach without a copy. Values only grow: ``ring()`` bumps the
count, and waiters wait for ``word >= value``, so a late waiter never misses a ring.
"""

from __future__ import annotations

import ctypes
import time

from ..errors import SchedulerError
from .calls import call, cu
from .waits import deadline_ms, default_timeout_ms


def write_word(stream_handle, addr: int, value: int) -> None:
    """Store the 32-bit ``value`` at device address ``addr`` in ``stream_handle``'s order."""
    call("cuStreamWriteValue32", stream_handle, addr, int(value),
         cu().CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT)


def wait_word(stream_handle, addr: int, value: int, *, any_bit: bool = False) -> None:
    """Hold ``stream_handle``'s later work until the 32-bit word at ``addr`` is ``>= value``
    (cyclic compare), or with ``any_bit`` until ``word & value != 0`` (a flag the waiter clears)."""
    flags = cu().CUstreamWaitValue_flags
    call("cuStreamWaitValue32", stream_handle, addr, int(value),
         flags.CU_STREAM_WAIT_VALUE_AND if any_bit else flags.CU_STREAM_WAIT_VALUE_GEQ)


class Doorbell:
    """A monotonic counter shared by the host and the device."""

    def __init__(self, backend: str, name: str = "doorbell"):
        self.backend, self.name = backend, name
        self.count = 0
        self._host_ptr = 0
        self.device_ptr = 0
        if backend == "cuda":
            flags = cu().CU_MEMHOSTALLOC_DEVICEMAP | cu().CU_MEMHOSTALLOC_PORTABLE
            self._host_ptr = int(call("cuMemHostAlloc", 4, flags))
            self._word().value = 0
            self.device_ptr = int(call("cuMemHostGetDevicePointer", self._host_ptr, 0))

    def _word(self) -> ctypes.c_uint32:
        return ctypes.c_uint32.from_address(self._host_ptr)

    @property
    def value(self) -> int:
        """The word as it stands now (the device may have written it)."""
        return int(self._word().value) if self.backend == "cuda" else self.count

    def ring(self, stream=None) -> int:
        """Bump the count and store it: from the host now, or from ``stream`` in order.

        Returns the value rung, which waiters compare against.
        """
        self.count += 1
        if self.backend == "cuda":
            if stream is None:
                self._word().value = self.count
            else:
                write_word(stream.handle, self.device_ptr, self.count)
        return self.count

    def wait_on(self, stream, value: int | None = None) -> int:
        """Hold ``stream``'s later work until the word reaches ``value`` (default: next ring)."""
        value = self.count + 1 if value is None else int(value)
        if self.backend == "cuda":
            wait_word(stream.handle, self.device_ptr, value)
        return value

    def host_wait(self, value: int, timeout_ms: float | None = None) -> None:
        """Spin on the host until the word reaches ``value``; raise after ``timeout_ms``
        (None: the default bound of :mod:`nexusrt.driver.waits`; ``math.inf``: no limit)."""
        deadline = deadline_ms(timeout_ms, time.perf_counter())
        timeout_ms = timeout_ms if timeout_ms is not None else default_timeout_ms()
        while self.value < value:
            if deadline is not None and time.perf_counter() > deadline:
                raise SchedulerError(
                    f"doorbell {self.name!r} did not reach {value} within {timeout_ms} ms (at {self.value})"
                )

    def close(self) -> None:
        if self._host_ptr:
            call("cuMemFreeHost", self._host_ptr)
            self._host_ptr = 0
            self.device_ptr = 0

    def __del__(self):
        try:
            self.close()
        except Exception:  # context already torn down at exit
            pass
