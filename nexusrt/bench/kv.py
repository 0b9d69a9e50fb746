"""``nexusrt-bench --stage kv``: what KV pruning costs in quality (CPU, the shipped model), and
the speed of long contexts with the KV on the host tier, restored, or pruned (CUDA, :mod:`.kv_speed`).

For each policy (``full``, ``sink-window``, ``h2o``) and each budget (25% and 50% of the
window), the held-out text of :mod:`nexusrt.models.quality` is decoded *teacher-forced one
token at a time* through the pruned cache: after every token the cache is pruned to its
budget exactly as the serving engine prunes (:func:`nexusrt.serving.pruning.prune`, the
CPU decoder's own attention mass for ``h2o``), so each prediction sees the cache generation
would have. Reported: perplexity, its ratio to ``full``'s, and top-1 agreement (the share of
positions whose argmax equals ``full``'s). Within a window the first ``budget`` tokens see
an unpruned cache; pruning acts on the rest.

The speed half (:mod:`.kv_speed`: decode at 8k-128k with the KV on the host tier, restoring an
evicted half, a pruned cache) runs on the CUDA backend on ``--model``; the result's ``speed``
holds it, or on another backend a line saying it needs CUDA. The quality half runs on the CPU
backend whatever ``--backend`` says; ``--kv-part`` runs one half alone.
"""

from __future__ import annotations

import math
import time

import numpy as np

from . import kv_speed, kv_speed_table
from .table import table

FRACTIONS = (0.25, 0.5)
TARGET = 1.05  # issue 16: sink-window and h2o at 50% within 5% perplexity of full
PARTS = ("both", "quality", "speed")
MIN_WINDOW = 8
WINDOW = 512
SINKS = 4
# The options each half reads; the stage declares both (nexusrt-bench refuses them with another
# stage; see main's docstring) and refuses one half's options given with --kv-part of the other.
QUALITY_OPTIONS = frozenset({"kv_window", "kv_sinks", "tokens"})
OPTIONS = QUALITY_OPTIONS | {"kv_part"} | kv_speed.OPTIONS


def add_arguments(parser) -> None:
    parser.add_argument("--kv-window", type=int, default=WINDOW, metavar="W",
                        help=f"kv stage: tokens per teacher-forced window, the context pruned, >= {MIN_WINDOW} and at "
                             "most the shipped model's context; its 25%% budget must exceed --kv-sinks "
                             f"(default {WINDOW})")
    parser.add_argument("--kv-sinks", type=int, default=SINKS, metavar="N",
                        help=f"kv stage: sink tokens, >= 0 and fewer than 25%% of --kv-window (default {SINKS})")
    parser.add_argument("--kv-part", choices=PARTS, default="both",
                        help="kv stage: the quality half (CPU, the shipped model), the speed half (CUDA, --model) "
                             "or both (default)")
    kv_speed.add_arguments(parser)


def pruned_logits(runner, ids: np.ndarray, policy) -> np.ndarray:
    """Teacher-forced fp32 logits ``[T, vocab]`` of ``ids`` decoded one by one through ``runner``'s
    pool with the cache pruned to ``policy`` after every token."""
    from ..backends.base import Rows
    from ..kvcache.blocks import blocks_for
    from ..serving.pruning import prune

    slots_max = len(ids) if not policy.prunes else min(len(ids), policy.budget + 1)
    table = list(range(blocks_for(slots_max)))
    positions = np.zeros(0, np.int64)
    scores = np.zeros(0) if policy.policy == "h2o" else None
    out = []
    for t, token in enumerate(ids):
        positions = np.append(positions, t)
        if scores is not None:
            scores = np.append(scores, 0.0)
        row = Rows(np.asarray([token], np.int32), len(positions) - 1, table, True, position=t, scores=scores)
        out.append(runner.run([row])[0])
        positions, scores, _ = prune(policy, positions, scores, lambda keep: runner.compact(table, keep))
    return np.stack(out)


def run(args) -> dict:
    """The halves ``--kv-part`` asks for: the speed half first (it boots the backend asked for),
    then the quality half on the CPU backend."""
    from .. import firmware

    _refuse_the_other_half(args)
    if args.kv_part != "speed":
        _check_quality_args(args)  # both halves' arguments fail before either runs
    speed = kv_speed.run(args) if args.kv_part != "quality" else {"skipped": "--kv-part quality"}
    if args.kv_part == "speed":
        return {"quality": None, "quality_skipped": "--kv-part speed", "speed": speed}
    firmware.shutdown()  # the quality half boots the CPU backend whatever the speed half ran on
    return {**run_quality(args), "speed": speed}


