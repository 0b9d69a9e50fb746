"""The scheduler on a real GPU: cross-stream ordering, doorbell gates, capture and replay, faults."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import nexusrt as nrt
from nexusrt.errors import SchedulerError

pytestmark = pytest.mark.gpu

N = 1 << 22  # 16 MiB of floats: a saxpy long enough for an unordered reader to see it half done


def _saxpy(rt):
    return rt.kernels.get("selftest", "saxpy", "ptr ptr f32 i32")


def _grid(n):
    return ((n + 255) // 256, 1, 1)


def _integers(seed, n=N):
    # Small integers: every sum below is exact in float32, so results compare with ==.
    return np.random.default_rng(seed).integers(-8, 9, n).astype(np.float32)


def _setup(rt, seed):
    """The saxpy kernel, random integers on the host, and x (those values), y, z (zeros) on the device."""
    xh = _integers(seed)
    return _saxpy(rt), xh, nrt.memory.from_numpy(xh), nrt.memory.zeros((N,), "fp32"), nrt.memory.zeros((N,), "fp32")


def _repeat_saxpy(k, y, x, a, times):
    """A host stage that enqueues ``times`` saxpys on its stream (a long producer)."""
    pack = k.pack(y, x, a, N)

    def launch(stream):
        for _ in range(times):
            k.launch(_grid(N), (256, 1, 1), pack, stream)

    return launch


def test_announcement_example_verbatim_on_cuda(gpu_rt):
    dev = nrt.firmware.init(profile="auto")
    buf = nrt.memory.alloc(shape=(4096, 4096), dtype="bf16", ilc=True)
    stage = nrt.scheduler.stage(name="infer.transformer_block_0", inputs=[buf], outputs=[],
                                token_budget=4096, sm_footprint_mb=64)
    nrt.scheduler.submit(stage)
    nrt.scheduler.wait_barrier()
    assert dev.backend == "cuda" and gpu_rt.scheduler.pending() == 0
    assert gpu_rt.scheduler.engine.completed("compute") == 1


def test_tensor_dependency_orders_streams_with_events(gpu_rt):
    k, xh, x, y, z = _setup(gpu_rt, 1)
    plan = nrt.scheduler.submit([
        nrt.scheduler.stage("produce", inputs=[x], outputs=[y], stream="h2d",
                            kernel=_repeat_saxpy(k, y, x, 1.0, 20)),
        nrt.scheduler.stage("consume", inputs=[y], outputs=[z], kernel=k, grid=_grid(N), block=256,
                            args=(z, y, 1.0, N)),
    ])
    assert plan.items[1].cross == [0]
    nrt.scheduler.wait_barrier("consume", timeout_ms=10_000)
    np.testing.assert_array_equal(z.to_numpy(), 20 * xh)


def test_doorbell_gated_stage_waits_for_the_host(gpu_rt):
    k, xh, x, y, _ = _setup(gpu_rt, 2)
    bell = nrt.firmware.doorbell("go")
    nrt.scheduler.submit(nrt.scheduler.stage("gated", inputs=[x], outputs=[y], kernel=k, grid=_grid(N),
                                             block=256, args=(y, x, 3.0, N), gate=bell))
    seq = gpu_rt.scheduler.last["gated"][1]
    try:
        with pytest.raises(SchedulerError, match="timed out.*'gated'.*doorbell 'go'.*waits for 1, it is at 0"):
            nrt.scheduler.wait_barrier(timeout_ms=50)
        assert gpu_rt.scheduler.engine.completed("compute") < seq
    finally:
        bell.ring()  # never leave a stream blocked: shutdown synchronises the device
    nrt.scheduler.wait_barrier(timeout_ms=10_000)
    np.testing.assert_array_equal(y.to_numpy(), 3 * xh)


def test_gate_rung_by_another_stream(gpu_rt):
    k, xh, x, y, z = _setup(gpu_rt, 3)
    bell = nrt.firmware.doorbell("handoff")
    # No tensor or name links the two: only the doorbell orders consumer after producer.
    nrt.scheduler.submit([
        nrt.scheduler.stage("consumer", kernel=k, grid=_grid(N), block=256, args=(z, y, 1.0, N), gate=bell),
        nrt.scheduler.stage("producer", stream="h2d", ring=bell, kernel=_repeat_saxpy(k, y, x, 1.0, 10)),
    ])
    nrt.scheduler.wait_barrier(timeout_ms=10_000)
    assert bell.value == 1
    np.testing.assert_array_equal(z.to_numpy(), 10 * xh)


def test_capture_replay_and_update_parameters(gpu_rt):
    k, xh, x, y, z = _setup(gpu_rt, 4)
    g = nrt.scheduler.graph(name="step")
    g.stage("scale", inputs=[x, y], outputs=[y], kernel=k, grid=_grid(N), block=256, args=(y, x, 2.0, N))
    g.stage("accumulate", inputs=[y, z], outputs=[z], kernel=k, grid=_grid(N), block=256,
            args=(z, y, 1.0, N), stream="compute_high")
    g.stage("done")  # a marker: captured as nothing, still part of the plan
    cap = nrt.scheduler.capture(g)
    assert set(cap.nodes) == {"scale", "accumulate"} and all(len(v) == 1 for v in cap.nodes.values())
    cap.replay()
    nrt.scheduler.wait_barrier(timeout_ms=10_000)
    np.testing.assert_array_equal(y.to_numpy(), 2 * xh)
    np.testing.assert_array_equal(z.to_numpy(), 2 * xh)
    cap.replay()
    nrt.scheduler.wait_barrier(timeout_ms=10_000)
    np.testing.assert_array_equal(z.to_numpy(), 6 * xh)  # y = 4x, z = 2x + 4x
    cap.update("scale", args=(y, x, -1.0, N))
    cap.replay()
    nrt.scheduler.wait_barrier(timeout_ms=10_000)
    np.testing.assert_array_equal(y.to_numpy(), 3 * xh)
    np.testing.assert_array_equal(z.to_numpy(), 9 * xh)
    with pytest.raises(ValueError, match="'done' did not capture exactly one kernel"):
        cap.update("done", args=())
    cap.close()


_FAULT = textwrap.dedent("""
    import nexusrt as nrt
    from nexusrt.errors import SchedulerError
    nrt.firmware.init(backend="cuda")
    rt = nrt.firmware.runtime()
    k = rt.kernels.get("selftest", "saxpy", "ptr ptr f32 i32")
    x = nrt.memory.zeros((1 << 20,), "fp32")
    y = nrt.memory.zeros((1 << 20,), "fp32")
    nrt.scheduler.submit([
        nrt.scheduler.stage("ok", kernel=k, grid=4096, block=256, args=(y, x, 1.0, 1 << 20)),
        nrt.scheduler.stage("bad", kernel=k, grid=4096, block=256, args=(16, x, 1.0, 1 << 20), depends_on=["ok"]),
    ])
    try:
        nrt.scheduler.wait_barrier(timeout_ms=20000)
        print("NO ERROR")
    except SchedulerError as e:
        print("STAGE", e.stage)
        print("MESSAGE", e)
    import os
    os._exit(0)  # the context is broken: skip a shutdown that would only report it again
""")


def test_failing_kernel_is_reported_at_the_barrier_naming_the_stage():
    # A fault breaks the CUDA context for the whole process: run it in a child.
    env = dict(os.environ, NEXUSRT_BACKEND="cuda")
    out = subprocess.run([sys.executable, "-c", _FAULT], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "STAGE bad" in out.stdout, out.stdout + out.stderr
    assert "stage 'bad' on stream 'compute' failed" in out.stdout
    assert "CUDA_ERROR_ILLEGAL_ADDRESS" in out.stdout
