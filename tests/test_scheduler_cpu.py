"""Submission, ordering, barriers, doorbells, errors and capture on the CPU backend."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import nexusrt as nrt
from nexusrt.errors import NotInitialized, SchedulerError
from nexusrt.scheduler import Placeholder, stage

RNG = np.random.default_rng(7)


def test_announcement_example_verbatim(cpu_rt):
    import nexusrt as nrt2

    dev = nrt2.firmware.init(profile="auto")
    buf = nrt2.memory.alloc(shape=(4096, 4096), dtype="bf16", ilc=True)
    stage_ = nrt2.scheduler.stage(name="infer.transformer_block_0", inputs=[buf], outputs=[],
                                  token_budget=4096, sm_footprint_mb=64)
    nrt2.scheduler.submit(stage_)
    nrt2.scheduler.wait_barrier()
    assert dev.backend == "cpu"
    assert cpu_rt.scheduler.pending() == 0
    assert cpu_rt.scheduler.last["infer.transformer_block_0"] == ("compute", 1)


def test_example_shape_with_a_local_tensor(cpu_rt):
    buf = np.zeros((64, 64), dtype=np.float32)
    s = nrt.scheduler.stage(name="infer.transformer_block_0", inputs=[buf], outputs=[],
                            token_budget=4096, sm_footprint_mb=64)
    plan = nrt.scheduler.submit(s)
    assert plan.order == ["infer.transformer_block_0"]
    assert cpu_rt.scheduler.pending() == 1
    nrt.scheduler.wait_barrier()
    assert cpu_rt.scheduler.pending() == 0


def test_before_init_is_a_clear_error():
    nrt.firmware.shutdown()
    with pytest.raises(NotInitialized, match="nrt.scheduler.submit"):
        nrt.scheduler.submit(stage("x"))


def test_numpy_pipeline_across_streams_matches_reference(cpu_rt):
    x = RNG.standard_normal((16, 32)).astype(np.float32)
    w = RNG.standard_normal((32, 8)).astype(np.float32)
    staged = np.empty_like(x)
    h = np.empty((16, 8), dtype=np.float32)
    out = np.empty((16, 8), dtype=np.float32)
    log = []

    def copy(src, dst):
        log.append("upload")
        np.copyto(dst, src)

    def matmul(a, b, dst):
        log.append("matmul")
        np.matmul(a, b, out=dst)

    def relu(src, dst):
        log.append("relu")
        np.maximum(src, 0, out=dst)

    g = nrt.scheduler.graph(name="mlp")
    # Priorities cannot overtake the tensors: relu still waits for matmul, matmul for upload.
    g.stage("upload", inputs=[x], outputs=[staged], kernel=copy, args=(x, staged), stream="h2d")
    g.stage("matmul", inputs=[staged, w], outputs=[h], kernel=matmul, args=(staged, w, h), priority=1)
    g.stage("relu", inputs=[h], outputs=[out], kernel=relu, args=(h, out), priority=2)
    plan = nrt.scheduler.submit(g)
    assert plan.order == ["upload", "matmul", "relu"]
    assert log == []  # submission queues; the barrier runs
    nrt.scheduler.wait_barrier()
    assert log == ["upload", "matmul", "relu"]
    np.testing.assert_allclose(out, np.maximum(x @ w, 0), rtol=1e-5, atol=1e-5)


def test_named_barrier_runs_only_what_the_stage_needs(cpu_rt):
    log = []
    a = stage("a", kernel=log.append, args=("a",))
    b = stage("b", kernel=log.append, args=("b",), stream="d2h")
    c = stage("c", kernel=log.append, args=("c",), depends_on=["a"])
    nrt.scheduler.submit([a, b, c])
    nrt.scheduler.wait_barrier("a")
    assert log == ["a"]
    nrt.scheduler.wait_barrier("c")
    assert log == ["a", "c"]
    nrt.scheduler.wait_barrier()
    assert log == ["a", "c", "b"]


def test_dependency_on_a_stage_submitted_earlier(cpu_rt):
    log = []
    nrt.scheduler.submit(stage("load", kernel=log.append, args=("load",), stream="h2d"))
    nrt.scheduler.submit(stage("use", kernel=log.append, args=("use",), depends_on=["load"], priority=5))
    nrt.scheduler.wait_barrier("use")
    assert log == ["load", "use"]
    with pytest.raises(ValueError, match="'orphan' depends on 'never'"):
        nrt.scheduler.submit(stage("orphan", depends_on=["never"]))


def test_invalid_graph_submits_nothing(cpu_rt):
    ran = []
    g = nrt.scheduler.graph([stage("ok", kernel=ran.append, args=(1,)),
                             stage("bad", inputs=[Placeholder("kv")], kernel=ran.append, args=(2,))])
    with pytest.raises(ValueError, match="'bad' reads placeholder 'kv'"):
        nrt.scheduler.submit(g)
    nrt.scheduler.wait_barrier()
    assert ran == [] and cpu_rt.scheduler.pending() == 0


def test_footprint_checked_against_the_device(cpu_rt):
    free = nrt.scheduler.plan(stage("probe")).free_bytes
    assert free and free > 0
    too_big = free / (1 << 20) * 2
    with pytest.raises(ValueError, match="'huge': sm_footprint_mb=.*more than the"):
        nrt.scheduler.submit(stage("huge", sm_footprint_mb=too_big))
    assert "largest footprint 64 MiB" in nrt.scheduler.plan(stage("fits", sm_footprint_mb=64)).describe()


def test_callable_gets_its_stream(cpu_rt):
    seen = []
    nrt.scheduler.submit(stage("s", kernel=lambda stream: seen.append(stream.role), stream="control"))
    nrt.scheduler.wait_barrier()
    assert seen == ["control"]


def test_doorbell_gate_times_out_then_runs_after_the_host_rings(cpu_rt):
    bell = nrt.firmware.doorbell("go")
    log = []
    nrt.scheduler.submit(stage("gated", kernel=log.append, args=("gated",), gate=bell))
    with pytest.raises(SchedulerError) as info:
        nrt.scheduler.wait_barrier(timeout_ms=20)
    msg = str(info.value)
    assert "timed out after 20 ms" in msg and "'gated'" in msg and "doorbell 'go'" in msg
    assert "waits for 1, it is at 0" in msg and info.value.stage == "gated"
    assert log == []
    bell.ring()
    nrt.scheduler.wait_barrier(timeout_ms=1000)
    assert log == ["gated"]


def test_gate_rung_by_another_stream_and_by_another_thread(cpu_rt):
    bell = nrt.firmware.doorbell("handoff")
    log = []
    # The waiter is listed (and submitted) first; the stage that rings runs on another stream.
    nrt.scheduler.submit([stage("consumer", kernel=log.append, args=("consumer",), gate=bell),
                          stage("producer", kernel=log.append, args=("producer",), stream="h2d", ring=bell)])
    nrt.scheduler.wait_barrier(timeout_ms=1000)
    assert log == ["producer", "consumer"] and bell.value == 1

    later = threading.Timer(0.02, bell.ring)
    nrt.scheduler.submit(stage("threaded", kernel=log.append, args=("threaded",), gate=bell))
    later.start()
    nrt.scheduler.wait_barrier("threaded", timeout_ms=5000)
    later.join()
    assert log[-1] == "threaded"


def test_failing_callable_is_reported_at_the_barrier(cpu_rt):
    log = []

    def boom():
        raise FloatingPointError("NaN in the logits")

    nrt.scheduler.submit([stage("fine", kernel=log.append, args=("fine",)),
                          stage("lm_head", kernel=boom, depends_on=["fine"]),
                          stage("sample", kernel=log.append, args=("sample",), depends_on=["lm_head"])])
    with pytest.raises(SchedulerError) as info:
        nrt.scheduler.wait_barrier()
    msg = str(info.value)
    assert "stage 'lm_head' failed" in msg and "NaN in the logits" in msg and "'sample'" not in log
    assert "1 queued stage(s) dropped: sample" in msg
    assert isinstance(info.value.__cause__, FloatingPointError) and info.value.stage == "lm_head"
    # The scheduler stays usable.
    nrt.scheduler.submit(stage("again", kernel=log.append, args=("again",)))
    nrt.scheduler.wait_barrier()
    assert log == ["fine", "again"]


def test_barrier_argument_errors(cpu_rt):
    with pytest.raises(ValueError, match="no stage named 'nope'"):
        nrt.scheduler.wait_barrier("nope")
    with pytest.raises(ValueError, match="timeout_ms"):
        nrt.scheduler.wait_barrier(timeout_ms=-1)


def test_capture_replay_and_update_on_cpu(cpu_rt):
    x = RNG.standard_normal(32).astype(np.float32)
    y = np.zeros_like(x)

    def axpy(a, src, dst):
        dst += a * src

    g = nrt.scheduler.graph([stage("axpy", inputs=[x, y], outputs=[y], kernel=axpy, args=(2.0, x, y))])
    cap = nrt.scheduler.capture(g)
    cap.replay()
    cap.replay()
    nrt.scheduler.wait_barrier()
    np.testing.assert_allclose(y, 4.0 * x, rtol=1e-6)
    cap.update("axpy", args=(-0.5, x, y))
    cap.replay()
    nrt.scheduler.wait_barrier()
    np.testing.assert_allclose(y, 3.5 * x, rtol=1e-6)
    with pytest.raises(ValueError, match="'missing' is not in captured graph"):
        cap.update("missing", args=())
    cap.close()
    with pytest.raises(ValueError, match="closed"):
        cap.replay()


def test_shutdown_closes_the_scheduler(cpu_rt):
    nrt.scheduler.submit(stage("left_behind"))
    sched = cpu_rt.scheduler
    nrt.firmware.shutdown()
    assert sched.last == {} and sched.pending() == 0
    nrt.firmware.init(backend="cpu")
    assert nrt.firmware.runtime().scheduler is None  # a fresh runtime starts clean
