"""``nexusrt-bench --stage decode --tensor-parallel N``: the decode stage over N ranks, beside TP=1.

The same decode as the one-device stage (batch 1, ``--prompt-tokens``, ``--new-tokens``, one
warm-up then the median of ``--runs``), timed on ``nrt.LLM(model, tensor_parallel=N)`` and then,
in the same process, on the plain one-device runner; both are printed with their ratio
(TP=N ÷ TP=1) and issue 17's target where one applies to the shape and degree. On CUDA
the ranks are one worker process per GPU (NCCL); on the CPU they run in this process, or
one worker process each with ``--tp-processes``, as ``nrt.LLM`` runs them.

**Floor at TP=N**: one rank's bytes per token (:func:`.decode_timing.bytes_per_token` with N:
about the weights ÷ N plus its own KV heads) ÷ the read bandwidth measured in the same run
(CUDA: the membw probe on the front's GPU, device 0, which is rank 0's; the CPU: NumPy's read
rate of a large buffer, a check of the arithmetic rather than a bound, since the ranks share
the host's memory). TP=1 gets its own floor from the whole model's bytes.

**All-reduce time per token**: after the TP=N runs every rank times one decode step's
collectives alone (``collective_times``: the ``2 x layers`` all-reduces of a hidden row, and on
CUDA and in process the LM head's gather), :data:`COLLECTIVE_STEPS` steps; each rank's median,
the slowest rank's reported. It is what the collectives cost with nothing else running, not
their share inside the step, where they also wait for the slowest rank's kernels.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import numpy as np

from ..models.presets import preset
from .common import resolve_model_config
from . import decode_timing
from .decode_timing import bytes_per_token, pick_text, time_generation
from .table import table

COLLECTIVE_STEPS = 20  # steps of collectives each rank times; the median is its figure
HOST_PROBE_BYTES = 256 << 20  # the CPU read probe's buffer: past the caches of most hosts
# The options this half reads (the decode stage declares them: nexusrt-bench refuses them elsewhere).
OPTIONS = frozenset({"tensor_parallel", "tp_processes"}) | decode_timing.OPTIONS
# Issue 17's targets: (preset whose shape, degree) -> (kind, bound).
TARGETS = {("llama-3.1-8b", 2): ("ratio", 0.6), ("llama-3.1-70b", 4): ("floor", 0.8),
           ("llama-3.1-70b", 8): ("report", None)}
_SHAPE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "head_dim", "vocab_size")


def add_arguments(parser) -> None:
    """``--tensor-parallel N`` and ``--tp-processes`` (the decode stage registers them)."""
    parser.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                        help="decode stage: also time the model split over N ranks (CUDA: one worker process per "
                             "GPU, NCCL; CPU: in this process, or --tp-processes) beside TP=1 in the same run: both "
                             "ms/token and their ratio, the floor of one rank's bytes, the all-reduce time per token "
                             "(default 1: one device only)")
    parser.add_argument("--tp-processes", action="store_true",
                        help="decode stage on the CPU, with --tensor-parallel N: one worker process per rank (on "
                             "CUDA every rank is a worker process already: the flag changes nothing there)")


def validate(args, explicit_paths: list[str] | None) -> None:
    """Refuse what cannot work, before any work: a degree below 1, ``--tp-processes`` without a
    degree, and with N > 1 anything that asks for the persistent kernel (a tensor-parallel rank
    keeps the graph path: the persistent kernel has no collectives). ``explicit_paths``: the
    ``--decode-paths`` the user gave, None for the default."""
    from ..backends.cuda.persistent import ENV, decode_mode

    n = 1 if args.tensor_parallel is None else args.tensor_parallel
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--tensor-parallel must be an integer >= 1, got {n!r}")
    args.tensor_parallel = n
    if getattr(args, "tp_processes", False) and n == 1:
        raise ValueError("--tp-processes runs the ranks of --tensor-parallel N (N > 1) in worker processes; "
                         "give --tensor-parallel N too")
    if n == 1:
        return
    why = "a tensor-parallel rank keeps the graph path (the persistent kernel has no collectives)"
    if explicit_paths and "persistent" in explicit_paths:
        raise ValueError(f"--decode-paths persistent with --tensor-parallel {n}: {why}; give --decode-paths graph "
                         "or leave it out")
    if decode_mode() == "persistent":
        raise ValueError(f"{ENV}=persistent with --tensor-parallel {n}: {why}; unset it or set {ENV}=graph")
    if getattr(args, "persistent_profile", False):
        raise ValueError(f"--persistent-profile profiles the one-GPU persistent kernel; {why}: run it without "
                         "--tensor-parallel")


def check_degree(rt, cfg, n: int) -> None:
    """Refuse a degree this model or machine cannot run, before anything loads: the plan's
    divisibility (heads, KV heads, vocabulary, MLP width), and on CUDA a rank's shape the
    kernels refuse and more ranks than GPUs (the refusals of ``ProcessRunner``, reused)."""
    if rt.is_cuda:
        from ..backends.cuda.tp_front import check_ranks

        check_ranks(cfg, n)
    else:
        from ..parallel import ShardPlan

        ShardPlan(cfg, n)


def run(args, rt, model: str, note: str, prompt) -> dict:
    """The TP=N and TP=1 decode of ``model`` (already resolved for this backend) on ``prompt``,
    their floors and the collectives' time; the JSON result :func:`render` prints."""
    n = args.tensor_parallel
    check_degree(rt, resolve_model_config(model), n)
    measured = {}

    def time_collectives(llm):
        measured["collectives"] = collective_timer(llm.runner)(COLLECTIVE_STEPS)

    # TP=N first: its workers exit before the one-device runner takes device 0's memory.
    cfg, runs, load_s, _ = time_generation(model, prompt, args, f"TP={n}", inspect=time_collectives,
                                           tensor_parallel=n, tp_processes=bool(args.tp_processes))
    try:
        _, runs1, load1, _ = time_generation(model, prompt, args, "TP=1")
        tp1 = {**_figures(runs1), "load_s": load1}
    except MemoryError as exc:  # ModelTooLarge, or the arena's OutOfMemory: a shape one device cannot
        tp1 = {"skipped": str(exc)}  # hold (70B on one H200) is said, and the TP=N figures still print
    if rt.is_cuda:
        from ..kernels.ops.membw import measure_read_bandwidth

        bw, bw_how = measure_read_bandwidth(rt), "membw probe on device 0, rank 0's GPU"
    else:
        bw, bw_how = host_read_bandwidth(), f"NumPy sum of {HOST_PROBE_BYTES >> 20} MiB on the host"
    elem = 2 if rt.is_cuda else 4  # bf16 on CUDA; the CPU runner keeps fp32 weights and KV
    context = args.prompt_tokens + args.new_tokens / 2
    whole, rank = bytes_per_token(cfg, context, 1, elem), bytes_per_token(cfg, context, n, elem)
    tpn = _figures(runs)
    ms = tpn["ms_per_token"]
    floor_ms = rank["total"] / bw * 1e3
    if not rt.is_cuda:
        note = "; ".join(filter(None, [note, "CPU floor: the ranks share this host's memory (in process they run "
                                             "one after another), so it checks the arithmetic, it bounds nothing"]))
    result = {
        "backend": rt.backend, "device": rt.profile.device_name, "profile": rt.profile.name, "model": model,
        "note": note, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
        "sampling": dataclasses.asdict(args.sampling), "tensor_parallel": n, "tp_how": _how(rt, n, args.tp_processes),
        "load_s": load_s, **tpn, "tokens_per_s": 1e3 / ms,
        "elem_bytes": elem, "bytes_per_token": whole, "bytes_per_rank": rank, "achieved_bytes_s": rank["total"] / (ms / 1e3),
        "read_bandwidth_bytes_s": bw, "read_bandwidth_how": bw_how, "floor_ms": floor_ms,
        "fraction_of_floor": floor_ms / ms, "tp1": tp1,
        "collectives": collective_figures(measured["collectives"], ms),
    }
    if "ms_per_token" in tp1:
        tp1["floor_ms"] = whole["total"] / bw * 1e3
        tp1["fraction_of_floor"] = tp1["floor_ms"] / tp1["ms_per_token"]
        result["tp_ratio"] = ms / tp1["ms_per_token"]
    result["target"] = target(cfg, n, result.get("tp_ratio"), result["fraction_of_floor"])
    return result


