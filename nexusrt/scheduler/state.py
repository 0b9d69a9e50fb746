"""The scheduler that lives on the runtime (``rt.scheduler``): submissions and barriers.

It validates graphs against the device, hands plans to the backend's engine (CUDA streams
or the CPU queue), remembers which stage is where on which stream, and turns what goes
wrong while waiting into a :class:`~nexusrt.errors.SchedulerError` naming the stage.
"""

from __future__ import annotations

import numbers
import threading
import time
from collections import defaultdict, deque

from ..errors import CudaError, SchedulerError
from ..driver.waits import deadline_ms, default_timeout_ms
from .contract import StageContract
from .graph import Plan, TaskGraph

# Completed records are dropped once a stream has this many outstanding, so a caller that
# never waits does not grow the bookkeeping without bound.
_PRUNE_AT = 4096
# Names of finished stages are forgotten, oldest first, once more than this many are remembered
# (a caller naming every step anew would otherwise grow ``last`` and every submission's check).
REMEMBERED_NAMES = 1 << 16


def device_free_bytes(rt) -> tuple[int | None, str]:
    """What the device can still give a stage, and where the number came from.

    Prefers the arena's own accounting (what a new allocation could still get); falls back
    to the profile's total memory.
    """
    arena = getattr(rt, "arena", None)
    if arena is not None:
        for source in (arena, getattr(arena, "core", None), _call(getattr(arena, "stats", None))):
            for key in ("available_bytes", "free_bytes"):
                value = source.get(key) if isinstance(source, dict) else getattr(source, key, None)
                value = _call(value)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    return int(value), f"arena {key}"
    total = getattr(getattr(rt, "profile", None), "memory_bytes", 0)
    if total:
        return int(total), "device memory in the profile"
    return None, "unknown"


def _call(v):
    try:
        return v() if callable(v) else v
    except Exception:  # a stats call that fails just means no figure from there
        return None


def as_graph(x) -> TaskGraph:
    """A StageContract, a TaskGraph or an iterable of stages, as a TaskGraph."""
    if isinstance(x, TaskGraph):
        return x
    if isinstance(x, StageContract):
        return TaskGraph([x], name=x.name)
    try:
        stages = list(x)
    except TypeError:
        raise TypeError(f"expected a stage, a TaskGraph or a list of stages, got {type(x).__name__}") from None
    return TaskGraph(stages)


