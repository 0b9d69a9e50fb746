"""The speed half of ``nexusrt-bench --stage kv`` (CUDA): one sequence's decode with its KV on two
tiers, restoring an evicted half, and a pruned cache.

For each context of ``--kv-contexts`` (8,192 / 32,768 / 131,072 tokens) of ``--model``:

(a) every KV block in HBM: decode ms/token; floor = (weights + the KV read per token) ÷ the HBM
    read bandwidth the membw probe measures in this run (the decode stage's byte accounting);
(b) the same split as (c) plus a device reserve as large as the host half, filled by the GPU fault
    ring (``kv_fault_reserve``): decode attention posts the host blocks it reads and the runner
    moves them in between steps. The warm-up run's ms/token is its steps (they read the host half
    zero-copy until the moves land; paced as ``generate_tokens`` paces a request, at most
    ``QUEUE_AHEAD`` in flight with the ring serviced while the host waits) plus finishing every
    move they asked for, over its steps; the copies' rate (``move_ms``) is shared with the steps'
    zero-copy reads of the blocks not moved yet; the
    timed runs start from the table that left (the row says how many entries still name host
    blocks: 0 when every block moved) and measure the ring's steady state, the host-tier twins
    with posting and a ring snapshot per step against (a). So (b) shows what the ring costs and
    reaches when HBM has the room a budget did not pin, not a way to make a capped budget faster
    (that cannot be: moving a block costs the link what reading it in place costs);
(c) the oldest half on the pinned host tier, read zero-copy (``CudaRunner(kv_gpu_budget=...)``):
    decode ms/token, the host bytes each step reads, their rate (host bytes ÷ ms/token) against
    the pinned host->device copy rate measured in this run, and the floor device bytes ÷ HBM
    bandwidth + host bytes ÷ pinned rate;
(d) restoring the evicted half: prefilling that many tokens from an empty cache (measured)
    against copying its bytes back at the pinned rate (bytes ÷ the measured rate);
(e) pruned decode: one sequence at RoPE positions just below the context holding only
    ``--kv-keep`` (4,096) cache slots, beside an unpruned sequence of that many slots, both one
    ``Rows`` per step through ``CudaBatchRunner.run_tokens``;
(f) (b) with prefetch (``kv_prefetch``): the fill's sealed host blocks are moved into the reserve
    as soon as the fill ends and the first step waits for them, so no step reads them zero-copy;
    the warm-up's ms/token counts that wait (over its 32 steps), beside (b)'s warm-up. Its copies
    run before any step, with the link to themselves: the target on the traffic while faulting
    reads their rate, (b)'s (shared with the steps' zero-copy reads) is printed beside it.

The host rows (b), (c), (f) of a context adopt the blocks of one all-HBM prefill of its prefix
(``CudaRunner.adopt_kv``), made once per context.

Decode timing: one warm-up run and ``--runs`` (3) timed runs of :data:`STEPS` steps each, the
median ms/token reported. Every step stays inside the context (131,072 is the Llama-3.x RoPE
range): the runner is prefilled to ``context - (runs + 1) * STEPS`` tokens and the steps fill it
to ``context``; the floors use the mean context of the timed steps.

The figures are plain arithmetic over measurements (:func:`measure` and the ``*_figures``
helpers); the device work is :mod:`.kv_timing`'s probe, so tests run the arithmetic on fakes.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

from ..engine.fit import runner_context
from ..kvcache.blocks import BLOCK_SIZE, blocks_for
from ..kvcache.fault_plan import FaultCounts
from ..kvcache.tiers import KvBudgetError
from .common import add_model_argument, add_shared_argument, int_list, resolve_model_config
from .decode_timing import bytes_per_token

CONTEXTS = (8192, 32768, 131072)
KEEP = 4096  # the pruned row's kept slots: a sink-window budget of 4k
STEPS = 32  # decode steps per timed run
RUNS = 3
HOST_TARGET = 1.5  # issue 16: (c) at most 1.5x (a) at 32k, for the 8B shape
HOST_TARGET_CONTEXT = 32768
LINK_TARGET = 0.8  # issue 16: host->device traffic at least 80% of the pinned copy rate
PRUNED_TOLERANCE = 0.10  # issue 16: the pruned row within 10% of the kept slots' own speed
ROWS = ("b", "c", "d", "e", "f")  # the rows measured besides (a), the all-HBM reference
NOT_ASKED = "not asked for (--kv-rows)"
# The options the speed half reads (the kv stage declares them; --kv-part quality refuses them).
OPTIONS = frozenset({"model", "runs", "kv_contexts", "kv_rows", "kv_keep"})


def parse_rows(text: str | None) -> frozenset[str]:
    """The ``--kv-rows`` set (a subset of :data:`ROWS`; an ``a`` is accepted and implied)."""
    names = [r.strip().lower() for r in (text if text is not None else ",".join(ROWS)).split(",") if r.strip()]
    bad = [r for r in names if r not in ROWS + ("a",)]
    if bad or not names:
        raise ValueError(f"--kv-rows takes a comma-separated subset of a,{','.join(ROWS)}; got {text!r}")
    return frozenset(r for r in names if r != "a")


def add_arguments(parser) -> None:
    add_model_argument(parser)
    add_shared_argument(parser, "--runs", type=int, default=None, metavar="R",
                        help="timed runs, median reported (decode 5, prefill 3, serve 3, kv 3)")
    parser.add_argument("--kv-contexts", default=None, metavar="N[,N...]",
                        help="kv stage, speed half: contexts to decode at (default 8192,32768,131072; "
                             "multiples of 32; a context that does not fit is skipped with the reason)")
    parser.add_argument("--kv-rows", default=None, metavar="R[,R...]",
                        help="kv stage, speed half: which of the rows b (fault ring), c (zero-copy), d (restore "
                             "by prefill), e (pruned), f (fault ring with prefetch) to measure besides (a), which every row is compared with "
                             f"(default {','.join(ROWS)}); fewer rows fit a long context into one time limit")
    parser.add_argument("--kv-keep", type=int, default=KEEP, metavar="N",
                        help=f"kv stage, speed half: cache slots the pruned decode row keeps (default {KEEP})")


@dataclass(frozen=True)
class DecodePlan:
    """Where one context's timed decode runs: prefilled to :attr:`prefill_to`, then one warm-up
    run and ``runs`` timed runs of ``steps`` steps fill the cache to exactly ``context``."""

    context: int
    runs: int
    steps: int = STEPS

    @property
    def prefill_to(self) -> int:
        return self.context - (self.runs + 1) * self.steps

    @property
    def mean_context(self) -> float:
        """Mean tokens of K/V a timed step reads: the step at position p reads p + 1 of them, and
        the timed steps sit at positions ``prefill_to + steps .. context - 1``."""
        return (self.prefill_to + self.steps + 1 + self.context) / 2


def min_context(runs: int) -> int:
    """The smallest context the plan fits: the evicted half must lie below the decoded tokens."""
    return 2 * (runs + 1) * STEPS


def parse_contexts(text: str | None, runs: int) -> list[int]:
    """``--kv-contexts`` as ascending ints; ValueError naming the flag for anything else."""
    contexts = int_list(text, CONTEXTS, "--kv-contexts")
    if len(set(contexts)) != len(contexts):
        raise ValueError(f"--kv-contexts names a context twice: {text!r}")
    low = min_context(runs)
    for c in contexts:
        if c % (2 * BLOCK_SIZE):
            raise ValueError(f"--kv-contexts values must be multiples of {2 * BLOCK_SIZE} (the evicted half "
                             f"is whole KV blocks), got {c}")
        if c < low:
            raise ValueError(f"--kv-contexts values must be >= {low} (twice the {(runs + 1) * STEPS} decode "
                             f"steps of a warm-up and {runs} timed runs of {STEPS}), got {c}")
    return sorted(contexts)


def context_limit(cfg, context: int, model: str) -> str | None:
    """Why ``context`` is past what the CUDA runner gives this model, or None."""
    limit = runner_context(cfg, "cuda", context)  # the context itself, or the model's limit below it
    if limit < context:
        return f"{model} holds at most {limit} positions on CUDA; context {context} is past them"
    return None


# -- figures from measurements ----------------------------------------------------------------
def device_figures(cfg, plan: DecodePlan, decode_ms: list[float], hbm: float) -> dict:
    """(a): ``decode_ms`` the timed runs' ms/token, ``hbm`` bytes/s."""
    nbytes = bytes_per_token(cfg, plan.mean_context)
    ms = statistics.median(decode_ms)
    floor = nbytes["total"] / hbm * 1e3
    return {"ms_per_token": ms, "ms_per_token_runs": list(decode_ms), "mean_context": plan.mean_context,
            "bytes_per_token": nbytes, "floor_ms": floor, "fraction_of_floor": floor / ms}


