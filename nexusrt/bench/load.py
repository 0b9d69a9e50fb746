"""``nexusrt-bench --stage load``: weight loading speed per path against plain file reads.

All in one run, on one checkpoint directory (``--model DIR``, or ``synthetic:<preset>``
saved first into a temporary directory under ``--load-dir``, default the current
directory, i.e. the disk being measured and not a tmpfs):

* the files' plain sequential read speed (one thread, 64 MiB reads, like ``cat``);
* NexusRT's loader per path (staging; cuFile on the CUDA backend) into arena tensors
  allocated beforehand (the allocation time is shown separately);
* ``safetensors.torch.load_file(device="cuda")`` when torch with CUDA imports.

Each is measured cold (the files dropped from the page cache first: per file with
fadvise, or through /proc/sys/vm/drop_caches only with ``--drop-caches``; the resident
fraction is measured and shown) and warm (median
of ``--load-runs``). Ratios compare like with like: cold with cold, warm with warm.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import SYNTHETIC_PREFIX, add_model_argument
from .table import human_bytes, plain, table

READ_BYTES = 64 << 20
TARGET_RATIO = 0.8
# The options this stage reads (nexusrt-bench refuses them with another stage; see main's docstring).
OPTIONS = frozenset({"model", "load_runs", "load_dir", "load_keep", "load_no_peer", "load_buffers", "load_buffer_mib",
                     "load_readers", "drop_caches", "load_budget_s"})


def add_arguments(parser) -> None:
    add_model_argument(parser)
    g = parser.add_argument_group("load stage")
    g.add_argument("--load-runs", type=int, default=3, metavar="R", help="load stage: warm runs, median (3)")
    g.add_argument("--load-dir", default=None, metavar="DIR",
                   help="load stage: where synthetic:<preset> is saved (default: the current directory)")
    g.add_argument("--load-keep", action="store_true", help="load stage: keep the saved synthetic checkpoint")
    g.add_argument("--load-no-peer", action="store_true", help="load stage: skip safetensors->torch")
    g.add_argument("--load-buffers", type=int, default=6, metavar="N", help="load stage: staging buffers (6)")
    g.add_argument("--load-buffer-mib", type=int, default=64, metavar="MIB", help="load stage: staging buffer MiB (64)")
    g.add_argument("--load-readers", type=int, default=3, metavar="N", help="load stage: staging reader threads (3)")
    g.add_argument("--drop-caches", action="store_true",
                   help="load stage: evict by writing /proc/sys/vm/drop_caches (root; empties the page cache of "
                        "the whole machine). Default: per-file fadvise, which touches only the measured files")
    g.add_argument("--load-budget-s", type=float, default=200.0, metavar="S",
                   help="load stage: stop adding warm repetitions past this many seconds (200)")


def plain_read(files) -> float:
    """Seconds to read every file start to end, sequentially, into one reused buffer."""
    buf = memoryview(bytearray(READ_BYTES))
    t0 = time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while os.readv(fd, [buf]):
                pass
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def _torch_cuda():
    try:
        import torch
        from safetensors.torch import load_file
    except Exception as exc:
        return None, f"torch/safetensors not importable ({exc})"
    if not torch.cuda.is_available():
        return None, "torch has no CUDA here"
    return (torch, load_file), ""


def torch_load(peer, files) -> float:
    torch, load_file = peer
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = [load_file(str(f), device="cuda") for f in files]
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del out
    torch.cuda.empty_cache()
    return dt


class _Session:
    """Runs each measurement cold then warm, within the time budget, and keeps the rows."""

    def __init__(self, files, nbytes: int, runs: int, budget_s: float, drop_caches: bool = False):
        self.files, self.nbytes, self.runs, self.budget = files, nbytes, runs, budget_s
        self.drop_caches = drop_caches
        self.t_start = time.perf_counter()
        self.rows: list[dict] = []
        self.evicted_with = None

    def measure(self, what: str, fn) -> None:
        from ..models.streaming.pagecache import DROP_CACHES, evict, resident_fraction

        self.evicted_with = evict(self.files, DROP_CACHES if self.drop_caches else None)
        resident = resident_fraction(self.files)
        self._row(what, "cold", [fn()], resident)
        warm = []
        for _ in range(self.runs):
            if warm and time.perf_counter() - self.t_start > self.budget:
                break  # keep the stage bounded: fewer repetitions, said in the row
            warm.append(fn())
        self._row(what, "warm", warm, resident_fraction(self.files))

    def _row(self, what, cache, samples, resident) -> None:
        s = statistics.median(samples)
        self.rows.append({"what": what, "cache": cache, "seconds": s, "runs": len(samples),
                          "gb_per_s": self.nbytes / s / 1e9, "resident_before": resident})


def _checkpoint(args, rt) -> tuple[Path, str, dict]:
    """The directory to load, a note, and the save figures when synthetic."""
    from ..models.shipped import DEFAULT_MODEL, PREFIX, shipped_dir
    from ..models.streaming import save_synthetic_checkpoint

    model = args.model
    if model.startswith(PREFIX):
        return shipped_dir(model), "", {}
    if not model.startswith(SYNTHETIC_PREFIX):
        if not Path(model).is_dir():
            raise ValueError(f"--model {model!r} is neither synthetic:<preset> nor a checkpoint directory")
        return Path(model), "", {}
    preset = model[len(SYNTHETIC_PREFIX):]
    if not rt.is_cuda and not getattr(args, "model_explicit", False):  # a CPU figure: real files, nothing saved
        return shipped_dir(DEFAULT_MODEL), f"CPU backend: loaded {DEFAULT_MODEL} instead of {model} (a CPU figure)", {}
    note = ""
    base = Path(args.load_dir or os.getcwd())
    try:
        out = Path(tempfile.mkdtemp(prefix="nexusrt-load-", dir=base))
    except OSError as exc:  # checked up front; a folder that changed since is said the same way
        flag = f"--load-dir {args.load_dir!r}" if args.load_dir else f"the current directory {str(base)!r} (--load-dir)"
        raise ValueError(f"{flag} is not writable: no folder can be created there ({exc.strerror or exc})") from None
    t0 = time.perf_counter()
    try:
        save_synthetic_checkpoint(preset, out, rt=rt)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out, note, {"save_s": time.perf_counter() - t0, "saved_to": str(out)}


def _check_args(args) -> tuple[int, int, int]:
    """Refuse, before anything boots, what the stage cannot run, naming its flags (the staging
    path's own refusals name its fields: buffer_bytes, readers); returns the staging config's
    (buffers, buffer bytes, readers)."""
    from .common import check_memory, writable_folder_problem

    if args.load_runs < 1:
        raise ValueError(f"--load-runs must be >= 1, got {args.load_runs}")
    if not args.load_budget_s >= 0:  # NaN too
        raise ValueError(f"--load-budget-s must be >= 0, got {args.load_budget_s}")
    buffers, mib, readers = args.load_buffers, args.load_buffer_mib, args.load_readers
    if buffers < 2:
        raise ValueError(f"--load-buffers must be >= 2 (one filling, one copying), got {buffers}")
    if mib < 1:
        raise ValueError(f"--load-buffer-mib must be >= 1, got {mib}")
    if not 1 <= readers < buffers:
        raise ValueError(f"--load-readers must be in 1..{buffers - 1} (fewer than --load-buffers {buffers}: a "
                         f"buffer is always being copied), got {readers}")
    check_memory(buffers * (mib << 20), f"--load-buffers {buffers} x --load-buffer-mib {mib} (the staging "
                                              "buffers)", "give fewer or smaller buffers")
    if args.load_dir is not None:
        why = writable_folder_problem(args.load_dir) if str(args.load_dir).strip() else "is empty"
        if why is not None:
            raise ValueError(f"--load-dir {args.load_dir!r} {why}")
    return buffers, mib << 20, readers


def run(args) -> dict:
    from .. import firmware, memory
    from ..models.safetensors import SafetensorsIndex, read_tensor
    from ..models.streaming import LoadItem, ProgressBar, StagingConfig, load_tensors
    from ..models.streaming.pagecache import filesystem_of

    staging = StagingConfig(*_check_args(args))
    firmware.init(profile=args.profile, backend=args.backend)
    rt = firmware.runtime()
    model_dir, note, saved = _checkpoint(args, rt)
    try:
        index = SafetensorsIndex.from_dir(model_dir)
        files = [f.path for f in index.files]
        infos = [i for i in index.tensors.values() if i.nbytes]
        nbytes = sum(os.path.getsize(f) for f in files)
        s = _Session(files, nbytes, args.load_runs, args.load_budget_s, args.drop_caches)
        s.measure("plain sequential read", lambda: plain_read(files))
        t0 = time.perf_counter()
        dsts = [memory.empty((i.nbytes,), "uint8", tag="load_bench") for i in infos]
        alloc_s = time.perf_counter() - t0
        items = [LoadItem(i, d) for i, d in zip(infos, dsts)]
        reports, verified = {}, {}
        cufile_open = _open_cufile(rt)  # once, outside the timed loads (as a long-lived process would)
        for path in (("staging", "cufile") if rt.is_cuda else ("staging",)):
            def load(path=path):
                with ProgressBar(f"load {path}", enabled=not args.json) as bar:
                    rep = load_tensors(rt, items, prefer=path, progress=bar, staging=staging)
                reports[path] = rep.as_dict()
                return rep.seconds
            try:
                s.measure(f"nexusrt {path}", load)
                verified[path] = _verify(items, read_tensor)
            except Exception as exc:  # e.g. cuFile refused here: say so, measure the rest
                reports[path] = {"error": f"{type(exc).__name__}: {exc}"}
        for d in dsts:
            d.free()
        memory.trim()
        peer_note = "skipped (--load-no-peer)" if args.load_no_peer else ""
        if not args.load_no_peer and rt.is_cuda:
            peer, peer_note = _torch_cuda()
            if peer is not None:
                s.measure("safetensors -> torch cuda", lambda: torch_load(peer, files))
        elif not peer_note:
            peer_note = "CPU backend: no torch CUDA peer"
    finally:
        if saved and not args.load_keep:
            shutil.rmtree(model_dir, ignore_errors=True)
    _ratios(s.rows)
    cufile_ok = rt.is_cuda and "error" not in reports.get("cufile", {"error": ""})
    auto = "cufile" if cufile_ok else "staging"
    return {"auto_picks": auto,"backend": rt.backend, "model": args.model, "dir": str(model_dir), "note": note,
            "filesystem": filesystem_of(model_dir if model_dir.exists() else model_dir.parent),
            "files": len(files), "file_bytes": nbytes, "tensors": len(infos), "alloc_s": alloc_s,
            "evicted_with": s.evicted_with, "rows": s.rows, "reports": reports, "verified": verified,
            "peer": peer_note or "safetensors.torch.load_file(device='cuda')", **saved, "cufile": cufile_open,
            "targets": _targets(s.rows)}


def _open_cufile(rt) -> dict:
    if not rt.is_cuda:
        return {"error": "CPU backend: cuFile never touched"}
    from ..models.streaming.cufile_path import CuFileFailed, driver_for

    t0 = time.perf_counter()
    try:
        drv = driver_for(rt)
    except CuFileFailed as exc:
        return {"error": str(exc)}
    return {"open_s": time.perf_counter() - t0, "mode": drv.mode}


def _verify(items, read_tensor) -> bool:
    """Byte-compare a few loaded tensors (the smallest, the largest, one between) with the file."""
    by_size = sorted(items, key=lambda it: it.info.nbytes)
    for it in {id(x): x for x in (by_size[0], by_size[len(by_size) // 2], by_size[-1])}.values():
        got = it.dst.to_numpy()
        want = np.ascontiguousarray(read_tensor(it.info)).reshape(-1).view(np.uint8)
        if not np.array_equal(got, want):
            return False
    return True


def _ratios(rows: list[dict]) -> None:
    base = {r["cache"]: r["gb_per_s"] for r in rows if r["what"] == "plain sequential read"}
    for r in rows:
        r["vs_read"] = r["gb_per_s"] / base[r["cache"]] if base.get(r["cache"]) else None


def _targets(rows: list[dict]) -> list[dict]:
    """Per loader path and cache state: >= 80% of the plain read and faster than torch?"""
    peer = {r["cache"]: r["gb_per_s"] for r in rows if r["what"].startswith("safetensors")}
    out = []
    for r in rows:
        if r["what"].startswith("nexusrt"):
            out.append({"what": r["what"], "cache": r["cache"], "vs_read": r["vs_read"],
                        "meets_read": r["vs_read"] is not None and r["vs_read"] >= TARGET_RATIO,
                        "vs_torch": r["gb_per_s"] / peer[r["cache"]] if r["cache"] in peer else None})
    return out


def render(res: dict) -> str:
    head = [f"load: {res['model']} -> {res['dir']} ({res['filesystem']}), {res['files']} files, "
            f"{human_bytes(res['file_bytes'])}, {res['tensors']} tensors, backend {res['backend']}"]
    if res.get("note"):
        head.append(res["note"])
    if "save_s" in res:
        head.append(f"saved in {res['save_s']:.1f} s ({res['file_bytes'] / res['save_s'] / 1e9:.2f} GB/s incl. fsync)")
    head.append(f"cold = dropped from the page cache first ({res['evicted_with']}); warm = right after, "
                f"median of the runs; destinations allocated beforehand in {res['alloc_s']:.2f} s")
    rows = [[r["what"], r["cache"], r["gb_per_s"], r["seconds"], r["runs"],
             "-" if r["vs_read"] is None else f"{r['vs_read']:.0%}",
             "?" if r["resident_before"] is None else f"{r['resident_before']:.0%}"] for r in res["rows"]]
    lines = head + ["", table(["measure", "cache", "GB/s", "s", "runs", "vs read", "cached before"], rows)]
    for path, rep in res["reports"].items():
        why = rep.get("error") or f"{rep['why']}; {plain(rep['details'])}"
        lines.append(f"{path}: {why}" + ("" if res["verified"].get(path, True) else "  BYTES DIFFER"))
    lines.append(f"cuFile driver: {plain(res['cufile'])}")
    lines.append(f"load_tensors(prefer='auto') uses: {plain(res['auto_picks'])}")
    lines.append(f"peer: {plain(res['peer'])}")
    for t in res["targets"]:
        torch_s = "" if t["vs_torch"] is None else f", {t['vs_torch']:.2f}x torch"
        lines.append(f"target {t['what']} {t['cache']}: {'met' if t['meets_read'] else 'NOT met'} "
                     f"(>= {TARGET_RATIO:.0%} of read: {t['vs_read'] or 0:.0%}{torch_s})")
    return "\n".join(lines)
