"""The staging path: disk -> pinned host buffers -> device, reads overlapping copies.

Reader threads take a free buffer and the next chunk, ``preadv`` the chunk into the
buffer and hand it over; the calling thread (the only one that talks to the driver)
queues one host->device copy per piece on the ``h2d`` stream, records the buffer's
event and hands the buffer back once that event has passed. With ``buffers >
readers`` there is always a buffer being filled while another is being copied, so
chunk N+1 comes off the disk while chunk N crosses PCIe.

On the CPU backend the buffers are arena tensors (so the leak audit sees them) and the
"copy" is a ``memmove`` into the destination: the same logic, run in CI.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
import time
from dataclasses import dataclass

from ... import memory
from ...errors import ModelError
from ...driver.calls import call
from ...driver.streams import Event
from .plan import Chunk, truncation_error, where
from .targets import Targets, np_view

STAGING_TAG = "load_staging"
_POLL_S = 0.05


@dataclass
class StagingConfig:
    """Pinned buffers (``buffers`` of ``buffer_bytes``) and reader threads of the staging path."""

    buffers: int = 6
    buffer_bytes: int = 64 << 20
    readers: int = 3

    def __post_init__(self):
        if self.buffers < 2:
            raise ValueError(f"staging needs at least 2 buffers (one filling, one copying), got {self.buffers}")
        if self.buffer_bytes < 4096:
            raise ValueError(f"buffer_bytes must be at least 4096, got {self.buffer_bytes}")
        if not 1 <= self.readers < self.buffers:
            raise ValueError(f"readers must be in 1..buffers-1 ({self.buffers - 1}), got {self.readers}")


def read_into(fd: int, view, offset: int) -> int:
    """Read ``len(view)`` bytes at ``offset`` into ``view``; returns the bytes read (short at EOF)."""
    got, n = 0, len(view)
    while got < n:
        k = os.preadv(fd, [view[got:]], offset + got)
        if k == 0:
            break
        got += k
    return got


class _Readers:
    """Reader threads filling free buffers with chunks, in chunk order of claiming."""

    def __init__(self, chunks: list[Chunk], views: list, nthreads: int):
        self.chunks, self.views = chunks, views
        self.free: queue.Queue = queue.Queue()
        self.filled: queue.Queue = queue.Queue()
        for b in range(len(views)):
            self.free.put(b)
        self.stop = threading.Event()
        self._next = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, name=f"nexusrt-load-reader-{k}", daemon=True)
                        for k in range(nthreads)]
        for t in self.threads:
            t.start()

    def _claim(self) -> int | None:
        with self._lock:
            if self._next >= len(self.chunks):
                return None
            self._next += 1
            return self._next - 1

    def _run(self) -> None:
        fds: dict = {}
        try:
            while not self.stop.is_set():
                try:
                    b = self.free.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                c = self._claim()
                if c is None:
                    self.free.put(b)
                    return
                chunk = self.chunks[c]
                try:
                    fd = fds.get(chunk.file)
                    if fd is None:
                        fd = fds[chunk.file] = os.open(chunk.file, os.O_RDONLY)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger readahead window
                    got = read_into(fd, memoryview(self.views[b])[:chunk.nbytes], chunk.offset)
                    self.filled.put((c, b, got, None))
                except OSError as exc:
                    self.filled.put((c, b, 0, exc))
        finally:
            for fd in fds.values():
                os.close(fd)

    def shutdown(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def _chunk_error(chunk: Chunk, items, got: int, exc: OSError | None) -> ModelError:
    if exc is None:
        return truncation_error(items, chunk, got)
    info = items[chunk.pieces[0].item].info
    return ModelError(f"{where(info)}: cannot read bytes {chunk.offset}..{chunk.offset + chunk.nbytes}: "
                      f"{exc.strerror or exc}")


def run_staging(rt, items, chunks: list[Chunk], targets: Targets, stream, config: StagingConfig,
                progress=None) -> dict:
    """Read every chunk through the staging buffers into ``targets``; returns the path's figures.

    Frees its buffers on every exit; on a failed read raises ModelError naming the
    file and tensor. The copies are complete when this returns (``stream`` synchronised).
    """
    if not chunks:
        return {"buffers": 0, "buffer_bytes": 0, "readers": 0, "chunks": 0, "setup_s": 0.0}
    size = max(c.nbytes for c in chunks)
    nbuf = min(config.buffers, max(2, len(chunks)))
    nthreads = min(config.readers, nbuf - 1)
    t0 = time.perf_counter()
    bufs, events, readers = [], [], None
    try:
        for _ in range(nbuf):
            if rt.is_cuda:
                bufs.append(memory.pinned((size,), "uint8", tag=STAGING_TAG))
            else:
                bufs.append(memory.empty((size,), "uint8", tag=STAGING_TAG))
            events.append(Event(rt.backend, timing=False))
        setup_s = time.perf_counter() - t0
        readers = _Readers(chunks, [np_view(b) for b in bufs], nthreads)
        _drain(rt, items, chunks, targets, stream, readers, bufs, events, nbuf - nthreads, progress)
    finally:
        if readers is not None:
            readers.shutdown()  # no thread may write into a buffer once it is freed
        if stream is not None:
            stream.synchronize()  # nor may a copy still read from one
        for b in bufs:
            b.free()
        for e in events:
            e.destroy()
    return {"buffers": nbuf, "buffer_bytes": size, "readers": nthreads, "chunks": len(chunks),
            "setup_s": setup_s}


def _drain(rt, items, chunks, targets, stream, readers: _Readers, bufs, events, max_inflight: int,
           progress) -> None:
    total = sum(c.nbytes for c in chunks)
    done_bytes, inflight = 0, []

    def recycle(limit: int) -> None:
        # Hand buffers back: at once when their copies are done, and by waiting for the
        # oldest copy when more than ``limit`` are held (copies are fast next to reads).
        while inflight and (len(inflight) > limit or events[inflight[0]].query()):
            events[inflight[0]].synchronize()
            readers.free.put(inflight.pop(0))

    for _ in range(len(chunks)):
        # Readers waiting for a buffer would stall the disk: give them one first.
        recycle(max_inflight if not readers.free.empty() else len(inflight) - 1)
        while True:
            try:
                c, b, got, exc = readers.filled.get(timeout=_POLL_S)
                break
            except queue.Empty:
                recycle(0)
                if not any(t.is_alive() for t in readers.threads):
                    raise ModelError("the staging reader threads stopped before reading every chunk") from None
        chunk = chunks[c]
        if exc is not None or got < chunk.nbytes:
            raise _chunk_error(chunk, items, got, exc)
        src = bufs[b].ptr
        for p in chunk.pieces:
            dst = targets.address(p.item) + p.item_off
            if rt.is_cuda:
                call("cuMemcpyHtoDAsync", dst, src + p.chunk_off, p.nbytes, stream.handle)
            else:
                ctypes.memmove(dst, src + p.chunk_off, p.nbytes)
            targets.received(p.item, p.nbytes)
        events[b].record(stream)
        inflight.append(b)
        recycle(max_inflight)
        done_bytes += chunk.nbytes
        if progress is not None:
            progress(done_bytes, total)
