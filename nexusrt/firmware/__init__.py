"""The boot layer: ``init`` composes the driver, memory and kernel layers into one runtime.

The pieces it composes live below it: :mod:`nexusrt.driver` (checked driver calls, device
and profile, streams, events, doorbells), :mod:`nexusrt.memory` (the arena) and
:mod:`nexusrt.kernels` (the kernel cache). Their public types are re-exported here, the
public API's one entry (``nrt.firmware``).

>>> import nexusrt as nrt
>>> dev = nrt.firmware.init(profile="auto")   # CUDA when a GPU answers, else the CPU
>>> dev.profile.name, dev.backend
"""

from __future__ import annotations

from .. import runtime as _runtime
from ..errors import NexusRTError
from ..driver.device import Device
from ..driver.doorbell import Doorbell
from ..driver.profile import HardwareProfile, profile_names
from ..driver.streams import Event, Stream, StreamPool
from .boot import LOCK as BOOT_LOCK
from .boot import PHASES, check_args, shutdown, start


def init(profile: str = "auto", backend: str | None = None, device: int = 0,
         arena_bytes: int | None = None) -> Device:
    """Boot the runtime and return the :class:`Device`.

    Parameters
    ----------
    profile : ``"auto"`` reads the hardware off the device; a name (``h100``, ``a100``,
        ``h200``, ``l4``, ``t4``, ``p100``, ``cpu``) must match the device found.
    backend : ``"cuda"`` or ``"cpu"``; default from ``NEXUSRT_BACKEND``, else probed.
    device : CUDA device ordinal.
    arena_bytes : virtual range the memory arena reserves (default: the device memory).

    Calling ``init`` again while running returns the running device when the arguments agree
    with it (``profile="auto"`` and ``backend=None`` agree with anything); conflicting ones
    raise NexusRTError instead of being silently ignored: shut down first to boot differently.
    Threads calling ``init`` at once get one runtime between them. A wrong type raises
    TypeError and a bad value ValueError, naming the argument, before anything is probed.
    """
    device, arena_bytes = check_args(profile, backend, device, arena_bytes)
    # One lock from the check to the boot: threads calling init at once get one runtime, the
    # first to boot it; the others find it up and get it back as a second call would.
    with BOOT_LOCK:
        if _runtime.is_initialized():
            rt = _runtime.current()
            _check_same(rt, profile, backend, device, arena_bytes)
            return rt.device
        return start(profile, backend, device, arena_bytes).device  # checked above, the lock held


def _check_same(rt, profile, backend, device, arena_bytes) -> None:
    running = {"profile": rt.profile.name, "backend": rt.backend, "device": rt.device.ordinal,
               "arena_bytes": rt.boot_args.get("arena_bytes")}
    asked = {"profile": None if profile == "auto" else profile, "backend": backend, "device": device,
             "arena_bytes": arena_bytes}
    conflicts = [f"{k}={asked[k]!r} (running: {running[k]!r})" for k in asked
                 if asked[k] is not None and asked[k] != running[k]]
    if conflicts:
        raise NexusRTError("nrt.firmware.init() was called again with " + ", ".join(conflicts)
                           + "; the runtime is already up: call nrt.firmware.shutdown() first to boot differently")


def runtime():
    """The running :class:`~nexusrt.runtime.Runtime` (raises before init)."""
    return _runtime.current("nrt.firmware.runtime()")


def doorbell(name: str = "doorbell") -> Doorbell:
    """A new doorbell on the running device; released at shutdown."""
    rt = _runtime.current("nrt.firmware.doorbell()")
    bell = Doorbell(rt.backend, name)
    rt.closers.append(bell.close)
    return bell


def stream(role: str = "compute") -> Stream:
    """The pool's stream for ``role`` (compute, compute_high, h2d, d2h, control)."""
    return _runtime.current("nrt.firmware.stream()").streams[role]


def event(timing: bool = True) -> Event:
    """A new event on the running device."""
    return Event(_runtime.current("nrt.firmware.event()").backend, timing)


__all__ = ["init", "shutdown", "runtime", "doorbell", "stream", "event", "Device",
           "Doorbell", "Event", "Stream", "StreamPool", "HardwareProfile", "profile_names", "PHASES"]
