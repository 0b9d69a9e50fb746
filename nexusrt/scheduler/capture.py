"""Capture a graph of stages once into a CUDA graph, replay it, patch kernel arguments.

Capture runs the ordinary submission path under stream capture on the origin stream: the
other streams the plan uses are forked from it with an event and joined back at the end,
so cross-stream events, doorbell waits and rings become graph edges and memory-op nodes.
After each stage that launches work, the capturing stream's dependency frontier
(``cuStreamGetCaptureInfo``) is exactly the node the stage added; that is how
:meth:`CapturedGraph.update` finds the node to patch with ``cuGraphExecKernelNodeSetParams``.

Replay is one ``cuGraphLaunch``. Captured kernel nodes hold a copy of the argument values
from capture time: change them with ``update``, not by editing the stage's ArgPack.
Doorbell gates are captured with the value they had at capture time.
On the CPU backend a "captured" graph is its validated plan, queued again on each replay.
"""

from __future__ import annotations

from ..driver.calls import call, check, cu
from ..driver.streams import Event, Stream
from .contract import dim3


class CapturedGraph:
    """A validated plan captured for replay; see :func:`nexusrt.scheduler.capture`."""

    def __init__(self, sched, plan, stream: str):
        self.sched, self.plan, self.stream = sched, plan, stream
        self.stages = {it.name: it.stage for it in plan.items}
        self.nodes: dict[str, list] = {}
        self._graph = self._exec = None
        self._handle = None
        self._launch = None
        self._packs: dict[str, object] = {}  # keep patched ArgPacks alive with the graph
        self._cpu_args: dict[str, tuple] = {}
        if sched.rt.is_cuda:
            self._capture()

    # -- capture ------------------------------------------------------------------------------
    def _capture(self) -> None:
        rt, drv = self.sched.rt, cu()
        origin = rt.streams[self.stream]
        gates = {it.index: self.sched.gate_value(it.stage) for it in self.plan.items if it.stage.gate is not None}
        others = [rt.streams[r] for r in self.plan.streams if r != self.stream]
        engine, events = self.sched.engine, {}
        # Create every event before capture starts: only stream work belongs inside it.
        fork = Event("cuda", timing=False)
        joins = [Event("cuda", timing=False) for _ in others]
        engine.reserve_events(sum(it.signals for it in self.plan.items))
        call("cuStreamBeginCapture", origin.handle, drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        try:
            fork.record(origin)
            for s in others:
                fork.wait_by(s)
            for item in self.plan.items:
                stream = rt.streams.get(item.stage.stream)
                engine.run_stage(item, stream, events, gates.get(item.index), self.sched.last)
                if item.stage.kind != "marker":
                    self.nodes[item.name] = _frontier(stream)
            for s, join in zip(others, joins):
                join.record(s).wait_by(origin)
        except BaseException:
            try:  # leave the stream usable: end the broken capture and drop what it made
                graph = call("cuStreamEndCapture", origin.handle)
                if graph is not None and int(graph):
                    call("cuGraphDestroy", graph)
            except Exception:  # the original error is the one to report
                pass
            raise
        finally:
            engine.release(events)
        self._graph = call("cuStreamEndCapture", origin.handle)
        for ev in (fork, *joins):
            ev.destroy()
        try:
            self._exec = call("cuGraphInstantiate", self._graph, 0)
        except BaseException:
            call("cuGraphDestroy", self._graph)
            self._graph = None
            raise
        # The hot path: resolved once here so replay is one driver call and a check.
        self._handle = origin.handle
        self._launch = drv.cuGraphLaunch

    # -- use ----------------------------------------------------------------------------------
    def replay(self, stream=None) -> None:
        """Launch the whole graph once (on the capture stream unless ``stream`` is given)."""
        if self._launch is not None:
            handle = self._handle if stream is None else self._stream(stream).handle
            check(self._launch(self._exec, handle), "cuGraphLaunch")
            return
        if self.sched is None:
            raise ValueError("this captured graph was closed")
        if stream is not None:
            # The CPU replay queues the plan on its stages' own streams, but a bad role is
            # still refused here, so code tested on the CPU does not fail first on a GPU.
            self._stream(stream)
        self.sched.enqueue(self.plan, self._cpu_args)

    def _stream(self, stream) -> Stream:
        if not isinstance(stream, (str, Stream)):
            raise TypeError(f"stream must be a role name or a Stream, got {type(stream).__name__} {stream!r}")
        return self.sched.rt.streams.get(stream)  # an unknown role: ValueError listing the roles

    def update(self, stage_name: str, args=None, grid=None, block=None, shared: int | None = None) -> None:
        """Change a captured kernel stage's arguments (and grid/block/shared) without re-capturing.

        ``args`` is a tuple of values for the stage's kernel or a prebuilt ArgPack.
        """
        if self.sched is None:
            raise ValueError("this captured graph was closed")
        stage = self.stages.get(stage_name)
        if stage is None:
            raise ValueError(f"stage {stage_name!r} is not in captured graph {self.plan.graph!r}; "
                             f"its stages are {', '.join(self.stages)}")
        if not self.sched.rt.is_cuda:
            if stage.kind != "host" or grid is not None or block is not None:
                raise ValueError(f"stage {stage_name!r}: on the CPU backend only a callable's args can change")
            if args is not None:
                self._cpu_args[stage_name] = tuple(args)
            return
        nodes = self.nodes.get(stage_name, [])
        if len(nodes) != 1 or int(call("cuGraphNodeGetType", nodes[0])) != int(cu().CUgraphNodeType.CU_GRAPH_NODE_TYPE_KERNEL):
            raise ValueError(f"stage {stage_name!r} did not capture exactly one kernel node; "
                             "only single-kernel stages can be updated")
        params = call("cuGraphKernelNodeGetParams", nodes[0])
        if args is not None:
            if hasattr(args, "address"):
                pack = args
            elif stage.kind == "launch":
                pack = stage.kernel.kernel.pack(*args)
            else:
                raise ValueError(f"stage {stage_name!r} runs a callable: pass its kernel's ArgPack as args")
            self._packs[stage_name] = pack
            params.kernelParams = pack.address
        if grid is not None:
            params.gridDimX, params.gridDimY, params.gridDimZ = dim3(grid)
        if block is not None:
            params.blockDimX, params.blockDimY, params.blockDimZ = dim3(block)
        if shared is not None:
            params.sharedMemBytes = int(shared)
        call("cuGraphExecKernelNodeSetParams", self._exec, nodes[0], params)

    def close(self) -> None:
        """Destroy the executable graph and the graph; safe to call twice."""
        if self._exec is not None:
            call("cuGraphExecDestroy", self._exec)
            self._exec = None
        if self._graph is not None:
            call("cuGraphDestroy", self._graph)
            self._graph = None
        self._launch = None
        if self.sched is not None and self in self.sched.captured:
            self.sched.captured.remove(self)
        self.sched = None

    def __repr__(self) -> str:
        return f"CapturedGraph({self.plan.graph!r}, {len(self.plan.items)} stages, stream={self.stream!r})"


def _frontier(stream) -> list:
    """The nodes the next captured operation on ``stream`` would depend on."""
    _status, _id, _graph, deps, _edges, n = call("cuStreamGetCaptureInfo", stream.handle)
    return list(deps)[: int(n)]