def _figures(runs: list[dict]) -> dict:
    return {"ms_per_token": statistics.median(r["ms_per_token"] for r in runs),
            "ms_per_token_runs": [r["ms_per_token"] for r in runs],
            "ttft_s": statistics.median(r["ttft_s"] for r in runs)}


def _how(rt, n: int, processes: bool) -> str:
    if rt.is_cuda:
        return f"{n} ranks: one worker process per GPU, NCCL"
    if processes:
        return f"{n} ranks: one worker process each, all-reduces through shared memory"
    return f"{n} ranks in this process, summed in rank order"


def collective_timer(runner):
    """The ``collective_times(repeats)`` of a tensor-parallel runner: the CUDA front's own
    (``ProcessRunner``), or the CPU runner's decoder's (in process or worker processes)."""
    for obj in (runner, getattr(runner, "decoder", None)):
        timer = getattr(obj, "collective_times", None)
        if timer is not None:
            return timer
    raise RuntimeError(f"{type(runner).__name__} times no collectives: it is not a tensor-parallel runner")


def collective_figures(entries: list[dict], ms_per_token: float) -> dict:
    """The per-token figure of the ranks' ``collective_times`` answers: each rank's median step,
    the slowest rank's (every rank waits for it), and its share of the TP=N token."""
    per_rank = [statistics.median(e["step_s"]) for e in entries]
    worst = max(per_rank)
    first = entries[0]
    return {"per_token_s": worst, "per_rank_s": per_rank, "ranks": [e["rank"] for e in entries],
            "all_reduces": first["all_reduces"], "all_gathers": first["all_gathers"], "steps": len(first["step_s"]),
            "clock": first["clock"], "share_of_token": worst * 1e3 / ms_per_token}


