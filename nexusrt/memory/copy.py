"""Copies between tensors: asynchronous on the copy streams with an event, or synchronous.

Host -> device runs on the ``h2d`` stream, device -> host on ``d2h`` and device -> device
on ``compute`` (it is a memory-bound kernel in all but name), unless a stream is given.
The copy is ordered after earlier work on *its* stream only: to copy out a result a
kernel wrote on another stream, make the copy stream wait first (``Event.wait_by``).
"""

from __future__ import annotations

import ctypes

from .. import runtime
from ..driver.calls import call, cu
from ..driver.streams import Event, Stream

_ROUTES = {  # (src on device, dst on device) -> (driver call, default stream role)
    (False, True): ("cuMemcpyHtoDAsync", "h2d"),
    (True, False): ("cuMemcpyDtoHAsync", "d2h"),
    (True, True): ("cuMemcpyDtoDAsync", "compute"),
}


def _check(dst, src) -> None:
    # A Tensor is known by its storage: this module sits below tensor.py, whose copy_from
    # calls it, so it does not import the Tensor class.
    for name, t in (("dst", dst), ("src", src)):
        storage = getattr(t, "_storage", None)
        if storage is None:
            raise TypeError(f"{name} must be a nexusrt Tensor, got {type(t).__name__} "
                            "(wrap arrays with nrt.memory.from_numpy or use tensor.copy_from)")
        storage.check(f"copy {name}")
    if dst.dtype != src.dtype or dst.nbytes != src.nbytes:
        raise ValueError(f"copy: dst is {dst.numel} x {dst.dtype}, src is {src.numel} x {src.dtype}: "
                         "dtype and element count must match")


def copy_async(dst, src, stream=None) -> Event:
    """Queue ``dst <- src`` (Tensors) and return an :class:`Event` recorded after it.

    ``stream`` is a role name or a Stream (default by direction, see the module).
    Both tensors' memory stays reserved until the copy ends, even if freed meanwhile.
    """
    rt = runtime.current("nrt.memory.copy_async")
    _check(dst, src)
    chosen = _stream(rt, stream)  # checked on every backend, though only CUDA queues on it
    route = _ROUTES.get((src.device, dst.device))
    if not rt.is_cuda or route is None:
        # Host to host, or the CPU backend: a plain memory copy, complete on return.
        _wait_pending(dst, src)
        ctypes.memmove(dst.ptr, src.ptr, dst.nbytes)
        return Event(rt.backend, timing=False).record()
    fn, role = route
    s = chosen if chosen is not None else rt.streams[role]
    call(fn, dst.ptr, src.ptr, dst.nbytes, s.handle)
    event = Event(rt.backend, timing=False).record(s)
    dst._storage.pending = src._storage.pending = event
    return event


def _stream(rt, stream):
    """The Stream ``stream`` names (None stays None); a bad role is refused on the CPU backend
    too, where the copy needs no stream, so code tested there does not fail first on a GPU."""
    if stream is None:
        return None
    if not isinstance(stream, (str, Stream)):
        raise TypeError(f"stream must be a role name or a Stream, got {type(stream).__name__} {stream!r}")
    return rt.streams.get(stream)  # an unknown role: ValueError listing the roles


def copy_2d_params(dst_ptr: int, dst_pitch: int, src_ptr: int, src_pitch: int, width: int, height: int):
    """The ``CUDA_MEMCPY2D`` of a device-to-device copy of ``height`` rows of ``width`` bytes, each
    source row ``src_pitch`` bytes after the last and each destination row ``dst_pitch``: a column
    block of a row-major matrix to or from a contiguous one. Built once, queued as often as needed
    (``call("cuMemcpy2DAsync", params, stream)``; capturable)."""
    drv = cu()
    p = drv.CUDA_MEMCPY2D()
    p.srcMemoryType = p.dstMemoryType = drv.CUmemorytype.CU_MEMORYTYPE_DEVICE
    p.srcDevice, p.srcPitch = src_ptr, src_pitch
    p.dstDevice, p.dstPitch = dst_ptr, dst_pitch
    p.WidthInBytes, p.Height = width, height
    return p


def queue_copy_2d(params, stream_handle) -> None:
    """Queue the copy :func:`copy_2d_params` described on the stream."""
    call("cuMemcpy2DAsync", params, stream_handle)


def queue_copy_batch(copies, stream_handle) -> None:
    """Queue raw pointer copies ``copies`` (``(dst_ptr, src_ptr, nbytes)`` each) on a stream in one
    driver call, ``cuMemcpyBatchAsync`` (CUDA 12.8+; :func:`copy_batch_supported`). The batch
    as a whole runs in stream order and reads its sources in stream order, but the copies inside
    it run in any order: none may read or write what another writes. Not capturable."""
    if not copies:
        return
    d = cu()
    attrs = d.CUmemcpyAttributes()
    attrs.srcAccessOrder = d.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
    dsts = [d.CUdeviceptr(int(c[0])) for c in copies]
    srcs = [d.CUdeviceptr(int(c[1])) for c in copies]
    call("cuMemcpyBatchAsync", dsts, srcs, [int(c[2]) for c in copies], len(copies), [attrs], [0], 1,
         stream_handle)


def copy_batch_supported() -> bool:
    """Whether :func:`queue_copy_batch` can run here: the bindings have ``cuMemcpyBatchAsync`` and
    the driver is CUDA 12.8 or newer."""
    return hasattr(cu(), "cuMemcpyBatchAsync") and call("cuDriverGetVersion") >= 12080


def copy_2d(dst_ptr: int, dst_pitch: int, src_ptr: int, src_pitch: int, width: int, height: int,
            stream_handle) -> None:
    """Queue one such copy now (:func:`copy_2d_params`)."""
    queue_copy_2d(copy_2d_params(dst_ptr, dst_pitch, src_ptr, src_pitch, width, height), stream_handle)


def copy(dst, src) -> None:
    """``dst <- src`` (Tensors), returning when the bytes are there (after all earlier device work)."""
    rt = runtime.current("nrt.memory.copy")
    _check(dst, src)
    rt.device.synchronize()
    copy_async(dst, src).synchronize()


def _wait_pending(*tensors) -> None:
    for t in tensors:
        if t._storage.pending is not None:
            t._storage.pending.synchronize()
