"""The CPU engine: the same plans, run one stage at a time with NumPy callables.

Submission only queues work, as on a GPU; the barrier runs it. Each stream is a FIFO and a
stage also waits for its dependencies on other streams and for its doorbell gate, so the
order (and a stage waiting on a doorbell the host rings after submitting) behaves as it
does on the device. A callable that raises stops the queue: the error is reported at the
barrier naming the stage, and the work queued behind it is dropped (a CUDA context that
faulted loses its queued work the same way); so does one interrupted (KeyboardInterrupt),
which then propagates as it is.

Threads: the queues are guarded by one lock, held only to queue, pick and retire stages,
never while a stage runs, so several threads may submit and wait at once. A thread's barrier
runs ready stages itself; a stage picked by another thread is waited for, never run twice, and
the next stage of a stream is not picked before the one ahead of it has finished.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from ..errors import SchedulerError


@dataclass
class _Entry:
    order: int  # global submission order, to run the earliest ready stage first
    stage: object
    role: str
    seq: int
    deps: list  # (role, seq) that must be done first
    gate: int | None
    args: tuple


class CpuEngine:
    """Stream queues of stages on the host; ``done[role]`` is the last finished sequence number."""

    def __init__(self, rt):
        self.rt = rt
        self.done: dict[str, int] = defaultdict(int)
        self.issued: dict[str, int] = defaultdict(int)
        self.queues: dict[str, deque] = defaultdict(deque)
        self._order = 0
        self._lock = threading.Lock()
        self._running = 0  # stages picked by some thread's barrier and not yet retired

    def completed(self, role: str) -> int:
        return self.done[role]

    def enqueue(self, plan, gate_values: dict, last: dict, args_override: dict | None = None) -> list[int]:
        """Queue every stage of ``plan``; returns each item's sequence number on its stream."""
        with self._lock:
            return self._enqueue(plan, gate_values, last, args_override)

    def _enqueue(self, plan, gate_values: dict, last: dict, args_override: dict | None) -> list[int]:
        seqs = []
        for item in plan.items:
            role = item.role
            self.issued[role] += 1
            seq = self.issued[role]
            deps = [(plan.items[d].role, seqs[d]) for d in item.deps] + [last[n] for n in item.external]
            args = item.stage.args
            if args_override and item.name in args_override:
                args = args_override[item.name]
            self._order += 1
            self.queues[role].append(_Entry(self._order, item.stage, role, seq, deps,
                                            gate_values.get(item.index), args))
            seqs.append(seq)
        return seqs

    def run(self, until: tuple[str, int] | None = None, deadline: float | None = None) -> None:
        """Run queued stages until ``until`` (role, seq) is done, or all are.

        Only what ``until`` needs runs (its stream up to it, and what those stages wait for).
        Raises TimeoutError when nothing can run (a gate not rung) past ``deadline``.
        """
        with self._lock:
            need = None if until is None else self._needed(*until)
        while True:
            with self._lock:
                if until is not None and self.done[until[0]] >= until[1]:
                    return
                heads = [q[0] for q in self.queues.values()
                         if q and (need is None or q[0].seq <= need.get(q[0].role, 0))]
                if not heads and not self._running:
                    return  # nothing left that this barrier needs (or it was dropped after a failure)
                ready = [e for e in heads if self._ready(e)]
                entry = min(ready, key=lambda e: e.order) if ready else None
                if entry is not None:
                    self.queues[entry.role].popleft()
                    self._running += 1
            if entry is None:
                # A doorbell (another thread may ring it) or another thread's stage can unblock us.
                if deadline is not None and time.perf_counter() > deadline:
                    raise TimeoutError
                time.sleep(50e-6)
                continue
            self._execute(entry)

    def _needed(self, role: str, seq: int) -> dict[str, int]:
        """Per stream, the last sequence number that must run for (role, seq) to finish."""
        need, changed = {role: seq}, True
        while changed:
            changed = False
            for r, q in self.queues.items():
                for e in q:
                    if e.seq > need.get(r, 0):
                        break
                    for dr, ds in e.deps:
                        if ds > need.get(dr, 0):
                            need[dr], changed = ds, True
        return need

    def _ready(self, e: _Entry) -> bool:
        if self.done[e.role] < e.seq - 1:  # the stage ahead of it on its stream still runs in another thread
            return False
        if any(self.done[r] < s for r, s in e.deps):
            return False
        return e.gate is None or e.stage.gate[0].value >= e.gate

    def _execute(self, e: _Entry) -> None:
        """Run a picked stage (without the lock), then retire it; a failure drops the queues."""
        s = e.stage
        try:
            if s.kind == "host":
                kwargs = {"stream": self.rt.streams[e.role]} if s.wants_stream else {}
                s.kernel(*e.args, **kwargs)
            if s.ring is not None:
                s.ring.ring()
        except BaseException as exc:  # KeyboardInterrupt too: the stage is not left half counted
            with self._lock:
                self._running -= 1
                dropped = self._drop_all()
            if not isinstance(exc, Exception):
                raise
            more = f"; {len(dropped)} queued stage(s) dropped: {', '.join(dropped[:5])}" if dropped else ""
            err = SchedulerError(f"stage {s.name!r} failed on stream {e.role!r}: "
                                 f"{type(exc).__name__}: {exc}{more}")
            err.stage = s.name
            raise err from exc
        with self._lock:
            self._running -= 1
            self.done[e.role] = max(self.done[e.role], e.seq)  # a failure elsewhere may have moved it on

    def _drop_all(self) -> list[str]:
        dropped = [e.stage.name for q in self.queues.values() for e in q]
        for role, q in self.queues.items():
            q.clear()
        for role, n in self.issued.items():
            self.done[role] = n  # abandoned work counts as finished, so no barrier waits for it
        return dropped

    def pending(self) -> int:
        with self._lock:
            return sum(len(q) for q in self.queues.values()) + self._running

    def close(self) -> None:
        with self._lock:
            self._drop_all()
