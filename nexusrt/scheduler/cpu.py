"""The CPU engine: the same plans, run one stage at a time with NumPy callables.

Submission only queues work, as on a GPU; the barrier runs it. Each stream is a FIFO and a
stage also waits for its dependencies on other streams and for its doorbell gate, so the
order (and a stage waiting on a doorbell the host rings after submitting) behaves as it
does on the device. A callable that raises stops the queue: the error is reported at the
barrier naming the stage, and the work queued behind it is dropped (a CUDA context that
faulted loses its queued work the same way).
"""

from __future__ import annotations

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

    def completed(self, role: str) -> int:
        return self.done[role]

    def enqueue(self, plan, gate_values: dict, last: dict, args_override: dict | None = None) -> list[int]:
        """Queue every stage of ``plan``; returns each item's sequence number on its stream."""
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
        need = None if until is None else self._needed(*until)
        while True:
            if until is not None and self.done[until[0]] >= until[1]:
                return
            heads = [q[0] for q in self.queues.values() if q and (need is None or q[0].seq <= need.get(q[0].role, 0))]
            if not heads:
                return
            ready = [e for e in heads if self._ready(e)]
            if not ready:
                # Only a doorbell can unblock us now; another thread may ring it.
                if deadline is not None and time.perf_counter() > deadline:
                    raise TimeoutError
                time.sleep(50e-6)
                continue
            entry = min(ready, key=lambda e: e.order)
            self.queues[entry.role].popleft()
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
        if any(self.done[r] < s for r, s in e.deps):
            return False
        return e.gate is None or e.stage.gate[0].value >= e.gate

    def _execute(self, e: _Entry) -> None:
        s = e.stage
        if s.kind == "host":
            kwargs = {"stream": self.rt.streams[e.role]} if s.wants_stream else {}
            try:
                s.kernel(*e.args, **kwargs)
            except Exception as exc:
                dropped = self._drop_all()
                more = f"; {len(dropped)} queued stage(s) dropped: {', '.join(dropped[:5])}" if dropped else ""
                err = SchedulerError(f"stage {s.name!r} failed on stream {e.role!r}: "
                                     f"{type(exc).__name__}: {exc}{more}")
                err.stage = s.name
                raise err from exc
        if s.ring is not None:
            s.ring.ring()
        self.done[e.role] = e.seq

    def _drop_all(self) -> list[str]:
        dropped = [e.stage.name for q in self.queues.values() for e in q]
        for role, q in self.queues.items():
            q.clear()
        for role, n in self.issued.items():
            self.done[role] = n  # abandoned work counts as finished, so no barrier waits for it
        return dropped

    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def close(self) -> None:
        self._drop_all()
