"""``nexusrt-bench --stage memory``: page costs, arena vs cuMemAlloc, copy bandwidths.

Everything is measured in this run and reported as the median of many repetitions:

* page create / map+access / unmap+release on a range of its own (the arena's costs);
* arena alloc+free latency next to ``cuMemAlloc``/``cuMemFree`` of the same sizes;
* host->device (pinned and pageable), device->host and device->device bandwidth, as a
  fraction of the profile's peak memory bandwidth (device->device moves 2 bytes of
  traffic per byte copied) and of the PCIe link's peak.

On the CPU backend the same stage runs over host pages and NumPy copies and says so.

Memory: the copies hold four buffers of ``--mem-size-mib`` at once (two device buffers, a
pinned and a pageable host one: on the CPU all four are host memory), and on CUDA the page
figures ``--mem-pages`` device pages (on the CPU they map address space only, never touched); a
size whose peak would not fit what the host (and on CUDA the device) has available now is
refused before anything is allocated (:func:`check_room`).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from ..cli.parsing import int_range
from ..memory.pages import PLAIN
from ..memory.provider_host import PAGE_BYTES
from . import common
from .table import human_bytes, table

ALLOC_SIZES = (4 << 10, 1 << 20, 64 << 20)
PCIE_FALLBACK = 64e9  # PCIe Gen5 x16, raw 32 GT/s x 16 lanes / 8
FILL_CHUNK = 64 << 20  # the random fill of the copies' source, a chunk at a time (no full-size temporary)
CHECK_BYTES = 1 << 16  # the bytes compared after the copies
# Besides the buffers: the alloc figures' largest block (arena and np.empty), one fill chunk, the
# compared bytes and the runtime's own pages.
SLACK_BYTES = 2 * ALLOC_SIZES[-1] + FILL_CHUNK + (64 << 20)
OPTIONS = frozenset({"mem_size_mib", "mem_reps", "mem_alloc_reps", "mem_pages"})


def add_arguments(parser) -> None:
    g = parser.add_argument_group("memory stage")
    # Each at least 1, refused at parse time: a clamp would report figures of a size not asked for.
    g.add_argument("--mem-size-mib", type=int_range(1), default=256,
                   help="bytes per bandwidth copy, MiB, >= 1 (default 256); four buffers of it are held at once "
                        "(on CUDA two on the host, two on the device), refused up front where they do not fit")
    g.add_argument("--mem-reps", type=int_range(1), default=20,
                   help="repetitions per bandwidth figure, >= 1 (default 20)")
    g.add_argument("--mem-alloc-reps", type=int_range(1), default=200,
                   help="repetitions per alloc size, >= 1 (default 200)")
    g.add_argument("--mem-pages", type=int_range(1), default=64,
                   help="pages for the page-cost figures, >= 1 (default 64)")


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def page_costs(rt, npages: int) -> dict:
    """Median µs per page for create, map+access, unmap+release on a fresh range."""
    if rt.is_cuda:
        from ..memory.provider_cuda import CudaPageProvider

        p = CudaPageProvider(rt.device.ordinal)
    else:
        from ..memory.provider_host import HostPageProvider

        p = HostPageProvider()
    base = p.reserve(npages * p.page_bytes)
    create, mapping, unmapping, handles = [], [], [], []
    try:
        for i in range(npages):
            t0 = time.perf_counter()
            h, _ = p.create(PLAIN)
            t1 = time.perf_counter()
            handles.append(h)
            addr = base + i * p.page_bytes
            p.map(addr, p.page_bytes, h)
            p.set_access(addr, p.page_bytes)
            t2 = time.perf_counter()
            create.append(t1 - t0)
            mapping.append(t2 - t1)
        for i, h in enumerate(handles):
            t0 = time.perf_counter()
            p.unmap(base + i * p.page_bytes, p.page_bytes)
            p.release(h)
            unmapping.append(time.perf_counter() - t0)
        handles = []
    finally:
        for i, h in enumerate(handles):  # only after a failure midway
            p.unmap(base + i * p.page_bytes, p.page_bytes)
            p.release(h)
        p.free_range(base, npages * p.page_bytes)
    return {"page_bytes": p.page_bytes, "pages": npages, "create_us": _median_us(create),
            "map_access_us": _median_us(mapping), "unmap_release_us": _median_us(unmapping)}


def alloc_latency(rt, reps: int) -> list[dict]:
    """Median µs of nrt.memory.alloc + free per size, beside cuMemAlloc/cuMemFree (or np.empty)."""
    from .. import memory
    from ..driver.calls import call

    rows = []
    for size in ALLOC_SIZES:
        memory.alloc((size,), "uint8").free()  # first touch maps the pages: measure the pool
        a_s, f_s, pa_s, pf_s = [], [], [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            t = memory.alloc((size,), "uint8")
            t1 = time.perf_counter()
            t.free()
            a_s.append(t1 - t0)
            f_s.append(time.perf_counter() - t1)
        for _ in range(reps):
            t0 = time.perf_counter()
            ptr = call("cuMemAlloc", size) if rt.is_cuda else np.empty(size, np.uint8)
            t1 = time.perf_counter()
            if rt.is_cuda:
                call("cuMemFree", ptr)
            del ptr
            pa_s.append(t1 - t0)
            pf_s.append(time.perf_counter() - t1)
        rows.append({"bytes": size, "arena_alloc_us": _median_us(a_s), "arena_free_us": _median_us(f_s),
                     "peer": "cuMemAlloc/cuMemFree" if rt.is_cuda else "np.empty",
                     "peer_alloc_us": _median_us(pa_s), "peer_free_us": _median_us(pf_s)})
    return rows


def pcie_link(rt) -> dict:
    """The link's peak per direction: bus id from cuDeviceGetAttribute, speed/width from sysfs."""
    if not rt.is_cuda:
        return {"peak_bytes_s": None, "source": "CPU backend: no PCIe link"}
    try:
        dom, bus, dev = (rt.device.attribute(f"PCI_{k}_ID") for k in ("DOMAIN", "BUS", "DEVICE"))
        path = f"/sys/bus/pci/devices/{dom:04x}:{bus:02x}:{dev:02x}.0"

        def read(name):
            with open(f"{path}/{name}") as f:
                return f.read().split()[0]

        # The current speed drops while the link idles, so take the link's maximum.
        gts, width = float(read("max_link_speed")), int(read("max_link_width"))
        gen = {2.5: 1, 5.0: 2, 8.0: 3, 16.0: 4, 32.0: 5, 64.0: 6}.get(gts)
        return {"peak_bytes_s": gts * width / 8 * 1e9, "gen": gen, "width": width,
                "source": f"{path} max link: {gts:g} GT/s x{width} (raw, before encoding)"}
    except Exception as exc:  # no sysfs (containers, other OSes) or no attribute
        return {"peak_bytes_s": PCIE_FALLBACK, "gen": 5, "width": 16,
                "source": f"assumed PCIe Gen5 x16 = 64 GB/s (link not readable: {type(exc).__name__})"}


