"""Streams with priorities, and events.

The pool holds one stream per role. Priorities come from ``cuCtxGetStreamPriorityRange``
(on the H100: least 0, greatest -5; lower numbers run first). On the CPU backend the
same objects exist with no handle, so code above can name streams without branching.
"""

from __future__ import annotations

import time

from .calls import call, cu

# role -> which end of the priority range it takes
ROLES = {
    "compute": "low",
    "compute_high": "high",
    "h2d": "mid",
    "d2h": "mid",
    "control": "high",
}


class Stream:
    """A CUDA stream (``handle``) with a role and a priority; ``handle`` is None on CPU."""

    def __init__(self, role: str, priority: int, handle=None):
        self.role, self.priority, self.handle = role, priority, handle

    def synchronize(self) -> None:
        if self.handle is not None:
            call("cuStreamSynchronize", self.handle)

    def query(self) -> bool:
        """True when all work on the stream has finished."""
        if self.handle is None:
            return True
        (err,) = cu().cuStreamQuery(self.handle)
        if int(err) == 0:
            return True
        if err == cu().CUresult.CUDA_ERROR_NOT_READY:
            return False
        from .calls import check

        return check((err,), "cuStreamQuery")

    def destroy(self) -> None:
        """Release the handle (the stream's queued work still runs; nothing waits for it)."""
        if self.handle is not None:
            call("cuStreamDestroy", self.handle)
            self.handle = None

    def __repr__(self) -> str:
        return f"Stream({self.role!r}, priority={self.priority})"


def priority_of(level: str, priority_range: tuple[int, int]) -> int:
    """The priority number of ``level`` (``"low"``, ``"mid"``, ``"high"``) in ``(least, greatest)``."""
    least, greatest = priority_range
    return {"low": least, "high": greatest, "mid": (least + greatest) // 2}[level]


class StreamPool:
    """One stream per role, created at boot and destroyed at shutdown."""

    def __init__(self, backend: str):
        self.backend = backend
        self.streams: dict[str, Stream] = {}
        self.priority_range = (0, 0)
        if backend == "cuda":
            least, greatest = call("cuCtxGetStreamPriorityRange")
            self.priority_range = (int(least), int(greatest))
        for role, level in ROLES.items():
            self.streams[role] = self.new(role, level)

    def new(self, role: str, level: str = "mid") -> Stream:
        """A non-blocking stream at ``level`` of the priority range. The pool's own are made
        here; one made for a caller is the caller's to destroy: for work that may park in a
        doorbell wait, which would hold up anything queued behind it on a shared stream."""
        if self.backend != "cuda":
            return Stream(role, 0)
        prio = priority_of(level, self.priority_range)
        return Stream(role, prio, call("cuStreamCreateWithPriority", cu().CUstream_flags.CU_STREAM_NON_BLOCKING, prio))

    def __getitem__(self, role: str) -> Stream:
        try:
            return self.streams[role]
        except KeyError:
            raise ValueError(f"unknown stream {role!r}: streams are {', '.join(self.streams)}") from None

    def get(self, stream: "str | Stream") -> Stream:
        """A stream by role name, or the stream itself."""
        return stream if isinstance(stream, Stream) else self[stream]

    def synchronize(self) -> None:
        for s in self.streams.values():
            s.synchronize()

    def close(self) -> None:
        for s in self.streams.values():
            s.destroy()
        self.streams.clear()


class Event:
    """A CUDA event (timing enabled unless ``timing=False``); a host clock on CPU."""

    def __init__(self, backend: str, timing: bool = True):
        self.backend = backend
        self.handle = None
        self._host_t = None
        if backend == "cuda":
            flags = cu().CUevent_flags.CU_EVENT_DEFAULT if timing else cu().CUevent_flags.CU_EVENT_DISABLE_TIMING
            self.handle = call("cuEventCreate", flags)

    def record(self, stream: Stream | None = None) -> "Event":
        if self.handle is None:
            self._host_t = time.perf_counter()
        else:
            call("cuEventRecord", self.handle, stream.handle if stream else 0)
        return self

    def wait_by(self, stream: Stream) -> None:
        """Make ``stream`` wait for this event before its later work."""
        if self.handle is not None:
            call("cuStreamWaitEvent", stream.handle, self.handle, 0)

    def synchronize(self) -> None:
        if self.handle is not None:
            call("cuEventSynchronize", self.handle)

    def query(self) -> bool:
        if self.handle is None:
            return True
        (err,) = cu().cuEventQuery(self.handle)
        if int(err) == 0:
            return True
        if err == cu().CUresult.CUDA_ERROR_NOT_READY:
            return False
        from .calls import check

        return check((err,), "cuEventQuery")

    def elapsed_ms(self, later: "Event") -> float:
        """Milliseconds from this event to ``later`` (both recorded and complete)."""
        if self.handle is None:
            return (later._host_t - self._host_t) * 1e3
        return float(call("cuEventElapsedTime", self.handle, later.handle))

    def destroy(self) -> None:
        if self.handle is not None:
            call("cuEventDestroy", self.handle)
            self.handle = None

    def __del__(self):
        try:
            self.destroy()
        except Exception:  # the context may already be gone at interpreter exit
            pass
