"""Will the model fit? The bytes it needs against what the backend has, checked before loading.

The CPU runner keeps fp32 weights and an fp32 KV cache that grows up to ``max_context``; the
CUDA runner keeps bf16 weights and a bf16 paged KV cache for ``max_context`` tokens. Free
memory comes from the driver (``cuMemGetInfo``) on CUDA and from the kernel on the CPU
(``MemAvailable``, lowered by a cgroup limit or ``RLIMIT_AS`` when those are tighter).
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from ..errors import ModelTooLarge
from ..models.footprint import Footprint, gib, model_footprint

# (weight bytes per parameter, KV bytes per element) each runner uses.
_BYTES = {"cpu": (4, 4), "cuda": (2, 2)}


def runner_context(config, backend: str, max_context: int | None) -> int:
    """The context the runner of ``backend`` will size its KV cache for."""
    if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int)
                                    or max_context <= 0):
        raise ValueError(f"max_context must be a positive integer, got {max_context!r}")
    limit = config.max_position_embeddings
    if backend == "cuda":
        from ..backends.cuda.runner import DEFAULT_MAX_CONTEXT

        limit = min(limit, config.sliding_window or limit)
        return min(max_context or DEFAULT_MAX_CONTEXT, limit)
    return min(max_context or limit, limit)


def footprint(config, backend: str, max_context: int | None) -> Footprint:
    """What the runner of ``backend`` will hold for ``config`` (weights + KV at its context, and
    on CUDA the prefill's working buffers for its largest chunk)."""
    import dataclasses

    weight_bytes, kv_bytes = _BYTES[backend]
    context = runner_context(config, backend, max_context)
    fp = model_footprint(config, weight_bytes, kv_bytes, context)
    if backend == "cuda":
        from ..backends.cuda.buffers import working_bytes
        from ..backends.cuda.chunks import buckets_for

        fp = dataclasses.replace(fp, working=working_bytes(config, buckets_for(context)[-1]))
    return fp


def cpu_available() -> tuple[int, str]:
    """(bytes, where the figure came from) that a new allocation on this machine can still get."""
    figures = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                figures.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except (OSError, ValueError, IndexError):
        pass
    if not figures:
        figures.append((os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical pages"))
    try:  # a container's own limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            figures.append((max(0, int(limit) - used), "the cgroup memory limit"))
    except (OSError, ValueError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        figures.append((soft, "RLIMIT_AS"))
    return min(figures)


def cuda_available() -> tuple[int, str]:
    """Free device memory as the driver reports it, or the arena's room if that is less."""
    from .. import runtime
    from ..driver.calls import call
    from ..scheduler.state import device_free_bytes

    rt = runtime.current("the memory check")
    rt.device.make_current()
    free, _total = call("cuMemGetInfo")
    figures = [(int(free), "cuMemGetInfo")]
    arena, source = device_free_bytes(rt)
    if arena is not None and source.startswith("arena"):
        figures.append((arena, source))
    return min(figures)


def check_fit(config, backend: str, max_context: int | None, name: str,
              available: tuple[int, str] | None = None) -> Footprint:
    """Raise :class:`ModelTooLarge` (both numbers in the message) unless the model fits."""
    fp = footprint(config, backend, max_context)
    free, where = available or (cuda_available() if backend == "cuda" else cpu_available())
    if fp.total > free:
        hint = (" (lower it with max_context / --max-context)"
                if fp.kv > fp.total // 4 and fp.weights <= free else "")
        device = "the GPU" if backend == "cuda" else "this machine"
        working = f" + {gib(fp.working)} of prefill buffers" if fp.working else ""
        raise ModelTooLarge(
            f"{name} does not fit: it needs {gib(fp.total)} ({gib(fp.weights)} of weights + {gib(fp.kv)} of KV cache "
            f"at {fp.context} tokens{hint}{working}) but {device} has {gib(free)} available ({where})", fp.total, free)
    return fp
