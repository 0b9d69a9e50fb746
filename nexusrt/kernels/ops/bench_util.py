"""Inputs for ``bench_cases``: random device buffers, and rotation past the L2.

A kernel timed on the same weights over and over reads them from the 50 MB L2, not from
DRAM, and looks faster than it is in a real decode step. :func:`random_weights` therefore
makes enough copies that they span several L2 sizes, and :func:`rotate` launches a
different copy on every call (a captured graph of k launches bakes the rotation in).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .common import ceil_div

L2_FACTOR = 4  # working set of rotated copies, in L2 sizes
MAX_COPIES = 64
DEFAULT_L2 = 50 * 1024 * 1024


def l2_bytes(rt) -> int:
    return int(getattr(rt.profile, "l2_bytes", 0) or DEFAULT_L2)


def copies_needed(nbytes_per_copy: int, l2: int, factor: int = L2_FACTOR) -> int:
    """How many copies of an input of ``nbytes_per_copy`` bytes span ``factor`` L2 sizes."""
    if nbytes_per_copy <= 0:
        raise ValueError(f"nbytes_per_copy must be positive, got {nbytes_per_copy}")
    return max(1, min(MAX_COPIES, ceil_div(factor * l2, nbytes_per_copy)))


def random_weights(rt, shape: tuple[int, ...], *, scale: float = 0.02, min_copies: int | None = None,
                   seed: int = 7) -> list:
    """bf16 device tensors of ``shape`` filled on the device (uniform in +-scale); enough copies
    to defeat the L2 unless ``min_copies`` is given."""
    from ... import memory
    from .elementwise import fill_uniform_bf16

    n = int(np.prod(shape))
    copies = min_copies if min_copies is not None else copies_needed(n * 2, l2_bytes(rt))
    stream = rt.streams["compute"]
    out = []
    for i in range(copies):
        t = memory.empty(shape, "bf16", tag="bench")
        fill_uniform_bf16(rt, t, n, seed + i, scale, 0.0).launch(stream)
        out.append(t)
    stream.synchronize()
    return out


def random_bf16(rt, shape: tuple[int, ...], *, seed: int, scale: float = 1.0):
    """A bf16 device tensor of uniform values in +- scale, filled on the device."""
    from ... import memory
    from .elementwise import fill_uniform_bf16

    n = int(np.prod(shape))
    t = memory.empty(shape, "bf16", tag="bench")
    fill_uniform_bf16(rt, t.reshape(n), n, seed, scale, 0.0).launch(rt.streams["compute"])
    return t


def random_f32(rt, shape: tuple[int, ...], *, seed: int, offset: float = 0.0, scale: float = 1.0):
    """A small fp32 device tensor of uniform values in offset +- scale (host-generated)."""
    from ... import memory

    rng = np.random.default_rng(seed)
    a = (offset + scale * rng.uniform(-1.0, 1.0, size=shape)).astype(np.float32)
    return memory.from_numpy(a, tag="bench")


def ints(rt, values: Sequence[int]):
    from ... import memory

    return memory.from_numpy(np.asarray(values, dtype=np.int32), tag="bench")


def zeros(rt, nbytes: int):
    """A zeroed device buffer of at least ``nbytes`` bytes (workspaces, counters)."""
    from ... import memory

    return memory.zeros((max(4, nbytes),), "uint8", tag="bench")


def rotate(specs: Sequence) -> Callable[[object], None]:
    """``launch(stream)`` that launches ``specs[0], specs[1], ...`` in turn, one per call."""
    if not specs:
        raise ValueError("rotate needs at least one launch spec")
    state = {"i": 0}

    def launch(stream) -> None:
        spec = specs[state["i"] % len(specs)]
        state["i"] += 1
        spec.launch(stream)

    launch.copies = len(specs)
    launch.specs = list(specs)
    return launch


def time_ms(rt, launch, repeats: int = 10, warmup: int = 2) -> list[float]:
    """Milliseconds of each of ``repeats`` runs of ``launch(stream)`` between two CUDA events."""
    from ...driver.streams import Event

    stream = rt.streams["compute"]
    start, stop = Event("cuda"), Event("cuda")
    try:
        times = []
        for i in range(warmup + repeats):
            start.record(stream)
            launch(stream)
            stop.record(stream)
            stop.synchronize()
            if i >= warmup:
                times.append(start.elapsed_ms(stop))
        return times
    finally:
        start.destroy()
        stop.destroy()
