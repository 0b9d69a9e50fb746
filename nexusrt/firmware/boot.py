"""Boot and shutdown in named, timed phases: the one place that composes the layers below.

driver probe -> context -> memory arena -> stream pool -> kernel cache -> ready.
A failure in any phase undoes the phases before it, so a failed boot leaks nothing.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from .. import runtime as runtime_mod
from ..driver.detect import choose_backend
from ..driver.device import Device
from ..driver.profile import resolve
from ..driver.streams import StreamPool
from ..errors import NexusRTError
from ..kernels.cache import KernelCache
from ..memory.arena import open_arena
from ..runtime import Runtime

PHASES = ("driver_probe", "context", "memory_arena", "stream_pool", "kernel_cache", "ready")


@contextmanager
def _phase(times: dict, name: str):
    t0 = time.perf_counter()
    yield
    times[name] = time.perf_counter() - t0


def boot(profile: str = "auto", backend: str | None = None, device: int = 0,
         arena_bytes: int | None = None) -> Runtime:
    """Bring up the runtime; see :func:`nexusrt.firmware.init`."""
    if not isinstance(profile, str):
        raise TypeError(f"profile must be a string such as 'auto' or 'h100', got {type(profile).__name__}")
    times: dict[str, float] = {}
    with _phase(times, "driver_probe"):
        probe = choose_backend(backend)
        dev = Device(probe.backend, device)
        measured = dev.measure_profile()
        prof = resolve(profile, measured)  # ProfileMismatch / ValueError before any resource
    rt = Runtime(backend=probe.backend, device=dev, profile=prof, boot_s=times,
                 probe_reason=probe.reason, boot_args={"arena_bytes": arena_bytes})
    try:
        with _phase(times, "context"):
            dev.open_context()
        with _phase(times, "memory_arena"):
            rt.arena = open_arena(rt, arena_bytes)
        with _phase(times, "stream_pool"):
            rt.streams = StreamPool(rt.backend)
        with _phase(times, "kernel_cache"):
            if rt.is_cuda:
                rt.kernels = KernelCache(prof.arch)
        with _phase(times, "ready"):
            dev.synchronize()
    except BaseException:
        _teardown(rt)
        raise
    dev.profile = prof
    dev.boot_s = times
    dev.runtime = rt
    runtime_mod._set(rt)
    return rt


def _teardown(rt: Runtime) -> None:
    """Release everything ``rt`` holds, newest first; keeps going past individual failures."""
    errors = []
    steps = [
        ("device sync", rt.device.synchronize),
        *[(f"closer {i}", c) for i, c in enumerate(reversed(rt.closers))],
        ("scheduler", getattr(rt.scheduler, "close", None)),
        ("kernels", getattr(rt.kernels, "close", None)),
        ("streams", getattr(rt.streams, "close", None)),
        ("arena", getattr(rt.arena, "close", None)),
        ("context", rt.device.close),
    ]
    for name, fn in steps:
        if fn is None:
            continue
        try:
            fn()
        except Exception as exc:  # keep releasing; report at the end
            errors.append(f"{name}: {exc}")
    rt.closers.clear()
    if errors:
        raise NexusRTError("shutdown could not release everything: " + "; ".join(errors))


def shutdown() -> None:
    """Release the runtime; safe to call twice or before init."""
    rt = runtime_mod._current
    if rt is None:
        return
    runtime_mod._set(None)
    _teardown(rt)