def host_figures(cfg, plan: DecodePlan, decode_ms: list[float], tiers: dict, hbm: float, pinned: float,
                 device: dict) -> dict:
    """(c): ``tiers`` the runner's ``kv_tiers()``; ``device`` the (a) figures of the same context."""
    nbytes = bytes_per_token(cfg, plan.mean_context)
    host = tiers["host_bytes"]  # the oldest blocks, all below every timed position: each step reads them all
    dev = nbytes["total"] - host
    ms = statistics.median(decode_ms)
    # The whole step counted as link time: the rate the link reached at least.
    rate = host / (ms / 1e3)
    floor = (dev / hbm + host / pinned) * 1e3
    return {"ms_per_token": ms, "ms_per_token_runs": list(decode_ms), "mean_context": plan.mean_context,
            "blocks_device": tiers["blocks_device"], "blocks_host": tiers["blocks_host"],
            "host_tokens": tiers["blocks_host"] * BLOCK_SIZE, "host_bytes_per_token": host,
            "device_bytes_per_token": dev, "host_bytes_s": rate, "of_pinned": rate / pinned,
            "link_target": "met" if rate / pinned >= LINK_TARGET else "missed",
            "floor_ms": floor, "fraction_of_floor": floor / ms,
            "over_all_device": ms / device["ms_per_token"], "floor_over_all_device_floor": floor / device["floor_ms"]}