class Scheduler:
    """Submissions and barriers for one runtime. Threads may submit and wait at once: a lock
    guards the bookkeeping (held while a submission is validated and queued, not while a
    barrier waits), and each engine guards its own queues."""

    def __init__(self, rt):
        self.rt = rt
        if rt.is_cuda:
            from .cuda import CudaEngine

            self.engine = CudaEngine(rt)
        else:
            from .cpu import CpuEngine

            self.engine = CpuEngine(rt)
        self.inflight: dict[str, deque] = defaultdict(deque)  # role -> (seq, stage, gate value)
        self.last: dict[str, tuple[str, int]] = {}  # stage name -> (role, seq) of its latest submission
        self.captured: list = []
        self.lock = threading.RLock()

    # -- submission ---------------------------------------------------------------------------
    def plan(self, x) -> Plan:
        """Validate ``x`` against this runtime and return the plan, submitting nothing."""
        free, source = device_free_bytes(self.rt)
        with self.lock:
            return as_graph(x).validate(self.rt.backend, free, source, known=self.last)

    def submit(self, x) -> Plan:
        with self.lock:  # a stage named in depends_on must not be forgotten between the check and the queueing
            plan = self.plan(x)
            self.enqueue(plan)
        return plan

    def enqueue(self, plan: Plan, args_override: dict | None = None) -> None:
        with self.lock:
            # "Next ring" gates are resolved before anything is enqueued: a stage of this same
            # submission that rings the bell must not move the target of a waiter listed after it.
            gates = {it.index: self.gate_value(it.stage) for it in plan.items if it.stage.gate is not None}
            seqs = self.engine.enqueue(plan, gates, self.last, args_override)
            for it, seq in zip(plan.items, seqs):
                q = self.inflight[it.role]
                q.append((seq, it.stage, gates.get(it.index)))
                self.last.pop(it.name, None)  # re-inserted: the dict stays in order of latest submission
                self.last[it.name] = (it.role, seq)
                if len(q) > _PRUNE_AT:
                    self._prune(it.role)
            if len(self.last) > REMEMBERED_NAMES:
                self._forget_finished()

    def _forget_finished(self) -> None:
        """Drop the oldest names whose latest submission has finished, down to half the bound."""
        excess = len(self.last) - REMEMBERED_NAMES // 2
        for name, (role, seq) in list(self.last.items()):
            if excess <= 0:
                break
            if seq <= self.engine.completed(role):
                del self.last[name]
                excess -= 1

    @staticmethod
    def gate_value(stage) -> int:
        bell, value = stage.gate
        return bell.count + 1 if value is None else int(value)

    def _prune(self, role: str) -> None:
        done, q = self.engine.completed(role), self.inflight[role]
        while q and q[0][0] <= done:
            q.popleft()

    # -- barriers -----------------------------------------------------------------------------
    def wait_barrier(self, name: str | None = None, timeout_ms: float | None = None) -> None:
        """Wait for stage ``name`` (its latest submission) or for everything submitted.

        ``timeout_ms`` None means the default bound (:mod:`nexusrt.driver.waits`), ``math.inf`` none.
        """
        if timeout_ms is not None and (isinstance(timeout_ms, bool) or not isinstance(timeout_ms, numbers.Real)):
            raise TypeError(f"timeout_ms must be a number of milliseconds, math.inf or None, got {timeout_ms!r}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"wait_barrier takes a stage name (a string) or None, got {name!r}")
        deadline = deadline_ms(timeout_ms, time.perf_counter())
        timeout_ms = timeout_ms if timeout_ms is not None else default_timeout_ms()
        with self.lock:
            target = None if name is None else self.last.get(name)
        if name is not None and target is None:
            raise ValueError(f"no stage named {name!r} was submitted (the scheduler forgets finished stages "
                             f"beyond its latest {REMEMBERED_NAMES} names)")
        what = "everything submitted" if name is None else f"stage {name!r}"
        try:
            if self.rt.is_cuda:
                if name is None:
                    self.engine.wait_all(deadline)
                else:
                    self.engine.wait(*target, deadline)
            else:
                self.engine.run(target, deadline)
        except TimeoutError:
            raise self._timeout_error(what, timeout_ms) from None
        except CudaError as exc:
            raise self._fault_error(what, exc) from exc
        finally:
            with self.lock:
                for role in list(self.inflight):
                    self._prune(role)

    def _unfinished(self) -> list[tuple[str, int, object, int | None]]:
        """(role, seq, stage, gate value) of the first unfinished stage on each stream."""
        out = []
        with self.lock:
            queues = list(self.inflight.items())
        for role, q in queues:
            done = self.engine.completed(role)
            for seq, stage, gate in q:
                if seq > done:
                    out.append((role, seq, stage, gate))
                    break
        return out

    def _timeout_error(self, what: str, timeout_ms) -> SchedulerError:
        parts, left = [], self._unfinished()
        for role, _, stage, gate in left:
            text = f"stage {stage.name!r} on stream {role!r}"
            if gate is not None and stage.gate[0].value < gate:
                bell = stage.gate[0]
                text += f" (gated on doorbell {bell.name!r}: waits for {gate}, it is at {bell.value})"
            parts.append(text)
        still = "; still running: " + ", ".join(parts) if parts else ""
        err = SchedulerError(f"wait_barrier timed out after {timeout_ms} ms waiting for {what}{still}")
        err.stage = left[0][2].name if left else None
        return err

    def _fault_error(self, what: str, exc: CudaError) -> SchedulerError:
        # After a fault the context is broken: the progress words are all we can still read,
        # and they say which stage on each stream did not finish.
        left = self._unfinished()
        if len(left) == 1:
            role, _, stage, _ = left[0]
            msg = f"stage {stage.name!r} on stream {role!r} failed"
        elif left:
            names = ", ".join(f"{s.name!r} ({r})" for r, _, s, _ in left)
            msg = f"a stage failed; the first unfinished stage on each stream: {names}"
        else:
            msg = "work outside the scheduler's stages failed (a replayed graph or a raw launch)"
        err = SchedulerError(f"{msg} while waiting for {what}: {exc} (the CUDA context is unusable now; "
                             "restart the process)")
        err.stage = left[0][2].name if left else None
        return err

    def pending(self) -> int:
        """Stages submitted and not known to be finished."""
        with self.lock:
            return sum(1 for role in self.inflight for seq, _, _ in self.inflight[role]
                       if seq > self.engine.completed(role))

    def close(self) -> None:
        with self.lock:
            for g in list(self.captured):
                g.close()
            self.captured.clear()
            self.engine.close()
            self.inflight.clear()
            self.last.clear()

