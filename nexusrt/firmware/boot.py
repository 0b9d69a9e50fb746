"""Boot and shutdown in named, timed phases: the one place that composes the layers below.

driver probe -> context -> memory arena -> stream pool -> kernel cache -> ready.
A failure in any phase undoes the phases before it, so a failed boot leaks nothing.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import numpy as np

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

# Held from "is a runtime up?" to "this one is": without it, threads calling init at once
# each boot one, the last overwrites the others, and those are never shut down or audited.
# Reentrant so that init can hold it around boot (and a closer may call shutdown).
LOCK = threading.RLock()

# The largest arena range we describe: byte offsets are signed 64-bit (as in memory.dtypes).
MAX_ARENA_BYTES = 2**63 - 1


def check_args(profile, backend, device, arena_bytes) -> tuple[int, int | None]:
    """Refuse a wrong type or value before anything is probed or compared; returns ``device`` and
    ``arena_bytes`` as plain ints (NumPy integers are fine, bools are not)."""
    if not isinstance(profile, str):
        raise TypeError(f"profile must be a string such as 'auto' or 'h100', got {type(profile).__name__}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be 'cpu', 'cuda' or None, got {type(backend).__name__} {backend!r}")
    if isinstance(device, bool) or not isinstance(device, (int, np.integer)):
        raise TypeError(f"device must be a device ordinal (int), got {type(device).__name__} {device!r}")
    if device < 0:
        raise ValueError(f"device must be >= 0 (a device ordinal), got {device}")
    if arena_bytes is not None:
        if isinstance(arena_bytes, bool) or not isinstance(arena_bytes, (int, np.integer)):
            raise TypeError(f"arena_bytes must be a positive int (bytes) or None, "
                            f"got {type(arena_bytes).__name__} {arena_bytes!r}")
        if not 0 < arena_bytes <= MAX_ARENA_BYTES:
            raise ValueError(f"arena_bytes must be a positive int (bytes) of at most 2**63-1, got {arena_bytes!r}")
        arena_bytes = int(arena_bytes)
    return int(device), arena_bytes


@contextmanager
def _phase(times: dict, name: str):
    t0 = time.perf_counter()
    yield
    times[name] = time.perf_counter() - t0


def boot(profile: str = "auto", backend: str | None = None, device: int = 0,
         arena_bytes: int | None = None) -> Runtime:
    """Bring up the runtime; see :func:`nexusrt.firmware.init` (which returns a running one)."""
    device, arena_bytes = check_args(profile, backend, device, arena_bytes)
    with LOCK:
        if runtime_mod.is_initialized():
            # A second runtime would replace the first, which then is never shut down.
            raise NexusRTError("boot(): a runtime is already up: use nrt.firmware.init() to get it, "
                               "or nrt.firmware.shutdown() first")
        return start(profile, backend, device, arena_bytes)


def start(profile: str, backend: str | None, device: int, arena_bytes: int | None) -> Runtime:
    """:func:`boot`'s phases, for a caller that checked the arguments (:func:`check_args`) and
    holds :data:`LOCK` with no runtime up (``nrt.firmware.init``)."""
    times: dict[str, float] = {}
    with _phase(times, "driver_probe"):
        probe = choose_backend(backend)
        _check_ordinal(probe, device)
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


def _check_ordinal(probe, device: int) -> None:
    """Refuse a device the backend does not have, before any driver call is made with it."""
    count = probe.device_count if probe.backend == "cuda" else 1  # the CPU backend is device 0
    if device >= count:
        raise ValueError(f"device={device} does not exist: the {probe.backend} backend has {count} "
                         f"device(s), numbered from 0")


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
    """Release the runtime; safe to call twice or before init (and from several threads)."""
    with LOCK:
        rt = runtime_mod._current
        if rt is None:
            return
        runtime_mod._set(None)
        _teardown(rt)
