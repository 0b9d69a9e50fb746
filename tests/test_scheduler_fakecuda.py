"""The CUDA engine and capture against a fake driver: which calls, in which order, on which stream.

The fake runs "device" work instantly (stream writes land at once) unless the stream is
capturing, and can fault: a launch whose first argument is 16 breaks the context, after
which every stream query fails, as the real driver's sticky errors do.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import pytest

from nexusrt.errors import SchedulerError
from nexusrt.driver import calls as driver
from nexusrt.driver.doorbell import Doorbell
from nexusrt.driver.streams import StreamPool
from nexusrt.kernels.launch import Kernel, parse_signature
from nexusrt.runtime import Runtime
from nexusrt.scheduler import CapturedGraph, Scheduler, stage

BAD_PTR = 16


class FakeCu:
    class CUresult:
        CUDA_ERROR_NOT_READY = 600

    class CUstreamWriteValue_flags:
        CU_STREAM_WRITE_VALUE_DEFAULT = 0

    class CUstreamWaitValue_flags:
        CU_STREAM_WAIT_VALUE_GEQ = 0

    class CUevent_flags:
        CU_EVENT_DEFAULT, CU_EVENT_DISABLE_TIMING = 0, 2

    class CUstream_flags:
        CU_STREAM_NON_BLOCKING = 1

    class CUstreamCaptureMode:
        CU_STREAM_CAPTURE_MODE_THREAD_LOCAL = 1

    class CUgraphNodeType:
        CU_GRAPH_NODE_TYPE_KERNEL = 0

    CU_MEMHOSTALLOC_DEVICEMAP, CU_MEMHOSTALLOC_PORTABLE = 2, 1

    def __init__(self):
        self.log, self.words, self.capturing, self.frontier = [], [], set(), {}
        self.capture_events, self.blocked = set(), set()
        self.faulted, self.n = False, 0

    def _new(self, kind):
        self.n += 1
        return f"{kind}{self.n}"

    def cuGetErrorName(self, e):
        return 0, b"CUDA_ERROR_ILLEGAL_ADDRESS"

    def cuGetErrorString(self, e):
        return 0, b"an illegal memory access was encountered"

    def cuCtxGetStreamPriorityRange(self):
        return 0, 0, -5

    def cuStreamCreateWithPriority(self, flags, prio):
        return 0, self._new("s")

    def cuMemHostAlloc(self, size, flags):
        word = ctypes.c_uint32(0)
        self.words.append(word)
        return 0, ctypes.addressof(word)

    def cuMemHostGetDevicePointer(self, ptr, flags):
        return 0, ptr

    def cuMemFreeHost(self, ptr):
        return (0,)

    def cuStreamWriteValue32(self, stream, addr, value, flags):
        self.log.append(("write", stream, value))
        if stream not in self.capturing and stream not in self.blocked and not self.faulted:
            ctypes.c_uint32.from_address(addr).value = value
        return (0,)

    def cuStreamWaitValue32(self, stream, addr, value, flags):
        self.log.append(("wait_value", stream, value))
        if ctypes.c_uint32.from_address(addr).value < value:
            self.blocked.add(stream)  # nothing after this on the stream "runs"
        return (0,)

    def cuEventCreate(self, flags):
        return 0, self._new("e")

    def cuEventRecord(self, ev, stream):
        self.log.append(("record", ev, stream))
        if stream in self.capturing:
            self.capture_events.add(ev)
        return (0,)

    def cuStreamWaitEvent(self, stream, ev, flags):
        self.log.append(("wait_event", stream, ev))
        if ev in self.capture_events:  # waiting on a captured event pulls the stream into the capture
            self.capturing.add(stream)
        return (0,)

    def cuEventDestroy(self, ev):
        return (0,)

    def cuLaunchKernel(self, fn, gx, gy, gz, bx, by, bz, shared, stream, args, extra):
        first = ctypes.c_uint64.from_address(ctypes.c_void_p.from_address(args).value).value
        self.log.append(("launch", stream, first))
        if stream in self.capturing:
            self.frontier[stream] = [self._new("node")]
        elif first == BAD_PTR:
            self.faulted = True
        return (0,)

    def _status(self):
        return (700,) if self.faulted else (0,)

    def cuStreamQuery(self, stream):
        return self._status()

    def cuStreamSynchronize(self, stream):
        return self._status()

    def cuStreamBeginCapture(self, stream, mode):
        self.capturing = {stream}
        self.log.append(("begin", stream))
        return (0,)

    def cuStreamGetCaptureInfo(self, stream):
        deps = self.frontier.get(stream, [])
        return 0, 1, 1, "graph", deps, [], len(deps)

    def cuStreamEndCapture(self, stream):
        self.capturing = set()
        self.log.append(("end", stream))
        return 0, "graph"

    def cuGraphInstantiate(self, graph, flags):
        return 0, "exec"

    def cuGraphLaunch(self, exec_, stream):
        self.log.append(("graph_launch", stream))
        return (0,)

    def cuGraphNodeGetType(self, node):
        return 0, 0

    def cuGraphKernelNodeGetParams(self, node):
        return 0, SimpleNamespace(kernelParams=0, gridDimX=1, gridDimY=1, gridDimZ=1, blockDimX=1,
                                  blockDimY=1, blockDimZ=1, sharedMemBytes=0)

    def cuGraphExecKernelNodeSetParams(self, exec_, node, params):
        self.log.append(("set_params", node, params))
        return (0,)

    def cuGraphExecDestroy(self, e):
        return (0,)

    def cuGraphDestroy(self, g):
        return (0,)


@pytest.fixture
def fake(monkeypatch):
    fake = FakeCu()
    monkeypatch.setattr(driver, "_cu", fake)
    rt = Runtime(backend="cuda", device=None, profile=SimpleNamespace(memory_bytes=80 << 30))
    rt.streams = StreamPool("cuda")
    fake.rt = rt
    fake.sched = Scheduler(rt)
    fake.kernel = _kernel()
    yield fake
    fake.sched.close()


def _kernel() -> Kernel:
    k = Kernel.__new__(Kernel)
    k.name, k.function, k.types = "axpy", "fn", parse_signature("ptr f32")
    return k


def _h(fake, role):
    return fake.rt.streams[role].handle


def test_cross_stream_edge_is_an_event_and_progress_is_written(fake):
    k = fake.kernel
    t = SimpleNamespace(ptr=4096, nbytes=64, shape=(16,), dtype="f32", device="cuda:0")
    fake.sched.submit([stage("up", outputs=[t], kernel=k, grid=1, block=32, args=(111, 1.0), stream="h2d"),
                       stage("use", inputs=[t], kernel=k, grid=1, block=32, args=(222, 1.0))])
    h2d, comp = _h(fake, "h2d"), _h(fake, "compute")
    kinds = [(e[0], e[1]) for e in fake.log]
    ev = next(e[1] for e in fake.log if e[0] == "record")
    assert kinds.index(("launch", h2d)) < kinds.index(("record", ev)) < kinds.index(("wait_event", comp)) \
        < kinds.index(("launch", comp))
    assert ("write", h2d, 1) in fake.log and ("write", comp, 1) in fake.log
    fake.sched.wait_barrier("use", timeout_ms=100)
    fake.sched.wait_barrier()
    assert fake.sched.pending() == 0


def test_gate_resolves_before_the_ring_of_the_same_submission(fake):
    bell = Doorbell("cuda", "b")
    fake.sched.submit([stage("producer", ring=bell, stream="h2d"), stage("consumer", gate=bell, priority=-1)])
    assert ("wait_value", _h(fake, "compute"), 1) in fake.log  # not 2: the ring came first in order
    bell.close()


def test_capture_maps_nodes_replays_once_and_updates(fake):
    k = fake.kernel
    t = SimpleNamespace(ptr=8192, nbytes=64, shape=(16,), dtype="f32", device="cuda:0")
    g = [stage("a", outputs=[t], kernel=k, grid=1, block=32, args=(1, 2.0)),
         stage("b", inputs=[t], kernel=k, grid=1, block=32, args=(2, 2.0), stream="compute_high"),
         stage("m")]
    cap = CapturedGraph(fake.sched, fake.sched.plan(g), "compute")
    assert set(cap.nodes) == {"a", "b"} and cap.nodes["a"] != cap.nodes["b"]
    names = [e[0] for e in fake.log]
    assert names[0] == "begin" and names[-1] == "end" and "write" not in names  # no progress in graphs
    fake.log.clear()
    cap.replay()
    assert fake.log == [("graph_launch", _h(fake, "compute"))]
    cap.update("b", args=(99, 0.5), grid=(4, 2))
    _, node, params = fake.log[-1]
    assert node == cap.nodes["b"][0] and (params.gridDimX, params.gridDimY) == (4, 2)
    assert ctypes.c_uint64.from_address(ctypes.c_void_p.from_address(params.kernelParams).value).value == 99
    cap.close()


def test_fault_names_the_first_unfinished_stage(fake):
    k = fake.kernel
    fake.sched.submit([stage("ok", kernel=k, grid=1, block=32, args=(5, 1.0)),
                       stage("bad", kernel=k, grid=1, block=32, args=(BAD_PTR, 1.0), depends_on=["ok"]),
                       stage("after", kernel=k, grid=1, block=32, args=(6, 1.0), depends_on=["bad"])])
    with pytest.raises(SchedulerError) as info:
        fake.sched.wait_barrier(timeout_ms=1000)
    msg = str(info.value)
    assert "stage 'bad' on stream 'compute' failed" in msg and "CUDA_ERROR_ILLEGAL_ADDRESS" in msg
    assert info.value.stage == "bad"
    fake.faulted = False  # let the fixture's teardown run


def test_timeout_names_the_gated_stage(fake):
    bell = Doorbell("cuda", "never")
    fake.cuStreamQuery = lambda stream: (600,) if stream in fake.blocked else (0,)
    fake.sched.submit(stage("waiting", gate=bell))
    with pytest.raises(SchedulerError, match="timed out after 5 ms.*'waiting'.*doorbell 'never'"):
        fake.sched.wait_barrier(timeout_ms=5)
    with pytest.raises(SchedulerError, match="waits for 1, it is at 0"):
        fake.sched.wait_barrier("waiting", timeout_ms=5)
    bell.close()
