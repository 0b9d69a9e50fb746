"""Choose the backend: CUDA when a driver and a device answer, else the NumPy CPU backend.

The probe never hangs and never lets a raw traceback out: on a machine without the
driver library ``cuda.bindings`` raises (``DynamicLibNotFoundError``) instead of
returning an error code, and we read that as "no driver".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import BackendUnavailable

BACKENDS = ("cpu", "cuda")


@dataclass(frozen=True)
class Probe:
    """What the driver probe found."""

    backend: str
    reason: str  # why this backend (for detect output and errors)
    device_count: int = 0


def probe_driver() -> tuple[bool, str, int]:
    """Return (usable, reason, device_count) for the CUDA driver on this machine."""
    try:
        from cuda.bindings import driver as cu
    except Exception as exc:  # bindings missing or broken
        return False, f"cuda.bindings not importable: {exc}", 0
    # Load kernels when their library loads, not at first use: a lazy load must wait for
    # the device to go idle, so it deadlocks behind a stream that waits on a doorbell
    # (seen on the H100: cuKernelGetFunction hung behind cuStreamWaitValue32).
    os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
    try:
        (err,) = cu.cuInit(0)
    except Exception as exc:  # no libcuda: the bindings raise instead of returning
        return False, f"no CUDA driver: {type(exc).__name__}", 0
    if int(err) != 0:
        return False, f"cuInit failed with CUresult {int(err)}", 0
    err, count = cu.cuDeviceGetCount()
    if int(err) != 0 or count == 0:
        return False, "the CUDA driver reports no device", 0
    return True, f"CUDA driver with {count} device(s)", int(count)


def choose_backend(requested: str | None = None) -> Probe:
    """Pick the backend from ``requested``, else ``NEXUSRT_BACKEND``, else by probing."""
    if requested is not None and not isinstance(requested, str):
        raise TypeError(f"backend must be one of {', '.join(map(repr, BACKENDS))} or None, "
                        f"got {type(requested).__name__} {requested!r}")
    # An explicit backend="" is a bad value, not "unset": only None falls back to the environment.
    source = "backend=" if requested is not None else "NEXUSRT_BACKEND"
    forced = requested if requested is not None else (os.environ.get("NEXUSRT_BACKEND") or None)
    if forced is not None:
        forced = forced.strip().lower()
        if forced not in BACKENDS:
            raise ValueError(
                f"unknown backend {forced!r} ({source}): choose one of {', '.join(BACKENDS)}"
            )
        if forced == "cpu":
            return Probe("cpu", "forced by NEXUSRT_BACKEND=cpu")
    ok, reason, count = probe_driver()
    if ok:
        return Probe("cuda", reason, count)
    if forced == "cuda":
        raise BackendUnavailable(f"the CUDA backend was requested but cannot start: {reason}")
    return Probe("cpu", reason)
