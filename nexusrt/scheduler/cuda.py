"""The CUDA engine: enqueue plans on the runtime's streams, and wait for them.

Ordering across streams uses events (the producer records, the consumer's stream waits).
Progress uses one doorbell word per stream (pinned, device-mapped host memory): after each
stage its stream writes the stage's sequence number there (``cuStreamWriteValue32``). The
host can then wait for one stage by reading that word, with no driver call; and after a
kernel faults (the context is then broken and every call fails) the words still say
exactly which stages finished, so the error can name the first one that did not.
"""

from __future__ import annotations

import time

from ..errors import SchedulerError
from ..driver.doorbell import Doorbell
from ..driver.streams import Event


class CudaEngine:
    """Submits plan items on CUDA streams; ``completed(role)`` reads the stream's progress word."""

    def __init__(self, rt):
        self.rt = rt
        self.progress: dict[str, Doorbell] = {}
        self._free_events: list[Event] = []

    # -- progress ----------------------------------------------------------------------------
    def _bell(self, role: str) -> Doorbell:
        bell = self.progress.get(role)
        if bell is None:
            bell = self.progress[role] = Doorbell("cuda", f"progress.{role}")
        return bell

    def completed(self, role: str) -> int:
        bell = self.progress.get(role)
        return 0 if bell is None else bell.value

    # -- submission ---------------------------------------------------------------------------
    def enqueue(self, plan, gate_values: dict, last: dict, args_override=None) -> list[int]:
        """Enqueue every stage of ``plan``; returns each item's sequence number on its stream."""
        events: dict[int, Event] = {}
        seqs = []
        try:
            for item in plan.items:
                stream = self.rt.streams.get(item.stage.stream)
                self.run_stage(item, stream, events, gate_values.get(item.index), last)
                seqs.append(self._bell(item.role).ring(stream))
        finally:
            self.release(events)
        return seqs

    def run_stage(self, item, stream, events: dict, gate_value, last=None) -> None:
        """Enqueue one stage: its waits, its work, its ring and (if needed) its signal event."""
        s = item.stage
        for d in item.cross:
            events[d].wait_by(stream)
        for name in item.external:
            role, seq = last[name]
            if role != item.role:  # same stream: stream order already holds
                self._bell(role).wait_on(stream, seq)
        if s.gate is not None:
            s.gate[0].wait_on(stream, gate_value)
        try:
            if s.kind == "launch":
                s.kernel.launch(stream)
            elif s.kind == "host":
                s.kernel(*s.args, **({"stream": stream} if s.wants_stream else {}))
        except Exception as exc:
            err = SchedulerError(f"stage {s.name!r} could not be submitted on stream {item.role!r}: "
                                 f"{type(exc).__name__}: {exc}")
            err.stage = s.name
            raise err from exc
        if s.ring is not None:
            s.ring.ring(stream)
        if item.signals:
            events[item.index] = self._event().record(stream)

    def reserve_events(self, count: int) -> None:
        """Have ``count`` free events ready (capture creates none while it runs)."""
        while len(self._free_events) < count:
            self._free_events.append(Event("cuda", timing=False))

    def _event(self) -> Event:
        return self._free_events.pop() if self._free_events else Event("cuda", timing=False)

    def release(self, events: dict) -> None:
        # Waits already enqueued keep the record they saw, so the events are reusable now.
        self._free_events.extend(events.values())
        events.clear()

    # -- waiting ------------------------------------------------------------------------------
    def wait(self, role: str, seq: int, deadline: float | None) -> None:
        """Return once stage ``seq`` on ``role`` is done; CudaError on a fault, TimeoutError past deadline."""
        bell = self._bell(role)
        stream = self.rt.streams[role]
        spins, t0 = 0, time.perf_counter()
        while bell.value < seq:
            spins += 1
            if spins % 64:
                continue
            if stream.query():  # raises CudaError after a fault
                return  # idle: everything it was given is done
            now = time.perf_counter()
            if deadline is not None and now > deadline:
                raise TimeoutError
            if now - t0 > 2e-3:  # past a short spin, stop burning a core
                time.sleep(20e-6)

    def wait_all(self, deadline: float | None) -> None:
        """Return once every stream of the pool is idle (stages, replays, raw launches)."""
        for stream in self.rt.streams.streams.values():
            if deadline is None:
                stream.synchronize()
                continue
            t0 = time.perf_counter()
            while not stream.query():
                now = time.perf_counter()
                if now > deadline:
                    raise TimeoutError
                if now - t0 > 2e-3:
                    time.sleep(20e-6)

    def close(self) -> None:
        for ev in self._free_events:
            ev.destroy()
        self._free_events.clear()
        for bell in self.progress.values():
            bell.close()
        self.progress.clear()