def shape_of(cfg) -> str | None:
    """The preset whose shape ``cfg`` has (a checkpoint of that model, or its synthetic twin), or None."""
    for name in sorted({name for name, _ in TARGETS}):
        ref = preset(name)
        if all(getattr(cfg, f) == getattr(ref, f) for f in _SHAPE):
            return name
    return None


def target(cfg, n: int, ratio: float | None, fraction: float) -> dict:
    """Issue 17's target for this shape at degree ``n``: ``{"text", "met"}`` (met None: no
    target, or not judged because TP=1 did not run)."""
    name = shape_of(cfg)
    rule = TARGETS.get((name, n))
    shape = f"the {name.replace('llama', 'Llama')} shape" if name else None
    if rule is None:
        return {"text": f"none for this shape at TP={n} (issue 17: Llama-3.1-8B at TP=2 <= 0.6x TP=1; "
                        "Llama-3.1-70B at TP=4 >= 80% of its floor, TP=8 reported)", "met": None}
    kind, bound = rule
    if kind == "report":
        return {"text": f"TP={n} at {shape}: reported, no target (issue 17)", "met": None}
    if kind == "floor":
        met = fraction >= bound
        return {"text": f">= {bound:.0%} of the TP={n} floor at {shape} (issue 17): "
                        f"{'met' if met else 'not met'} ({fraction:.1%})", "met": met}
    if ratio is None:
        return {"text": f"TP={n} <= {bound:.2f}x TP=1 at {shape} (issue 17): not judged, TP=1 did not run",
                "met": None}
    met = ratio <= bound
    return {"text": f"TP={n} <= {bound:.2f}x TP=1 at {shape} (issue 17): {'met' if met else 'not met'} "
                    f"({ratio:.3f}x)", "met": met}