def _reserve_figures(measured: dict, device: dict, more_tiers: tuple[str, ...] = ()) -> dict:
    """What (b) and (f) both report: the timed and warm-up ms/token, each against (a), the tier
    and fault counts (and ``more_tiers`` of the runner's ``kv_tiers()``), and the host entries
    left when the timed runs began."""
    tiers, ms = measured["tiers"], statistics.median(measured["decode_ms"])
    return {"ms_per_token": ms, "ms_per_token_runs": list(measured["decode_ms"]),
            "warmup_ms_per_token": measured["warmup_ms"], "over_all_device": ms / device["ms_per_token"],
            "warmup_over_all_device": measured["warmup_ms"] / device["ms_per_token"],
            **{k: tiers[k] for k in ("blocks_host", "blocks_reserve") + more_tiers + FaultCounts.KEYS},
            "host_entries_timed": measured["host_entries_timed"]}


def _move_rate(out: dict, pinned: float) -> dict:
    """The fault ring's copies in a row: every byte moved over their device time (``move_ms``: from
    the moment each service's copies could start to its table writes, on the control stream)."""
    moved, ms = out.get("bytes_moved", 0), out.get("move_ms", 0.0)
    if moved > 0 and ms > 0:
        rate = moved / (ms / 1e3)
        out.update(move_bytes_s=rate, move_of_pinned=rate / pinned,
                   move_target="met" if rate / pinned >= LINK_TARGET else "missed")
    return out