def _check_quality_args(args) -> None:
    """Refuse, before any model loads, what the quality half cannot run, naming the stage's flags
    (the pruning policy's own refusals name the engine's kv_budget and kv_sinks)."""
    from ..engine.fit import runner_context
    from ..models.shipped import DEFAULT_MODEL
    from .common import resolve_model_config

    window, sinks = args.kv_window, args.kv_sinks
    if window < MIN_WINDOW or (args.tokens is not None and args.tokens < window):
        raise ValueError(f"--kv-window must be >= {MIN_WINDOW} and --tokens at least one window, got {window} and "
                         f"{args.tokens}")
    if sinks < 0:
        raise ValueError(f"--kv-sinks must be >= 0, got {sinks}")
    fraction = min(FRACTIONS)
    budget = int(fraction * window)  # the smallest budget run_quality prunes to
    if budget <= sinks:
        least = int(math.ceil((sinks + 1) / fraction))
        while int(fraction * least) <= sinks:
            least += 1
        raise ValueError(f"--kv-sinks {sinks} fill the smallest budget, {fraction:.0%} of --kv-window {window} "
                         f"({budget} tokens): the budget must hold more than the sinks; give --kv-window >= {least} "
                         f"or --kv-sinks <= {budget - 1}")
    limit = runner_context(resolve_model_config(DEFAULT_MODEL), "cpu", window)
    if window > limit:
        raise ValueError(f"--kv-window {window} is longer than {DEFAULT_MODEL}'s context of {limit} tokens; "
                         f"give at most {limit}")


def _refuse_the_other_half(args) -> None:
    """A half's options given with ``--kv-part`` of the other half would be ignored: refused
    (``args.given_flags``: what nexusrt-bench's main found given, dest -> flag)."""
    skipped, theirs = (("speed", kv_speed.OPTIONS) if args.kv_part == "quality" else
                       ("quality", QUALITY_OPTIONS) if args.kv_part == "speed" else (None, frozenset()))
    for dest, flag in getattr(args, "given_flags", {}).items():
        if dest in theirs:
            raise ValueError(f"{flag} applies to the kv stage's {skipped} half; --kv-part {args.kv_part} does not "
                             f"run it")


def run_quality(args) -> dict:
    """The quality half (CPU, the shipped model): perplexity and top-1 agreement per policy and budget."""
    from .. import firmware
    from ..backends.cpu.batch import CpuBatchRunner
    from ..engine.llm import LLM
    from ..kvcache.blocks import blocks_for
    from ..models import quality
    from ..models.shipped import DEFAULT_MODEL
    from ..serving.pruning import KvPolicy

    _check_quality_args(args)
    window = args.kv_window
    firmware.init(profile=args.profile, backend="cpu")
    t0 = time.perf_counter()
    llm = LLM(DEFAULT_MODEL, backend="cpu", max_context=window)
    load_s = time.perf_counter() - t0
    try:
        ids = quality.heldout_tokens(llm.tokenizer, quality.heldout_documents(), args.tokens or 4 * window)
        windows = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]
        runner = CpuBatchRunner(llm.runner.decoder, blocks_for(window), window)
        configs = [KvPolicy()] + [KvPolicy(name, int(f * window), args.kv_sinks)
                                  for name in ("sink-window", "h2o") for f in FRACTIONS]
        rows, full_top = [], None
        for pol in configs:
            t1 = time.perf_counter()
            nll, count, tops = 0.0, 0, []
            for w in windows:
                logits = pruned_logits(runner, w, pol)
                nll += quality.window_nll(logits, w)
                count += len(w) - 1
                tops.append(np.argmax(logits[:-1], axis=-1))
            tops = np.concatenate(tops)
            if full_top is None:
                full_top = tops
            ppl = float(np.exp(nll / count))
            rows.append({"policy": pol.policy, "budget": pol.budget, "fraction": None if not pol.prunes
                         else pol.budget / window, "sinks": pol.sinks if pol.prunes else None,
                         "window_kept": pol.recent if pol.prunes else None, "perplexity": ppl,
                         "tokens": count, "top1_agreement": float(np.mean(tops == full_top)),
                         "seconds": time.perf_counter() - t1})
        runner.close()
    finally:
        llm.close()
    full = rows[0]["perplexity"]
    for r in rows:
        r["over_full"] = r["perplexity"] / full
    target = {r["policy"]: ("met" if r["over_full"] <= TARGET else "missed")
              for r in rows if r["fraction"] == 0.5}
    return {"model": DEFAULT_MODEL, "backend": "cpu", "window": window, "windows": len(windows),
            "load_s": load_s, "quality": rows,
            "target_50pct_within_5pct": target}


def render(r: dict) -> str:
    quality = render_quality(r) if r["quality"] is not None else f"quality: skipped ({r['quality_skipped']})"
    return quality + "\n\n" + kv_speed_table.render(r["speed"])


def render_quality(r: dict) -> str:
    body = [[q["policy"], "-" if q["budget"] is None else f"{q['budget']} ({q['fraction']:.0%})",
             f"{q['perplexity']:.4f}", f"{q['over_full']:.4f}", f"{q['top1_agreement']:.2%}", f"{q['seconds']:.1f} s"]
            for q in r["quality"]]
    out = table(["policy", "budget", "perplexity", "/ full", "top-1 = full", "time"], body,
                title=f"KV pruning on {r['model']}: {r['windows']} windows of {r['window']} tokens, teacher-forced")
    verdict = ", ".join(f"{k}: {v}" for k, v in r["target_50pct_within_5pct"].items())
    return out + f"\ntarget (50% budget within 5% of full perplexity): {verdict}"
