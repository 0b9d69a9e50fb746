"""``nexusrt-bench --stage scheduler``: what one stage costs to submit, replay and gate.

Every figure is a median over repeats of many launches of an empty kernel, measured here:

- direct launch: ``Kernel.launch`` with a prebuilt ArgPack, then a stream synchronise, per launch;
- scheduler stage: a validated plan of such stages enqueued through the scheduler, per stage;
- graph node: a captured graph of such stages replayed with one ``cuGraphLaunch``, per node;
- doorbell round trip: the host rings, the gated stream proceeds, the host sees the stage done.

When torch is importable the same run measures the smallest PyTorch op launch (eager, and
as a node of a ``torch.cuda.CUDAGraph``) and reports ratios. On the CPU backend the stages
run the CPU path (Python callables) and every figure is labelled CPU.
"""

from __future__ import annotations

import statistics
import time

from ..cli.parsing import int_range
from .table import table

# The options this stage reads (nexusrt-bench refuses them with another stage; see main's docstring).
OPTIONS = frozenset({"scheduler_launches", "scheduler_repeats"})


def add_arguments(parser) -> None:
    # At least 1 each, refused at parse time (a clamp reported "1 launches" for -5).
    parser.add_argument("--scheduler-launches", type=int_range(1), default=200, metavar="N",
                        help="scheduler stage: launches (graph nodes) per timed repeat, >= 1 (default 200)")
    parser.add_argument("--scheduler-repeats", type=int_range(1), default=30, metavar="R",
                        help="scheduler stage: timed repeats, >= 1; the median is reported (default 30)")


def _median_us(fn, per: int, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) / per)
    return statistics.median(times) * 1e6


def run(args) -> dict:
    from .. import firmware, scheduler

    n = int(getattr(args, "scheduler_launches", 200))  # >= 1: checked by the parser
    reps = int(getattr(args, "scheduler_repeats", 30))
    dev = firmware.init(profile=getattr(args, "profile", "auto"), backend=getattr(args, "backend", None))
    rt = firmware.runtime()
    sched = scheduler.current("nexusrt-bench --stage scheduler")
    rows = _cuda_rows(rt, sched, n, reps) if rt.is_cuda else _cpu_rows(rt, sched, n, reps)
    peer = _torch_peer(rt.is_cuda, n, reps)
    ratios = {}
    for row in rows:
        ref = peer.get(row["peer"]) if row.get("peer") else None
        row["vs_torch"] = row["us"] / ref if ref else None
        if ref:
            ratios[row["key"]] = row["vs_torch"]
    return {
        "backend": rt.backend,
        "label": f"CUDA ({dev.profile.device_name})" if rt.is_cuda else "CPU (NumPy path; not GPU figures)",
        "launches_per_repeat": n,
        "repeats": reps,
        "rows": rows,
        "torch": peer,
        "ratios": ratios,
    }


def _cuda_rows(rt, sched, n: int, reps: int) -> list[dict]:
    from ..kernels.ops.spec import LaunchSpec

    k = rt.kernels.get("selftest", "empty_kernel", "")
    spec = LaunchSpec(k, (1, 1, 1), (1, 1, 1), k.pack(), 0, "empty")
    stream = rt.streams["compute"]

    def direct():
        for _ in range(n):
            k.launch((1, 1, 1), (1, 1, 1), spec.args, stream)
        stream.synchronize()

    labels = ("direct launch (cuLaunchKernel + ArgPack)", "scheduler stage (validated plan, enqueue)",
              "node of a replayed CUDA graph", "doorbell round trip (host ring -> stream -> host sees it)")
    # The sleep lets the stream reach its doorbell wait, so only the round trip is timed.
    return _rows(sched, spec, direct, stream.synchronize, labels, n, reps, settle_s=20e-6)


def _cpu_rows(rt, sched, n: int, reps: int) -> list[dict]:
    def noop():
        return None

    def direct():
        for _ in range(n):
            noop()

    labels = ("CPU: direct Python call", "CPU: scheduler stage (queue + barrier)",
              "CPU: stage of a replayed captured plan", "CPU: doorbell round trip (ring -> gated stage runs -> barrier)")
    return _rows(sched, noop, direct, sched.wait_barrier, labels, n, reps, settle_s=0)


def _rows(sched, kernel, direct, sync, labels, n: int, reps: int, settle_s: float) -> list[dict]:
    """Time ``direct``, the same kernel as scheduler stages, as graph nodes, and behind a doorbell."""
    from .. import firmware, scheduler

    graph = scheduler.graph([scheduler.stage(f"bench.k{i}", kernel=kernel) for i in range(n)], "bench")
    plan = sched.plan(graph)

    def staged():
        sched.enqueue(plan)
        sync()

    captured = scheduler.capture(graph)

    def replay():
        captured.replay()
        sync()

    bell = firmware.doorbell("bench.doorbell")
    gated = sched.plan(scheduler.stage("bench.gated", kernel=kernel, gate=bell))

    def round_trip():
        sched.enqueue(gated)
        if settle_s:
            time.sleep(settle_s)
        t0 = time.perf_counter()
        bell.ring()
        sched.wait_barrier("bench.gated", timeout_ms=5000)
        return time.perf_counter() - t0

    rows = [_row("direct", labels[0], _median_us(direct, n, reps), "eager"),
            _row("stage", labels[1], _median_us(staged, n, reps), "eager"),
            _row("graph_node", labels[2], _median_us(replay, n, reps), "graph_node")]
    for _ in range(5):
        round_trip()
    trips = [round_trip() for _ in range(max(reps, 50))]
    rows.append(_row("doorbell", labels[3], statistics.median(trips) * 1e6, None))
    captured.close()
    return rows


def _row(key: str, what: str, us: float, peer: str | None) -> dict:
    return {"key": key, "what": what, "us": us, "peer": peer}


def _torch_peer(cuda: bool, n: int, reps: int) -> dict:
    """The smallest PyTorch op, eager and (on CUDA) as a CUDA-graph node, per launch in µs."""
    try:
        import torch
    except Exception as exc:  # torch is optional: the peer is reported when it imports
        return {"available": False, "reason": f"torch not importable: {exc}"}
    if cuda and not torch.cuda.is_available():
        return {"available": False, "reason": "torch has no CUDA here"}
    device = "cuda" if cuda else "cpu"
    x = torch.zeros(1, device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def eager():
        for _ in range(n):
            x.add_(1)
        sync()

    out = {"available": True, "version": torch.__version__, "op": f"x.add_(1) on one {device} float",
           "eager": _median_us(eager, n, reps)}
    if cuda:
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            eager()  # warm up on a side stream before capture, as PyTorch asks
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                x.add_(1)

        def replay():
            g.replay()
            sync()

        out["graph_node"] = _median_us(replay, n, reps)
    return out


def render(r: dict) -> str:
    rows = []
    for row in r["rows"]:
        ratio = "-" if row["vs_torch"] is None else f"{row['vs_torch']:.2f}x"
        rows.append([row["what"], row["us"], ratio])
    out = [table(["per stage", "µs (median)", "vs PyTorch"], rows,
                 title=f"NexusRT scheduler — {r['label']}, {r['launches_per_repeat']} launches x "
                       f"{r['repeats']} repeats")]
    t = r["torch"]
    if t.get("available"):
        peer = [["eager", t["eager"]]] + ([["CUDA graph node", t["graph_node"]]] if "graph_node" in t else [])
        out.append(table(["PyTorch " + t["version"] + ": " + t["op"], "µs (median)"], peer))
    else:
        out.append(f"PyTorch peer: {t['reason']}")
    return "\n\n".join(out)
