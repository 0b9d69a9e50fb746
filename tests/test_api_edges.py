"""API edges: re-init with conflicting arguments, and blocking waits that end by default."""

from __future__ import annotations

import math
import time

import pytest

import nexusrt as nrt
from nexusrt.errors import NexusRTError, SchedulerError


def test_reinit_with_agreeing_arguments_returns_the_device(cpu_rt):
    assert nrt.firmware.init() is cpu_rt.device
    assert nrt.firmware.init(profile="cpu", backend="cpu", device=0) is cpu_rt.device


@pytest.mark.parametrize("kwargs, message", [
    ({"profile": "h100"}, "profile='h100' \\(running: 'cpu'\\)"),
    ({"backend": "cuda"}, "backend='cuda' \\(running: 'cpu'\\)"),
    ({"device": 1}, "device=1 \\(running: 0\\)"),
    ({"arena_bytes": 1 << 20}, "arena_bytes=1048576 \\(running: None\\)"),
])
def test_reinit_with_conflicting_arguments_is_an_error(cpu_rt, kwargs, message):
    with pytest.raises(NexusRTError, match=f"init\\(\\) was called again with {message}.*shutdown\\(\\) first"):
        nrt.firmware.init(**kwargs)
    assert nrt.firmware.runtime() is not None  # the running runtime is untouched


def test_wait_barrier_on_a_never_rung_doorbell_ends_by_default(cpu_rt, monkeypatch):
    monkeypatch.setenv("NEXUSRT_WAIT_TIMEOUT_S", "0.3")
    bell = nrt.firmware.doorbell("never")
    nrt.scheduler.submit(nrt.scheduler.stage(name="gated", gate=bell))
    t0 = time.perf_counter()
    with pytest.raises(SchedulerError, match="timed out after 300.0 ms waiting for everything submitted; still "
                                             "running: stage 'gated' .*doorbell 'never'"):
        nrt.scheduler.wait_barrier()  # no timeout given: the default bound applies
    assert time.perf_counter() - t0 < 5
    bell.ring()
    nrt.scheduler.wait_barrier(timeout_ms=math.inf)  # rung: returns; inf means no bound


def test_default_wait_bound_and_bad_settings(monkeypatch):
    from nexusrt.driver.waits import DEFAULT_TIMEOUT_S, deadline_ms, default_timeout_ms

    monkeypatch.delenv("NEXUSRT_WAIT_TIMEOUT_S", raising=False)
    assert default_timeout_ms() == DEFAULT_TIMEOUT_S * 1e3 and deadline_ms(None, 10.0) == 10.0 + DEFAULT_TIMEOUT_S
    assert deadline_ms(math.inf, 0.0) is None
    with pytest.raises(ValueError, match="timeout_ms must be non-negative"):
        deadline_ms(-1, 0.0)
    monkeypatch.setenv("NEXUSRT_WAIT_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="NEXUSRT_WAIT_TIMEOUT_S must be a positive number"):
        default_timeout_ms()


def test_doorbell_host_wait_ends_by_default(cpu_rt, monkeypatch):
    monkeypatch.setenv("NEXUSRT_WAIT_TIMEOUT_S", "0.2")
    bell = nrt.firmware.doorbell("lonely")
    with pytest.raises(SchedulerError, match="doorbell 'lonely' did not reach 1 within 200.0 ms"):
        bell.host_wait(1)
