"""``load_tensors``: safetensors bytes from disk into arena tensors at storage speed.

Two paths, one contract:

- ``cufile``: straight from the file into device memory (cuda.bindings.cufile), used
  first when the CUDA backend booted; compat mode counts as working.
- ``staging``: pinned host buffers, disk reads overlapping host->device copies. Used
  on the CPU backend (into host tensors, the same logic CI tests), when asked, and when
  cuFile cannot be opened or fails (the whole load is then redone on this path).

Every load checks all items before reading (sizes, conversions, file bounds, overlaps),
reports which path ran and why, and on failure releases its staging buffers and
scratch tensors, frees nothing the caller owns, and raises ModelError naming the file
and tensor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import BackendUnavailable, ModelError
from .cufile_path import CuFileFailed, driver_for, run_cufile
from .plan import LoadItem, check_items, plan_chunks
from .staging import StagingConfig, run_staging
from .targets import Targets

PATHS = ("auto", "cufile", "staging")
STAGING_MAX_GAP = 1 << 20  # read through gaps up to 1 MiB: cheaper than a new seek-and-read
CUFILE_CHUNK = 64 << 20


@dataclass
class FileStats:
    """One file's share of a load: tensor bytes delivered, file bytes read, tensors, reads."""

    nbytes: int = 0
    read_bytes: int = 0
    tensors: int = 0
    reads: int = 0


@dataclass
class LoadReport:
    """What a load did: the path that ran, why, and how fast.

    ``path`` is ``"cufile"`` or ``"staging"``; ``why`` says why that path (and, when it is
    staging on a CUDA backend, why cuFile was not used); ``nbytes`` are tensor bytes
    delivered, ``read_bytes`` file bytes read (gaps read through included).
    """

    path: str
    why: str
    nbytes: int
    read_bytes: int
    seconds: float
    tensors: int
    converted: int = 0
    files: dict[str, FileStats] = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # the path's figures (buffers, readers, cuFile mode ...)
    cufile_error: str | None = None

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"path": self.path, "why": self.why, "nbytes": self.nbytes, "read_bytes": self.read_bytes,
                "seconds": self.seconds, "gb_per_s": self.gb_per_s, "tensors": self.tensors,
                "converted": self.converted, "cufile_error": self.cufile_error, "details": dict(self.details),
                "files": {k: vars(v).copy() for k, v in self.files.items()}}


def load_tensors(rt, items: list[LoadItem], *, prefer: str = "auto", progress=None,
                 staging: StagingConfig | None = None, cufile_workers: int = 4) -> LoadReport:
    """Load every item's tensor from its file into its destination; returns a :class:`LoadReport`.

    Parameters
    ----------
    rt : the running Runtime (``nrt.firmware.runtime()``).
    items : :class:`LoadItem` list (any order, any files; destinations must not overlap).
    prefer : ``"auto"`` (cuFile on the CUDA backend, staging otherwise or when cuFile
        fails), ``"cufile"`` (cuFile or an error: BackendUnavailable when it cannot open)
        or ``"staging"``.
    progress : ``callable(done_bytes, total_bytes)``, e.g. :class:`ProgressBar`.
    staging : buffer count/size and reader threads of the staging path.

    The destinations hold the bytes when this returns (the copy stream is synchronised).
    """
    if prefer not in PATHS:
        raise ValueError(f"prefer must be one of {', '.join(PATHS)}, got {prefer!r}")
    items = list(items)
    routes = check_items(items)
    stream = rt.streams["h2d"] if rt.is_cuda else None
    drv, why, cufile_error = None, "", None
    if prefer == "staging":
        why = "staging requested"
    elif not rt.is_cuda:
        if prefer == "cufile":
            raise BackendUnavailable("prefer='cufile' needs the CUDA backend; this runtime is on the CPU "
                                     "(cuFile is never touched without it)")
        why = "CPU backend: cuFile is never touched without the CUDA backend"
    else:
        try:
            drv = driver_for(rt)
        except CuFileFailed as exc:
            if prefer == "cufile":
                raise BackendUnavailable(f"prefer='cufile': {exc}") from None
            cufile_error = str(exc)
            why = f"cuFile unavailable ({exc}); staging instead"
    t0 = time.perf_counter()
    if drv is not None:
        try:
            return _finish(_run(rt, items, routes, stream, "cufile", drv, progress, staging, cufile_workers),
                           items, t0, f"cuFile, {drv.mode}", None)
        except CuFileFailed as exc:
            if prefer == "cufile":
                raise ModelError(f"cuFile load failed: {exc}") from None
            cufile_error = str(exc)
            why = f"cuFile failed ({exc}); the load was redone with staging"
    details = _run(rt, items, routes, stream, "staging", None, progress, staging, cufile_workers)
    return _finish(details, items, t0, why, cufile_error)


def _run(rt, items, routes, stream, path, drv, progress, staging, workers) -> tuple:
    targets = Targets(rt, items, routes, stream)
    try:
        if path == "cufile":
            addrs = [None if r.converts else it.dst.ptr for it, r in zip(items, routes)]
            chunks = plan_chunks(items, CUFILE_CHUNK, dst_addrs=addrs)
            details = run_cufile(rt, drv, items, chunks, targets, workers=workers, progress=progress)
        else:
            cfg = staging or StagingConfig()
            chunks = plan_chunks(items, cfg.buffer_bytes, max_gap=min(STAGING_MAX_GAP, cfg.buffer_bytes // 4))
            details = run_staging(rt, items, chunks, targets, stream, cfg, progress)
        left = targets.incomplete()
        if left:  # a planning bug, never a file problem: say so rather than return stale bytes
            raise ModelError(f"internal error: {len(left)} tensors were not fully read (first: {left[0]!r})")
        converted = targets.converted
    finally:
        targets.close()
    return path, chunks, details, converted


def _finish(result: tuple, items, t0: float, why: str, cufile_error) -> LoadReport:
    path, chunks, details, converted = result
    seconds = time.perf_counter() - t0
    files: dict[str, FileStats] = {}
    for it in items:
        fs = files.setdefault(str(Path(it.info.file)), FileStats())
        fs.nbytes += it.info.nbytes
        fs.tensors += 1
    for c in chunks:
        fs = files[str(c.file)]
        fs.read_bytes += c.nbytes
        fs.reads += 1
    return LoadReport(path=path, why=why, nbytes=sum(f.nbytes for f in files.values()),
                      read_bytes=sum(f.read_bytes for f in files.values()), seconds=seconds,
                      tensors=len(items), converted=converted, files=files, details=details,
                      cufile_error=cufile_error)
