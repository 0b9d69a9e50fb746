"""``nexusrt-bench --stage kernels``: each decode kernel alone, as GB/s and % of measured bandwidth.

Cases come from ``bench_cases(rt, config)`` of EVERY module in :mod:`nexusrt.kernels.ops`
that defines it. Each case is timed alone: ``k`` back-to-back launches (rotating among
copies of the weights that span several L2 sizes, so DRAM and not the cache is measured)
are captured into one CUDA graph, as a decode step runs them; the graph is replayed
between two CUDA events after a warm-up, and the median over the repeats, divided by
``k``, is the kernel's time. The read bandwidth of the membw probe, measured in the same
run, is the denominator of the "% BW" column.
"""

from __future__ import annotations

import importlib
import pkgutil
import statistics
import time

from ..cli.parsing import int_range
from . import kernels_persistent
from .common import add_model_argument, resolve_model_config
from .table import table

WARMUP = 3
MIN_LAUNCHES_PER_GRAPH = 20
MIN_REPEATS = 20
# The options this stage reads (nexusrt-bench refuses them with another stage; see main's docstring).
OPTIONS = frozenset({"model", "kernel_filter", "kernel_repeats"})


def add_arguments(parser) -> None:
    add_model_argument(parser)
    parser.add_argument("--kernel-filter", default="", metavar="TEXT",
                        help="kernels stage: only cases whose name contains TEXT (the persistent kernel's phase "
                             f"table is named '{kernels_persistent.NAME}')")
    # At least 20, refused at parse time (it was raised to 20 without a word).
    parser.add_argument("--kernel-repeats", type=int_range(MIN_REPEATS), default=30, metavar="R",
                        help=f"kernels stage: timed graph replays per case, median reported, >= {MIN_REPEATS} "
                             "(default 30)")


