"""The scheduler layer: stage contracts, task graphs, submission, barriers, CUDA graph capture.

>>> import nexusrt as nrt
>>> dev = nrt.firmware.init(profile="auto")
>>> buf = nrt.memory.alloc(shape=(4096, 4096), dtype="bf16", ilc=True)
>>> stage = nrt.scheduler.stage(name="infer.transformer_block_0", inputs=[buf], outputs=[],
...                             token_budget=4096, sm_footprint_mb=64)
>>> nrt.scheduler.submit(stage)
>>> nrt.scheduler.wait_barrier()

Ordering rules: a stage runs after the stages it ``depends_on`` and after the stages whose
tensors it needs (see :mod:`nexusrt.scheduler.hazards`); stages on one stream run in
submission order; stages on different streams are ordered with events; a stage with a
``gate`` waits for a doorbell. Everything is validated before any work is submitted.
The state lives on the runtime (``rt.scheduler``) and is released by ``nrt.firmware.shutdown()``.
"""

from __future__ import annotations

import threading

from .. import runtime as _runtime
from .capture import CapturedGraph
from .contract import Placeholder, StageContract, make_stage
from .graph import Plan, PlanItem, TaskGraph
from .state import Scheduler, as_graph, device_free_bytes


_CREATE = threading.Lock()  # guards the lazy creation of a runtime's scheduler


def stage(name: str, inputs=(), outputs=(), token_budget: int | None = None, sm_footprint_mb: float = 0,
          kernel=None, grid=None, block=None, shared_mem_bytes: int = 0, args=(), depends_on=(),
          stream="compute", priority: int | None = None, gate=None, ring=None) -> StageContract:
    """Describe one stage of work.

    Parameters
    ----------
    name : unique within a graph; errors and barriers use it.
    inputs, outputs : tensors (or :class:`Placeholder` values) the stage reads and writes;
        they order it against the other stages of a graph.
    token_budget : the most tokens one submission may process (None: no limit); the engine
        splits larger work with :meth:`StageContract.split` (chunked prefill).
    sm_footprint_mb : the device working set in MiB; checked against what the device can
        still give at submission, and reported in the plan.
    kernel : a LaunchSpec; a Kernel with ``grid``, ``block``, ``args`` and
        ``shared_mem_bytes``; a callable run as ``kernel(*args)`` (given ``stream=`` when it
        takes one; on CUDA it runs at submission and may enqueue work, on the CPU backend it
        runs in stream order at the barrier); or None for a marker.
    depends_on : names (or stages) this stage runs after.
    stream : the stream role: compute, compute_high, h2d, d2h or control.
    priority : among stages ready at the same time, higher is submitted first (default 0).
    gate : a Doorbell, or ``(doorbell, value)``: the stream waits until the doorbell
        reaches the value (default: its next ring after submission).
    ring : a Doorbell the stream rings once the stage is done.
    """
    return make_stage(name, inputs=inputs, outputs=outputs, token_budget=token_budget,
                      sm_footprint_mb=sm_footprint_mb, kernel=kernel, grid=grid, block=block,
                      shared_mem_bytes=shared_mem_bytes, args=args, depends_on=depends_on,
                      stream=stream, priority=priority, gate=gate, ring=ring)


def placeholder(name: str, shape: tuple | None = None, dtype: str | None = None) -> Placeholder:
    """A value with no memory behind it, which some stage of the graph must produce."""
    return Placeholder(name, shape, dtype)


def graph(stages=(), name: str = "graph") -> TaskGraph:
    """A task graph of ``stages`` (more can be added with ``.add`` or ``.stage``)."""
    return TaskGraph(stages, name)


def current(what: str = "nrt.scheduler") -> Scheduler:
    """The running runtime's scheduler, created on first use (once, whichever threads ask)."""
    rt = _runtime.current(what)
    if rt.scheduler is None:
        with _CREATE:
            if rt.scheduler is None:
                rt.scheduler = Scheduler(rt)
    return rt.scheduler


def plan(stage_or_graph) -> Plan:
    """Validate against the running device and return the submission plan; submits nothing."""
    return current("nrt.scheduler.plan()").plan(stage_or_graph)


def submit(stage_or_graph) -> Plan:
    """Validate, then submit a stage, a list of stages or a TaskGraph; returns the plan.

    Raises ValueError naming the stage before anything is submitted when the graph is invalid.
    """
    return current("nrt.scheduler.submit()").submit(stage_or_graph)


def wait_barrier(name: str | None = None, timeout_ms: float | None = None) -> None:
    """Wait for stage ``name`` (its latest submission) or, with no name, for all submitted work.

    A stage that failed raises :class:`~nexusrt.errors.SchedulerError` naming it; so does a
    wait longer than ``timeout_ms`` (naming what is still running and any doorbell it waits on).
    ``timeout_ms=None`` is the default bound, 300 s (``NEXUSRT_WAIT_TIMEOUT_S`` changes it);
    ``math.inf`` waits without limit.
    """
    current("nrt.scheduler.wait_barrier()").wait_barrier(name, timeout_ms)


def capture(graph_or_stages, stream: str = "compute") -> CapturedGraph:
    """Validate and capture a graph once for replay (a CUDA graph; on the CPU backend, the plan).

    Returns a :class:`CapturedGraph` with ``replay(stream=None)``, ``update(stage, args=...)``
    and ``close()``.
    """
    sched = current("nrt.scheduler.capture()")
    sched.rt.streams[stream]  # unknown role -> ValueError listing the roles
    captured = CapturedGraph(sched, sched.plan(graph_or_stages), stream)
    with sched.lock:
        sched.captured.append(captured)
    return captured


__all__ = ["stage", "placeholder", "graph", "plan", "submit", "wait_barrier", "capture", "current",
           "StageContract", "Placeholder", "TaskGraph", "Plan", "PlanItem", "CapturedGraph", "Scheduler",
           "as_graph", "device_free_bytes"]
