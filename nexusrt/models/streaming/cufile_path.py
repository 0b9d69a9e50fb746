"""The cuFile path: file bytes straight into device memory with ``cuda.bindings.cufile``.

The driver is opened once per runtime (``driver_open`` on first use, ``driver_close``
at shutdown) and only when the CUDA backend booted: with no GPU driver ``driver_open``
spins for minutes. Each file is opened and its descriptor registered
(``handle_register``); each read goes to a destination address with ``cufile.read``.
Destinations come from the VMM arena (``cuMemCreate``/``cuMemMap``), which
``buf_register`` may refuse: then reads go unregistered (cuFile's own bounce buffers,
as in compat mode) and the report says why. Without the nvidia-fs kernel module cuFile
runs in compat mode (POSIX reads plus copies); that counts as working.

Reads run on a few worker threads (each with the context current); conversions and
scratch allocation stay on the calling thread.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from ...errors import NexusRTError
from .plan import Chunk, truncation_error, where
from .targets import Targets

_OPAQUE_FD = 1  # CU_FILE_HANDLE_TYPE_OPAQUE_FD


class CuFileFailed(NexusRTError):
    """cuFile could not be opened or a cuFile call failed (not a problem of the file's contents)."""


class _HandleUnion(ctypes.Union):
    _fields_ = [("fd", ctypes.c_int), ("handle", ctypes.c_void_p)]


class _Descr(ctypes.Structure):
    """``CUfileDescr_t``: the handle type, the descriptor, the (unused) file-system ops."""

    _fields_ = [("type", ctypes.c_int), ("handle", _HandleUnion), ("fs_ops", ctypes.c_void_p)]


class CuFileDriver:
    """The cuFile library of one runtime: ``open`` once, ``close`` at shutdown.

    ``module`` is ``cuda.bindings.cufile`` (tests pass a stand-in that reads into host memory).
    """

    def __init__(self, module):
        self.mod = module
        self.opened = False
        self.mode = "unknown"

    def open(self) -> None:
        try:
            self.mod.driver_open()
        except Exception as exc:
            raise CuFileFailed(f"cuFile driver_open failed: {exc}") from None
        self.opened = True
        nvfs = os.path.exists("/proc/driver/nvidia-fs") or os.path.exists("/sys/module/nvidia_fs")
        self.mode = "gds (nvidia-fs loaded)" if nvfs else "compat (no nvidia-fs module: POSIX reads + copies)"

    def close(self) -> None:
        if self.opened:
            self.opened = False
            self.mod.driver_close()

    def register_file(self, path) -> tuple[int, int, _Descr]:
        """Open ``path`` and register it; returns (fd, cuFile handle, descriptor kept alive)."""
        fd = os.open(path, os.O_RDONLY)
        descr = _Descr()
        descr.type = _OPAQUE_FD
        descr.handle.fd = fd
        try:
            fh = int(self.mod.handle_register(ctypes.addressof(descr)))
        except Exception as exc:
            os.close(fd)
            raise CuFileFailed(f"{path}: cuFile handle_register failed: {exc}") from None
        return fd, fh, descr

    def release_file(self, fd: int, fh: int) -> None:
        try:
            self.mod.handle_deregister(fh)
        finally:
            os.close(fd)


def driver_for(rt) -> CuFileDriver:
    """The runtime's open cuFile driver; raises CuFileFailed (remembered) if it cannot open.

    Never call this unless ``rt.is_cuda``: it is the only place cuFile is touched.
    """
    if not rt.is_cuda:
        raise CuFileFailed("cuFile needs the CUDA backend (with no GPU driver driver_open spins for minutes)")
    state = getattr(rt, "_nexusrt_cufile", None)
    if isinstance(state, CuFileFailed):
        raise state
    if state is not None:
        return state
    try:
        from cuda.bindings import cufile
    except Exception as exc:
        err = CuFileFailed(f"cuda.bindings.cufile cannot be imported: {exc}")
        rt._nexusrt_cufile = err
        raise err from None
    drv = CuFileDriver(cufile)
    try:
        drv.open()
    except CuFileFailed as exc:
        rt._nexusrt_cufile = exc
        raise
    rt._nexusrt_cufile = drv
    rt.closers.append(drv.close)
    return drv


class _Registrar:
    """Registers each read's destination range with cuFile until the first refusal."""

    def __init__(self, drv: CuFileDriver, enabled: bool):
        self.drv, self.enabled = drv, enabled
        self.refused: str | None = None if enabled else "buffer registration off"
        self.registered = 0
        self._lock = threading.Lock()

    def register(self, addr: int, nbytes: int) -> bool:
        if not self.enabled:
            return False
        try:
            self.drv.mod.buf_register(addr, nbytes, 0)
        except Exception as exc:
            with self._lock:
                if self.enabled:
                    self.enabled = False
                    self.refused = f"buf_register refused arena (VMM) memory: {exc}; reading unregistered"
            return False
        with self._lock:
            self.registered += 1
        return True

    def deregister(self, addr: int) -> None:
        self.drv.mod.buf_deregister(addr)


def run_cufile(rt, drv: CuFileDriver, items, chunks: list[Chunk], targets: Targets, *, workers: int = 4,
               register: bool = True, progress=None, window: int | None = None) -> dict:
    """Read every chunk straight into its destination (chunks must be destination-contiguous).

    Raises ModelError for a file that ends early (naming file and tensor) and
    CuFileFailed for a cuFile failure; in both cases every read in flight has finished.
    """
    reg = _Registrar(drv, register)
    handles: dict = {}
    total = sum(c.nbytes for c in chunks)
    done = 0
    window = window or 2 * workers
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="nexusrt-cufile",
                              initializer=rt.device.make_current)
    pending: dict = {}
    try:
        it = iter(chunks)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < window:
                chunk = next(it, None)
                if chunk is None:
                    exhausted = True
                    break
                if chunk.file not in handles:
                    handles[chunk.file] = drv.register_file(chunk.file)
                p0 = chunk.pieces[0]
                addr = targets.address(p0.item) + p0.item_off  # scratch is allocated on this thread
                fh = handles[chunk.file][1]
                pending[pool.submit(_read, drv, reg, fh, addr, chunk)] = chunk
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                chunk = pending.pop(fut)
                got, exc = fut.result()
                if exc is not None or got != chunk.nbytes:
                    raise _failure(chunk, items, got, exc)
                for p in chunk.pieces:
                    targets.received(p.item, p.nbytes)
                done += chunk.nbytes
                if progress is not None:
                    progress(done, total)
    except BaseException:
        _close_all(pool, drv, handles, quiet=True)
        raise
    _close_all(pool, drv, handles, quiet=False)
    return {"mode": drv.mode, "workers": workers, "chunks": len(chunks), "registered_buffers": reg.registered,
            "buf_register": reg.refused or "registered each destination range"}


