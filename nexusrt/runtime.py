"""The one explicit runtime context: the device, its profile, streams, arena and kernels.

``nrt.firmware.init()`` creates it and ``nrt.firmware.shutdown()`` tears it down; every
runtime API reaches it through :func:`current`, which raises a clear error before init.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import NotInitialized


@dataclass
class Runtime:
    backend: str  # "cuda" or "cpu"
    device: Any  # driver.device.Device
    profile: Any = None  # driver.profile.HardwareProfile
    streams: Any = None  # driver.streams.StreamPool
    arena: Any = None  # memory arena (CUDA VMM arena or the CPU arena)
    kernels: Any = None  # kernels.cache.KernelCache (CUDA only)
    scheduler: Any = None  # scheduler state (submissions, barriers)
    boot_s: dict[str, float] = field(default_factory=dict)
    probe_reason: str = ""
    closers: list = field(default_factory=list)  # extra resources to close at shutdown
    boot_args: dict = field(default_factory=dict)  # init() arguments re-init compares that the runtime cannot tell (arena_bytes)

    @property
    def is_cuda(self) -> bool:
        return self.backend == "cuda"


_current: Runtime | None = None


def current(what: str = "this call") -> Runtime:
    """The running runtime; raises :class:`NotInitialized` naming ``what`` before init."""
    if _current is None:
        raise NotInitialized(what)
    return _current


def is_initialized() -> bool:
    return _current is not None


def _set(rt: Runtime | None) -> None:
    global _current
    _current = rt