def case_factories() -> list[tuple[str, object]]:
    """(module name, bench_cases) for every ops module that defines ``bench_cases``."""
    from ..kernels import ops

    found = []
    for info in sorted(pkgutil.iter_modules(ops.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{ops.__name__}.{info.name}")
        fn = getattr(module, "bench_cases", None)
        if callable(fn):
            found.append((info.name, fn))
    return found


def launches_per_graph(copies: int, minimum: int = MIN_LAUNCHES_PER_GRAPH) -> int:
    """A multiple of ``copies`` (every copy equally often) of at least ``minimum`` launches."""
    copies = max(1, int(copies))
    return copies * -(-minimum // copies)


def time_case(rt, case, repeats: int) -> dict:
    """Median microseconds per launch of ``case`` (see the module docstring)."""
    from ..driver.calls import call, cu
    from ..driver.streams import Event

    stream = rt.streams["compute"]
    copies = getattr(case.launch, "copies", None) or max(
        [int(v) for key, v in case.notes.items() if key.endswith("copies") and isinstance(v, int)] or [1])
    k = launches_per_graph(copies)
    case.launch(stream)  # first launch outside capture: loads the module, surfaces errors plainly
    stream.synchronize()
    mode = cu().CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
    call("cuStreamBeginCapture", stream.handle, mode)
    try:
        for _ in range(k):
            case.launch(stream)
    finally:
        graph = call("cuStreamEndCapture", stream.handle)
    gexec = call("cuGraphInstantiate", graph, 0)
    start, stop = Event("cuda"), Event("cuda")
    try:
        samples = []
        for i in range(WARMUP + repeats):
            start.record(stream)
            call("cuGraphLaunch", gexec, stream.handle)
            stop.record(stream)
            stop.synchronize()
            if i >= WARMUP:
                samples.append(start.elapsed_ms(stop) * 1e3 / k)
    finally:
        start.destroy()
        stop.destroy()
        call("cuGraphExecDestroy", gexec)
        call("cuGraphDestroy", graph)
    return {"us": statistics.median(samples), "us_min": min(samples), "launches_per_graph": k}


def summarise(case, timing: dict, bandwidth: float) -> dict:
    """One result row: bytes, time, GB/s, % of the measured read bandwidth (and TFLOP/s if known)."""
    secs = timing["us"] * 1e-6
    row = {
        "name": case.name,
        "group": case.group,
        "bytes": int(case.bytes_moved),
        "us": timing["us"],
        "us_min": timing["us_min"],
        "gb_s": case.bytes_moved / secs / 1e9,
        "pct_bw": 100.0 * case.bytes_moved / secs / bandwidth if bandwidth else None,
        "notes": {k: v for k, v in case.notes.items() if not k.startswith("_")},
    }
    if "flops" in case.notes:
        row["tflops"] = case.notes["flops"] / secs / 1e12
    return row


def _free(cases) -> None:
    """Give back every tensor the cases kept alive (each once)."""
    seen = set()

    def walk(obj):
        if isinstance(obj, (list, tuple)):
            for o in obj:
                walk(o)
        elif obj is not None and hasattr(obj, "free") and id(obj) not in seen:
            seen.add(id(obj))
            try:
                obj.free()
            except Exception:  # already freed elsewhere: nothing left to give back
                pass

    for case in cases:
        walk(case.notes.get("_keep"))


def run(args) -> dict:
    from .. import firmware

    firmware.init(profile=args.profile, backend=args.backend)
    rt = firmware.runtime()
    model = getattr(args, "model", None) or "synthetic:llama-3.2-1b"
    config = resolve_model_config(model)  # an unknown name fails on any backend
    if not rt.is_cuda:
        return {"backend": rt.backend, "model": model,
                "message": "the kernels stage needs the CUDA backend (no GPU answered: "
                           f"{rt.probe_reason or 'cpu backend'}); nothing was measured"}
    from ..kernels.ops.membw import measure_read_bandwidth

    repeats = max(20, int(getattr(args, "kernel_repeats", 30)))
    wanted = getattr(args, "kernel_filter", "") or ""
    t0 = time.perf_counter()
    bandwidth = measure_read_bandwidth(rt)
    rows, errors = [], []
    for module, factory in case_factories():
        try:
            cases = factory(rt, config)
        except Exception as exc:  # one module's failure must not hide the others' numbers
            errors.append(f"{module}.bench_cases: {type(exc).__name__}: {exc}")
            continue
        try:
            for case in cases:
                if wanted and wanted not in case.name:
                    continue
                try:
                    rows.append(summarise(case, time_case(rt, case, repeats), bandwidth))
                except Exception as exc:
                    errors.append(f"{case.name}: {type(exc).__name__}: {exc}")
        finally:
            rt.device.synchronize()
            _free(cases)
    persistent = None
    if kernels_persistent.wanted(wanted):
        try:
            persistent = kernels_persistent.measure(rt, model)
        except Exception as exc:  # reported beside the kernels' numbers, which stand
            errors.append(f"{kernels_persistent.NAME}: {type(exc).__name__}: {exc}")
    p = rt.profile
    return {"backend": "cuda", "device": p.device_name, "arch": p.arch, "model": model,
            "read_bandwidth_bytes_s": bandwidth, "peak_bandwidth_bytes_s": p.peak_bandwidth_bytes_s,
            "l2_bytes": p.l2_bytes, "repeats": repeats, "cases": rows, "persistent": persistent, "errors": errors,
            "wall_s": time.perf_counter() - t0}


def render(r: dict) -> str:
    if r.get("backend") != "cuda":
        return f"nexusrt-bench kernels: {r.get('message', 'needs the CUDA backend')}"
    bw = r["read_bandwidth_bytes_s"]
    lines = [f"device {r['device']} ({r['arch']}), model {r['model']}",
             f"measured read bandwidth (membw probe, median): {bw / 1e12:.3f} TB/s"
             + (f" = {100 * bw / r['peak_bandwidth_bytes_s']:.1f}% of the {r['peak_bandwidth_bytes_s'] / 1e12:.2f} TB/s "
                "peak" if r.get("peak_bandwidth_bytes_s") else ""),
             f"each kernel: median of {r['repeats']} graph replays of back-to-back launches, "
             "weights rotated past the L2"]
    for e in r.get("errors", []):
        lines.append(f"ERROR {e}")
    rows = []
    for c in r["cases"]:
        pct = c["pct_bw"]
        rows.append([c["group"], c["name"], c["bytes"] / 1e6, c["us"], c["gb_s"],
                     f"{pct:.1f}%" if pct is not None else "-",
                     f"{c['tflops']:.1f}" if "tflops" in c else "", c["notes"].get("splits", "")])
    headers = ["group", "kernel", "MB", "us", "GB/s", "% BW", "TFLOP/s", "split-K"]
    lines.append("")
    lines.append(table(headers, rows, title="Kernels alone (% BW = bytes / time / measured read bandwidth)"))
    if r.get("persistent"):
        lines.append("")
        lines.append(kernels_persistent.render(r["persistent"], r["cases"], bw))
    return "\n".join(lines)