def fault_figures(measured: dict, device: dict, pinned: float) -> dict:
    """(b): ``measured`` the probe's ``half_host`` with a reserve; ``device`` the (a) figures;
    ``pinned`` the pinned copy rate (bytes/s). ``host_entries_timed``: table entries naming host
    blocks when the timed runs began (each is read zero-copy by every timed step). The moves'
    rate (:func:`_move_rate`) here is shared: the steps they overlap read the blocks not moved
    yet zero-copy over the same link. Beside it the warm-up's closing flush (its time from the
    host, and the bytes it still had to move)."""
    out = {**_reserve_figures(measured, device, ("blocks_device", "ring_slots")),
           "measures": "decode with a reserve as large as the host half: the warm-up run's steps post the host "
                       "blocks and it ends once they are moved in; the timed runs read from the table that left"}
    if "flush_s" in measured:
        out.update(flush_ms=measured["flush_s"] * 1e3, flush_bytes=measured.get("flush_bytes", 0))
    return _move_rate(out, pinned)


def prefetch_figures(measured: dict, device: dict, ring: dict, pinned: float) -> dict:
    """(f): ``measured`` the probe's ``half_host`` with a reserve and prefetch; ``device`` the (a)
    figures; ``ring`` (b)'s figures (its warm-up is the comparison) or a skipped (b). Its moves run
    as the fill ends, before any step: the same copies as (b)'s with the link to themselves."""
    out = _reserve_figures(measured, device)
    if "prefetch_s" in measured:
        out["prefetch_ms"] = measured["prefetch_s"] * 1e3
    if "warmup_ms_per_token" in ring:
        out["warmup_over_fault_ring_warmup"] = measured["warmup_ms"] / ring["warmup_ms_per_token"]
    return _move_rate(out, pinned)


def restore_figures(cfg, evicted_tokens: int, recompute_s: list[float], pinned: float) -> dict:
    """(d): ``recompute_s`` the measured prefills of ``evicted_tokens`` tokens from an empty cache."""
    nbytes = bytes_per_token(cfg, evicted_tokens)["kv"]
    recompute = statistics.median(recompute_s) * 1e3
    copy = nbytes / pinned * 1e3
    return {"evicted_tokens": evicted_tokens, "evicted_bytes": nbytes, "recompute_ms": recompute,
            "recompute_ms_runs": [s * 1e3 for s in recompute_s], "copy_back_ms": copy,
            "copy_back_basis": "evicted bytes / the pinned host->device rate measured in this run",
            "recompute_over_copy": recompute / copy}


def pruned_figures(plan: DecodePlan, keep: int, measured: dict) -> dict:
    """(e): ``measured`` has ``unpruned_ms`` and either ``pruned_ms`` or ``pruned_refused``."""
    out = {"keep": keep, "positions": [plan.context - plan.steps, plan.context - 1],
           "unpruned_ms_per_token": statistics.median(measured["unpruned_ms"]),
           "unpruned_ms_per_token_runs": list(measured["unpruned_ms"])}
    if measured.get("pruned_refused"):
        out["pruned_skipped"] = f"the CUDA batch runner refused position != start: {measured['pruned_refused']}"
        return out
    ms = statistics.median(measured["pruned_ms"])
    ratio = ms / out["unpruned_ms_per_token"]
    out.update(ms_per_token=ms, ms_per_token_runs=list(measured["pruned_ms"]), over_unpruned=ratio,
               target="met" if abs(ratio - 1) <= PRUNED_TOLERANCE else "missed")
    return out


