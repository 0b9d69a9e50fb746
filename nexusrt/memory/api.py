"""The public memory API: ``nrt.memory.alloc`` and friends, over the running runtime's arena."""

from __future__ import annotations

import numpy as np

from .. import runtime
from ..errors import InvalidArgument, InvalidArgumentType, NotInitialized, OutOfMemory
from . import arena as arena_mod
from .dtypes import check_shape, from_numpy_dtype, nbytes_of, resolve
from .provider_host import free_physical_bytes
from .tensor import Storage, Tensor


def alloc(shape, dtype, ilc: bool = False, device: bool = True, pinned: bool = False,
          tag: str | None = None) -> Tensor:
    """A new, uninitialised tensor.

    Parameters
    ----------
    shape : tuple of positive ints (an int means 1-D).
    dtype : one of ``nrt.memory.DTYPES`` (bf16, fp16, fp32, fp8_e4m3, int8, uint8, int32, int64).
    ilc : ask for compressible device memory. Where the device cannot give it the tensor
        is plain and says so (``tensor.compressed is False``; ``stats()`` counts it).
    device : device memory from the arena (True) or host memory (False).
    pinned : with ``device=False``, page-locked host memory (CUDA backend; on the CPU
        backend host memory is never page-locked and ``tensor.pinned`` is False).
    tag : a name the bytes are accounted under in ``stats()["by_tag"]``.

    Raises ``ValueError`` naming the bad argument and ``OutOfMemory`` with the requested and
    available bytes (the arena stays usable for smaller requests).
    """
    rt = runtime.current("nrt.memory.alloc")
    dt = resolve(dtype)
    shape = check_shape(shape)
    nbytes = nbytes_of(shape, dt)
    if tag is not None and not isinstance(tag, str):
        raise InvalidArgumentType("tag", f"tag must be a string or None, got {tag!r}")
    # Flags must be bools: a truthy string such as "no" would otherwise mean yes.
    for name, flag in (("ilc", ilc), ("device", device), ("pinned", pinned)):
        if not isinstance(flag, (bool, np.bool_)):
            raise InvalidArgumentType(name, f"{name} must be True or False, got {type(flag).__name__} {flag!r}")
    if device and pinned:
        raise ValueError("pinned=True is for host memory: pass device=False with it")
    if ilc and not device:
        raise ValueError("ilc=True (compressible memory) is for device memory: drop device=False")
    arena = rt.arena
    if device:
        block = arena.alloc(nbytes, bool(ilc), tag)
        storage = Storage(arena, block, block.addr, nbytes, device=True, pinned=False, tag=tag,
                          host=arena.host_view(block))
    elif pinned and rt.is_cuda:
        block = arena.alloc_pinned(nbytes, tag)
        storage = Storage(arena, block, block.ptr, nbytes, device=False, pinned=True, tag=tag,
                          host=block.view())
    else:
        buf = _host_bytes(nbytes)
        storage = Storage(None, None, buf.ctypes.data, nbytes, device=False, pinned=False, tag=tag, host=buf)
    return Tensor(storage, shape, dt)


def _host_bytes(nbytes: int) -> np.ndarray:
    """``nbytes`` of pageable host memory; OutOfMemory (requested and available bytes) where the
    host refuses, as the arena reports it, instead of NumPy's MemoryError."""
    try:
        return np.empty(nbytes, dtype=np.uint8)
    except (MemoryError, ValueError):  # ValueError: a size NumPy cannot even describe
        raise OutOfMemory(nbytes, free_physical_bytes() or 0, "pageable host memory (device=False)") from None


def _byte_count(value, name: str) -> int:
    """``value`` as a non-negative int of bytes: a NumPy integer is fine, a bool or float is not."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentType(name, f"{name} must be a non-negative int (bytes), "
                                        f"got {type(value).__name__} {value!r}")
    if value < 0:
        raise InvalidArgument(name, f"{name} must be a non-negative int (bytes), got {value}")
    return int(value)


def empty(shape, dtype, tag: str | None = None, **kw) -> Tensor:
    """``alloc(shape, dtype, tag=tag, **kw)``: uninitialised memory."""
    runtime.current("nrt.memory.empty")
    return alloc(shape, dtype, tag=tag, **kw)


def zeros(shape, dtype, tag: str | None = None, **kw) -> Tensor:
    """A tensor of zero bytes (``alloc`` arguments)."""
    rt = runtime.current("nrt.memory.zeros")
    t = alloc(shape, dtype, tag=tag, **kw)
    if t._storage.host is not None:
        t._storage.host[...] = 0
    else:
        rt.arena.fill(t.ptr, t.nbytes, 0)
    return t


def from_numpy(arr, dtype=None, tag: str | None = None, **kw) -> Tensor:
    """A new tensor holding a copy of ``arr``.

    ``dtype=None`` keeps ``arr``'s dtype (which must be one NexusRT stores); a dtype
    that differs is an explicit request to convert (e.g. fp32 -> bf16).
    """
    runtime.current("nrt.memory.from_numpy")
    a = np.asarray(arr)
    dt = from_numpy_dtype(a.dtype, "arr") if dtype is None else resolve(dtype)
    t = alloc(a.shape, dt, tag=tag, **kw)
    try:
        t.copy_from(a, convert=dtype is not None)
    except BaseException:
        t.free()
        raise
    return t


def pinned(shape, dtype, tag: str | None = None) -> Tensor:
    """Page-locked host memory: ``alloc(shape, dtype, device=False, pinned=True, tag=tag)``."""
    runtime.current("nrt.memory.pinned")
    return alloc(shape, dtype, device=False, pinned=True, tag=tag)


def stats() -> dict:
    """Reserved, mapped, in use, peak, pooled bytes, per-tag bytes, page and ilc counters."""
    return runtime.current("nrt.memory.stats").arena.stats()


def audit() -> list[dict]:
    """The allocations still held.

    While running: every live allocation (``state: "live"``). After
    ``nrt.firmware.shutdown()``: what shutdown had to release (``leaked_at_shutdown``) and
    anything still mapped; a clean program gets ``[]``.
    """
    if runtime.is_initialized():
        return runtime.current().arena.audit()
    if arena_mod.LAST_AUDIT is None:
        raise NotInitialized("nrt.memory.audit")
    return list(arena_mod.LAST_AUDIT)


def trim(keep_bytes: int = 0) -> int:
    """Return pooled free pages to the driver until ``keep_bytes`` stay; returns bytes released."""
    rt = runtime.current("nrt.memory.trim")
    return rt.arena.trim(_byte_count(keep_bytes, "keep_bytes"))


def set_high_water(nbytes: int | None) -> None:
    """Keep at most ``nbytes`` of free pages pooled from now on (None: keep all)."""
    rt = runtime.current("nrt.memory.set_high_water")
    rt.arena.set_high_water(None if nbytes is None else _byte_count(nbytes, "nbytes"))


def reset_peak() -> None:
    """Start the ``peak_bytes`` figure again from what is in use now."""
    runtime.current("nrt.memory.reset_peak").arena.core.reset_peak()