def _close_all(pool, drv: CuFileDriver, handles: dict, quiet: bool) -> None:
    """Wait for every read in flight (nothing may write into memory about to be freed), close files."""
    pool.shutdown(wait=True, cancel_futures=True)
    first = None
    for fd, fh, _ in handles.values():
        try:
            drv.release_file(fd, fh)
        except Exception as exc:  # keep closing the rest
            first = first or exc
    if first is not None and not quiet:  # never hide the error that brought us here
        raise CuFileFailed(f"cuFile handle_deregister failed: {first}")


def _read(drv: CuFileDriver, reg: _Registrar, fh: int, addr: int, chunk: Chunk):
    """One chunk; returns (bytes read, exception or None) so the caller names the tensor."""
    try:
        registered = reg.register(addr, chunk.nbytes)
        try:
            got = int(drv.mod.read(fh, addr, chunk.nbytes, chunk.offset, 0))
        finally:
            if registered:
                reg.deregister(addr)
        return got, None
    except Exception as exc:
        return 0, exc


def _failure(chunk: Chunk, items, got: int, exc) -> Exception:
    try:
        shrunk = os.path.getsize(chunk.file) < chunk.offset + chunk.nbytes
    except OSError:
        shrunk = False
    if (exc is None and 0 <= got < chunk.nbytes) or shrunk:  # the file, not cuFile
        return truncation_error(items, chunk, got)
    info = items[chunk.pieces[0].item].info
    return CuFileFailed(f"{where(info)}: cuFile read of bytes {chunk.offset}..{chunk.offset + chunk.nbytes} "
                        f"failed: {exc if exc is not None else f'returned {got}'}")