def targets(rows: list[dict], pinned: float) -> dict:
    """The issue's speed targets, read off the measured rows (a target with no row says why)."""
    at = next((r for r in rows if r["context"] == HOST_TARGET_CONTEXT), {})
    host = at.get("host_zero_copy", {"skipped": at.get("skipped", f"context {HOST_TARGET_CONTEXT} not measured")})
    if "skipped" in host:
        host_target = {"skipped": host["skipped"]}
    else:
        host_target = {
            "ratio": host["over_all_device"], "floor_ratio": host["floor_over_all_device_floor"], "target": HOST_TARGET,
            "verdict": "met" if host["over_all_device"] <= HOST_TARGET else "missed",
            "note": (f"with {host['host_bytes_per_token'] / 1e9:.3g} GB of KV per token behind a link of "
                     f"{pinned / 1e9:.1f} GB/s (the pinned rate measured in this run), the floor of (c) itself is "
                     f"{host['floor_ms']:.2f} ms, {host['floor_over_all_device_floor']:.2f}x the all-HBM floor")}
    ring = at.get("fault_ring", {"skipped": at.get("skipped", f"context {HOST_TARGET_CONTEXT} not measured")})
    if "skipped" in ring:
        ring_target = {"skipped": ring["skipped"]}
    else:  # the same target for the ring's steady state, with the price of getting there beside it
        ring_target = {"ratio": ring["over_all_device"], "target": HOST_TARGET,
                       "verdict": "met" if ring["over_all_device"] <= HOST_TARGET else "missed",
                       "warmup_ratio": ring["warmup_over_all_device"], "host_entries_timed": ring["host_entries_timed"]}
    hosts = [r["host_zero_copy"] for r in rows if "of_pinned" in r.get("host_zero_copy", {})]
    link = {"target": LINK_TARGET, "of_pinned": [h["of_pinned"] for h in hosts],
            "verdict": ("met" if all(h["link_target"] == "met" for h in hosts) else "missed") if hosts else None}
    # The fault ring's copies alone on the link (row (f), or (b) where (f) was not measured) give
    # the verdict; (b)'s beside the steps' zero-copy reads of the same blocks are reported with it.
    alone = [r.get("prefetched", {}) if "move_of_pinned" in r.get("prefetched", {}) else r.get("fault_ring", {})
             for r in rows]
    alone = [m for m in alone if "move_of_pinned" in m]
    shared = [r["fault_ring"]["move_of_pinned"] for r in rows if "move_of_pinned" in r.get("fault_ring", {})]
    moves = {"target": LINK_TARGET, "of_pinned": [m["move_of_pinned"] for m in alone], "shared_of_pinned": shared,
             "verdict": ("met" if all(m["move_target"] == "met" for m in alone) else "missed") if alone else None}
    pruned = [r["pruned"] for r in rows if "over_unpruned" in r.get("pruned", {})]
    prune = {"tolerance": PRUNED_TOLERANCE, "over_unpruned": [p["over_unpruned"] for p in pruned],
             "verdict": ("met" if all(p["target"] == "met" for p in pruned) else "missed") if pruned else None}
    return {"host_over_device_32k": host_target, "fault_ring_over_device_32k": ring_target, "host_link": link,
            "fault_moves": moves, "pruned_like_kept": prune}