def host_read_bandwidth(nbytes: int = HOST_PROBE_BYTES, repeats: int = 5) -> float:
    """Bytes/s at which NumPy reads (sums) a buffer of ``nbytes``, the median of ``repeats`` passes
    after one: the CPU's stand-in for the membw probe, measured in the same run."""
    buf = np.ones(nbytes // 4, np.float32)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        np.add.reduce(buf)
        if i:
            times.append(time.perf_counter() - t0)
    return buf.nbytes / statistics.median(times)


def _runs(r: dict) -> str:
    return f"{r['ms_per_token']:.4f}  (runs: {', '.join(f'{x:.3f}' for x in r['ms_per_token_runs'])})"


def render(r: dict) -> str:
    """The TP=N result as a table: both rows, their ratio, the target, floors and collectives."""
    n, tp1, c = r["tensor_parallel"], r["tp1"], r["collectives"]
    rows = [["model", r["model"]], ["device", f"{r['device']} ({r['backend']}, profile {r['profile']})"],
            ["shape", f"batch 1, prompt {r['prompt_tokens']}, {r['new_tokens']} new tokens, median of {r['runs']}"],
            ["pick", pick_text(r.get("sampling"))], ["tensor parallel", r["tp_how"]],
            [f"ms / token (TP={n})", _runs(r)]]
    if "ms_per_token" in tp1:
        rows += [["ms / token (TP=1)", _runs(tp1)], [f"TP={n} / TP=1", f"{r['tp_ratio']:.3f}x"]]
    else:
        rows += [["ms / token (TP=1)", f"not run: {tp1['skipped']}"], [f"TP={n} / TP=1", "-"]]
    rows.append(["target", r["target"]["text"]])
    rows += [[f"tokens / s (TP={n})", f"{r['tokens_per_s']:.1f}"],
             ["TTFT", f"{r['ttft_s'] * 1e3:.2f} ms at TP={n}"
                      + (f", {tp1['ttft_s'] * 1e3:.2f} ms at TP=1" if "ttft_s" in tp1 else "")],
             ["bytes / token", f"{r['bytes_per_token']['total'] / 1e9:.3f} GB in all; "
                               f"{r['bytes_per_rank']['total'] / 1e9:.3f} GB per rank (its weights and KV heads; "
                               f"{'bf16' if r['elem_bytes'] == 2 else 'fp32, as the CPU runner holds them'})"],
             ["achieved / rank", f"{r['achieved_bytes_s'] / 1e9:.{0 if r['achieved_bytes_s'] >= 1e10 else 2}f} GB/s"],
             ["read BW (measured)", f"{r['read_bandwidth_bytes_s'] / 1e9:.0f} GB/s ({r['read_bandwidth_how']})"],
             [f"floor (TP={n})", f"{r['floor_ms']:.4f} ms/token (one rank's bytes); "
                                 f"{r['fraction_of_floor']:.1%} of it reached"]]
    if "floor_ms" in tp1:
        rows.append(["floor (TP=1)", f"{tp1['floor_ms']:.4f} ms/token; {tp1['fraction_of_floor']:.1%} of it reached"])
    gathers = f" + {c['all_gathers']} all-gather of the logits" if c["all_gathers"] else ""
    rows += [["all-reduce / token", f"{c['per_token_s'] * 1e3:.4f} ms ({c['share_of_token']:.1%} of the TP={n} token)"],
             ["  what it measures", f"{c['all_reduces']} all-reduces of one hidden row{gathers} per token, timed alone "
                                    f"({c['clock']}); each rank's median of {c['steps']} steps, the slowest of "
                                    f"{len(c['ranks'])} timing(s)"]]
    if r.get("note"):
        rows.append(["note", r["note"]])
    return table(["decode", ""], rows, title=f"NexusRT decode benchmark, tensor parallel {n}")