def _time_copy(rt, dst, src, reps: int, wall: bool) -> float:
    """Median seconds per copy: stream events for async copies, host clock for pageable ones."""
    from .. import firmware, memory

    memory.copy(dst, src)  # warm-up
    samples = []
    for _ in range(reps):
        if wall or not rt.is_cuda:
            t0 = time.perf_counter()
            memory.copy(dst, src)
            samples.append(time.perf_counter() - t0)
            continue
        route = {(False, True): "h2d", (True, False): "d2h"}.get((src.device, dst.device), "compute")
        stream = rt.streams[route]
        start, end = firmware.event(), firmware.event()
        start.record(stream)
        memory.copy_async(dst, src, stream)
        end.record(stream)
        end.synchronize()
        samples.append(start.elapsed_ms(end) / 1e3)
    return statistics.median(samples)


def pinned_h2d_rate(rt, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Median bytes/s of a pinned host->device copy of ``nbytes`` (stream events, after a warm-up
    copy): the link rate the KV host tier is read over (the kv stage's denominator)."""
    from .. import memory

    dev = memory.alloc((nbytes,), "uint8", tag="bench")
    pinned = memory.pinned((nbytes,), "uint8", tag="bench")
    try:
        return nbytes / _time_copy(rt, dev, pinned, reps, wall=False)
    finally:
        dev.free()
        pinned.free()


def _fill_random(out: np.ndarray, chunk: int = FILL_CHUNK) -> None:
    """Fill the uint8 array ``out`` with seeded random bytes in place, ``chunk`` bytes at a time,
    so no temporary of the full size is made."""
    rng = np.random.default_rng(0)
    flat = out.reshape(-1)
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk]
        part[...] = rng.integers(0, 256, part.size, dtype=np.uint8)


def memory_need(is_cuda: bool, nbytes: int, npages: int, page_bytes: int = PAGE_BYTES) -> dict:
    """Peak bytes the stage holds: ``{"host": ..., "device": ...}`` (device 0 on the CPU, where
    everything is host memory). The copies' four buffers of ``nbytes`` (two device, one pinned,
    one pageable) are held at once; on CUDA the page figures map ``npages`` device pages and give
    them back before the copies start, so the device's peak is the larger of the two (the CPU's
    host pages are address space the figures never touch); :data:`SLACK_BYTES` besides."""
    if is_cuda:
        return {"host": 2 * nbytes + SLACK_BYTES, "device": max(2 * nbytes, npages * page_bytes) + SLACK_BYTES}
    return {"host": 4 * nbytes + SLACK_BYTES, "device": 0}


def check_room(is_cuda: bool, size_mib: int, npages: int, host: tuple[int, str],
               device: tuple[int, str] | None = None) -> None:
    """Refuse (ValueError naming --mem-size-mib, and on the device --mem-pages) a run whose peak
    does not fit ``host`` (bytes, where that figure came from), or on CUDA ``device``, available now."""
    need = memory_need(is_cuda, size_mib << 20, npages)
    if not is_cuda:
        _refuse_past(need["host"], host, f"--mem-size-mib {size_mib} (four buffers of {size_mib} MiB on the CPU "
                                         "backend: two arena, one pinned, one pageable)", "host", 4)
        return
    _refuse_past(need["host"], host, f"--mem-size-mib {size_mib} (a pinned and a pageable host buffer of "
                                     f"{size_mib} MiB)", "host", 2)
    if device is not None:
        pages = npages * PAGE_BYTES
        if pages > 2 * (size_mib << 20):
            _refuse_past(need["device"], device, f"--mem-pages {npages} ({npages} pages of {PAGE_BYTES >> 20} MiB)",
                         "device", 2, pages, verb="need")
        else:
            _refuse_past(need["device"], device, f"--mem-size-mib {size_mib} (two device buffers of {size_mib} MiB)",
                         "device", 2, pages)


def _refuse_past(need: int, available: tuple[int, str], what: str, where: str, buffers: int, pages: int = 0,
                 verb: str = "needs") -> None:
    """:func:`.common.check_memory`, with the hint worked out: the largest --mem-size-mib that fits
    (``buffers`` of it), or fewer --mem-pages where ``pages`` bytes bind."""
    free = available[0]
    fits = (free - SLACK_BYTES) // (buffers << 20)
    hint = ("give fewer --mem-pages" if pages + SLACK_BYTES > free else
            f"give --mem-size-mib {fits} or less" if fits >= 1 else "free some memory first")
    common.check_memory(need, what, hint, available, where, verb)


def bandwidth(rt, nbytes: int, reps: int, pcie: dict) -> list[dict]:
    from .. import memory

    peak = rt.profile.peak_bandwidth_bytes_s or None
    made = []
    try:  # the room was checked (check_room); one that still fails is said with the flag, nothing kept
        for make in (lambda: memory.alloc((nbytes,), "uint8", tag="bench"),
                     lambda: memory.alloc((nbytes,), "uint8", tag="bench"),
                     lambda: memory.pinned((nbytes,), "uint8", tag="bench"),
                     lambda: memory.alloc((nbytes,), "uint8", device=False, tag="bench")):
            made.append(make())
    except MemoryError as exc:
        for t in made:
            t.free()
        raise ValueError(f"--mem-size-mib {nbytes >> 20}: buffer {len(made) + 1} of 4 did not fit ({exc})") from None
    dev_a, dev_b, pinned, pageable = made
    rows = []
    try:
        _fill_random(pinned.array)
        pageable.array[...] = pinned.array
        cases = [("host->device (pinned)", dev_a, pinned, False, "pcie"),
                 ("host->device (pageable)", dev_a, pageable, True, "pcie"),
                 ("device->host (pinned)", pinned, dev_a, False, "pcie"),
                 ("device->host (pageable)", pageable, dev_a, True, "pcie"),
                 ("device->device", dev_b, dev_a, False, "memory")]
        for name, dst, src, wall, bound in cases:
            s = _time_copy(rt, dst, src, reps, wall)
            traffic = nbytes * (2 if bound == "memory" else 1)
            rows.append({
                "copy": name, "bytes": nbytes, "seconds": s, "gb_s": nbytes / s / 1e9,
                "traffic_gb_s": traffic / s / 1e9,
                "timing": "host clock" if wall or not rt.is_cuda else "stream events",
                "of_peak_bandwidth": traffic / s / peak if peak else None,
                "of_pcie": nbytes / s / pcie["peak_bytes_s"] if bound == "pcie" and pcie["peak_bytes_s"] else None,
            })
        check = min(CHECK_BYTES, nbytes)  # a view's copy: not a host copy of the whole buffer
        if dev_b[:check].to_numpy().tobytes() != pinned.array[:check].tobytes():
            raise RuntimeError("bandwidth copies did not reproduce the data")
    finally:
        for t in (dev_a, dev_b, pinned, pageable):
            t.free()
    return rows


def run(args) -> dict:
    from .. import firmware

    firmware.init(profile=args.profile, backend=args.backend)
    rt = firmware.runtime()
    device = None
    if rt.is_cuda:
        from ..engine.fit import cuda_available

        device = cuda_available()
    check_room(rt.is_cuda, args.mem_size_mib, args.mem_pages, common.host_available(), device)  # before any work
    nbytes = args.mem_size_mib << 20  # >= 1: checked by the parser
    pcie = pcie_link(rt)
    result = {
        "backend": rt.backend,
        "device": rt.profile.device_name,
        "label": ("device figures" if rt.is_cuda else
                  "CPU figures: host pages (mmap) and NumPy copies, not a GPU measurement"),
        "peak_bandwidth_bytes_s": rt.profile.peak_bandwidth_bytes_s or None,
        "peak_bandwidth_source": rt.profile.peak_bandwidth_source,
        "pcie": pcie,
        "pages": page_costs(rt, args.mem_pages),
        "alloc": alloc_latency(rt, args.mem_alloc_reps),
        "bandwidth": bandwidth(rt, nbytes, args.mem_reps, pcie),
    }
    if any((b["of_pcie"] or 0) > 1.0 for b in result["bandwidth"]):
        pcie["note"] = "a copy ran faster than this link's peak: the link figure is wrong for this machine"
    return result


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render(r: dict) -> str:
    pg = r["pages"]
    out = [f"NexusRT memory — {r['device']} ({r['label']})",
           table(["page operation", f"µs per {human_bytes(pg['page_bytes'])} page (median of {pg['pages']})"],
                 [["create", pg["create_us"]], ["map + access", pg["map_access_us"]],
                  ["unmap + release", pg["unmap_release_us"]]])]
    out.append(table(["size", "arena alloc µs", "arena free µs", "peer", "peer alloc µs", "peer free µs"],
                     [[human_bytes(a["bytes"]), a["arena_alloc_us"], a["arena_free_us"], a["peer"],
                       a["peer_alloc_us"], a["peer_free_us"]] for a in r["alloc"]]))
    out.append(table(["copy", "GB/s", "% of peak BW", "% of PCIe", "timing"],
                     [[b["copy"], b["gb_s"], _pct(b["of_peak_bandwidth"]), _pct(b["of_pcie"]), b["timing"]]
                      for b in r["bandwidth"]]))
    peak = r["peak_bandwidth_bytes_s"]
    out.append(f"peak bandwidth: {peak / 1e12:.2f} TB/s ({r['peak_bandwidth_source']}); "
               "device->device counts read + write traffic" if peak else "peak bandwidth: not known on this backend")
    out.append(f"PCIe: {r['pcie']['source']}" + (f" — {r['pcie']['note']}" if r["pcie"].get("note") else ""))
    return "\n\n".join(out)