# -- the run ----------------------------------------------------------------------------------
def measure(probe, cfg, model: str, contexts: list[int], runs: int, keep: int, progress=None,
            rows_asked: frozenset[str] = frozenset(ROWS)) -> dict:
    """Every figure of the speed half from ``probe`` (:class:`.kv_timing.CudaKvProbe` or a fake):
    (a) and the rows of ``rows_asked`` (:data:`ROWS`; the others say they were not asked for);
    ``progress(line)`` hears of each row as it is measured and of each context as it finishes."""
    hbm, pinned = probe.hbm_bandwidth(), probe.pinned_rate()
    say = progress or (lambda line: None)
    rows = []
    for context in contexts:
        t0 = time.perf_counter()
        row = {"context": context}
        rows.append(row)
        why = context_limit(cfg, context, model) or probe.fits(context)
        if why:
            row["skipped"] = why
            continue
        plan = DecodePlan(context, runs)
        evicted = context // 2
        prunable = keep + plan.steps < context  # the pruned positions lie past the kept slots
        dev = probe.all_device(plan, evicted, keep if prunable and "e" in rows_asked else None,
                               restore="d" in rows_asked)
        row["all_device"] = device_figures(cfg, plan, dev["decode_ms"], hbm)
        # One line per row as it lands: a context that runs past a time limit still leaves these.
        say(f"context {context}: (a) {row['all_device']['ms_per_token']:.3f} ms/token "
            f"({time.perf_counter() - t0:.1f} s)")
        # The device keeps the rest of the runner's blocks: exactly the evicted half is on the host.
        # Each row has its own refusal: the ring's reserve failing must not discard (c)'s figures.
        split = (plan, dev["kv_blocks"] - blocks_for(evicted))
        # The host rows' fill: an all-HBM prefill whose blocks are then copied into the tiers.
        filling = (f"context {context}: ({{}}) filling {plan.prefill_to:,} tokens in HBM, then the oldest "
                   f"{evicted:,} copied to the host tier")

        def host_row(letter: str, refused: str, figures, **split_kw) -> dict:
            """Row ``letter`` on the split (``split_kw``: its reserve, prefetch), or why not."""
            if letter not in rows_asked:
                return {"skipped": NOT_ASKED}
            say(filling.format(letter))
            try:
                got = probe.half_host(*split, **split_kw)
            except KvBudgetError as exc:
                return {"skipped": f"{refused}: {exc}"}
            out = figures(got)
            warm = f", warm-up {out['warmup_ms_per_token']:.3f}" if "warmup_ms_per_token" in out else ""
            say(f"context {context}: ({letter}) {out['ms_per_token']:.3f} ms/token{warm} "
                f"({time.perf_counter() - t0:.1f} s)")
            return out

        row["host_zero_copy"] = host_row("c", "host tier refused", lambda m: host_figures(
            cfg, plan, m["decode_ms"], m["tiers"], hbm, pinned, row["all_device"]))
        reserve = blocks_for(evicted)  # (b), (f): room for the whole host half
        row["fault_ring"] = host_row("b", "host tier or fault reserve refused",
                                     lambda m: fault_figures(m, row["all_device"], pinned), reserve_blocks=reserve)
        row["prefetched"] = host_row("f", "host tier or fault reserve refused",
                                     lambda m: prefetch_figures(m, row["all_device"], row["fault_ring"], pinned),
                                     reserve_blocks=reserve, prefetch=True)
        row["restore"] = (restore_figures(cfg, evicted, dev["recompute_s"], pinned) if "d" in rows_asked else
                          {"skipped": NOT_ASKED})
        row["pruned"] = ({"skipped": NOT_ASKED} if "e" not in rows_asked else
                         pruned_figures(plan, keep, dev["pruned"]) if prunable else
                         {"skipped": f"context {context} leaves nothing to prune with {keep} slots kept "
                                     f"and {plan.steps} steps per run (--kv-keep)"})
        row["seconds"] = time.perf_counter() - t0
        # A long run's finished contexts reach the log even if a later one fails.
        say(f"context {context}: " + "; ".join(f"{k} {v['ms_per_token']:.3f} ms/token" for k, v in row.items()
                                               if isinstance(v, dict) and "ms_per_token" in v)
            + f" ({row['seconds']:.1f} s)")
    return {"hbm_read_bytes_s": hbm, "pinned_h2d_bytes_s": pinned, "pinned_copy": probe.pinned_copy,
            "runs": runs, "steps_per_run": STEPS, "keep": keep, "contexts": rows, "targets": targets(rows, pinned)}


def run(args) -> dict:
    """The speed half on the backend ``--backend`` asks for; on any other than CUDA, a line why not."""
    from .. import firmware

    runs = RUNS if args.runs is None else args.runs
    if runs < 1 or args.kv_keep < 1:
        raise ValueError(f"--runs and --kv-keep must be >= 1, got {runs} and {args.kv_keep}")
    contexts = parse_contexts(args.kv_contexts, runs)
    rows_asked = parse_rows(args.kv_rows)
    cfg = resolve_model_config(args.model)  # an unknown name fails here, on any backend
    firmware.init(profile=args.profile, backend=args.backend)
    rt = firmware.runtime()
    if not rt.is_cuda:
        return {"skipped": f"needs the CUDA backend (this run's backend is {rt.backend}): decode of "
                           f"{args.model} with its KV on the host tier, restored, and pruned"}
    from .kv_timing import CudaKvProbe

    probe = CudaKvProbe(rt, args.model, runs)
    out = {"backend": rt.backend, "device": rt.profile.device_name, "profile": rt.profile.name, "model": args.model}
    try:
        out.update(measure(probe, cfg, args.model, contexts, runs, args.kv_keep,
                           progress=lambda line: print(f"nexusrt-bench kv: {line}", file=sys.stderr, flush=True),
                           rows_asked=rows_asked))
    finally:
        probe.close()
    return out
