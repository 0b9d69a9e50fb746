"""``nexusrt-bench --stage serve``: the serving engine under N concurrent requests.

For each ``--concurrency`` level, N requests with deterministic synthetic prompts (lengths
spread over 0.75–1.25 × ``--prompt-tokens`` by a golden-ratio sequence, after an optional
``--shared-prefix`` of tokens every request shares) arrive at once and generate exactly
``--new-tokens`` tokens each (greedy; no EOS). The engine runs on this thread, step after
step, as the server's loop would. Reported per level (median run by output tokens/s):
output tokens/s, TTFT and TPOT p50/p99, peak KV blocks used, prefix-cache hits, tokens
computed, preemptions. With transformers importable and a checkpoint model, the same
requests of the largest level also go through transformers' continuous batching, as a ratio.

The engine runs on the CPU backend only so far: the CUDA batch runner (batched decode,
graphs at bucketed batch sizes) is future work, so this stage refuses a CUDA runtime rather
than report a CPU figure as a GPU one.
"""

from __future__ import annotations

import time

import numpy as np

from ..models.shipped import DEFAULT_MODEL
from .common import add_model_argument, add_shared_argument, int_list, resolve_model_config
from .table import plain, table

CPU_MODEL = DEFAULT_MODEL  # the shipped trained model: small enough for NumPy
GOLDEN = 0.6180339887498949


def add_arguments(parser) -> None:
    add_model_argument(parser)
    add_shared_argument(parser, "--prompt-tokens", default=None, metavar="N[,N...]",
                        help="decode stage: prompt length (32); prefill stage: lengths to time (512,2048,8192); "
                             "serve stage: mean prompt length (CPU 128)")
    add_shared_argument(parser, "--runs", type=int, default=None, metavar="R",
                        help="timed runs, median reported (decode 5, prefill 3, serve 3)")
    add_shared_argument(parser, "--no-peers", action="store_true", help="decode/prefill/serve stages: skip the peers")
    parser.add_argument("--concurrency", default=None, metavar="N[,N...]",
                        help="serve stage: concurrent requests per level (1,8,32 on the CPU)")
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                        help="serve stage: tokens of a system prompt every request starts with (0)")
    parser.add_argument("--kv-memory", type=int, default=None, metavar="BYTES",
                        help="serve stage: KV pool bytes (default: room for every request at once)")


def workload(n: int, prompt_tokens: int, new_tokens: int, shared_prefix: int, vocab: int) -> list[tuple[list[int], int]]:
    """``n`` deterministic (prompt ids, new tokens) requests; ids avoid the first 8 (specials)."""
    span = vocab - 16
    prefix = [(j * 7919 + 11) % span + 8 for j in range(shared_prefix)]
    out = []
    for i in range(n):
        length = max(1, round(prompt_tokens * (0.75 + 0.5 * ((i * GOLDEN) % 1.0))))
        own = [((i + 1) * 104729 + j * 7919) % span + 8 for j in range(length)]
        out.append((prefix + own, new_tokens))
    return out


def _validate(args, cpu: bool) -> None:
    lengths = int_list(args.prompt_tokens, (128,) if cpu else (512,), "--prompt-tokens")
    if len(lengths) != 1:
        raise ValueError(f"the serve stage takes one --prompt-tokens value, got {args.prompt_tokens!r}")
    args.prompt_tokens = lengths[0]
    args.concurrency = int_list(args.concurrency, (1, 8, 32) if cpu else (1, 8, 64), "--concurrency")
    args.runs = 3 if args.runs is None else args.runs
    for name in ("new_tokens", "runs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.shared_prefix < 0:
        raise ValueError(f"--shared-prefix must be >= 0, got {args.shared_prefix}")


def _pct(values, q) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def run_level(runner, requests, max_context: int, budget: int) -> dict:
    """One timed run of ``requests`` arriving together on a fresh engine over ``runner``'s pool."""
    from ..reference.sampling import SamplingParams
    from ..serving import Engine, SchedulerConfig, Sequence

    engine = Engine(runner, SchedulerConfig(max_running=len(requests), token_budget=max(budget, len(requests))))
    seqs = [Sequence(ids, SamplingParams(), new, max_context) for ids, new in requests]
    t0 = time.perf_counter()
    for s in seqs:
        s.t_arrival = t0
        engine.add(s)
    peak = 0
    while engine.has_work:
        engine.step()
        peak = max(peak, engine.blocks.num_used)
    wall = time.perf_counter() - t0
    engine.blocks.audit()
    if engine.blocks.num_used or any(s.finish_reason != "length" for s in seqs):
        raise RuntimeError(f"the run ended badly: {[s.finish_reason for s in seqs]}, {engine.blocks.num_used} blocks held")
    out = sum(len(s.output_ids) for s in seqs)
    ttft = [s.t_first - t0 for s in seqs]
    tpot = [(s.t_last - s.t_first) / (len(s.output_ids) - 1) for s in seqs if len(s.output_ids) > 1]
    return {"wall_s": wall, "output_tokens": out, "output_tokens_per_s": out / wall,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "tpot_p50_s": _pct(tpot, 50), "tpot_p99_s": _pct(tpot, 99),
            "kv_blocks_peak": peak, "kv_blocks_total": engine.blocks.num_blocks,
            "prefix_hit_blocks": engine.blocks.hits, "prompt_tokens": sum(len(i) for i, _ in requests),
            "computed_tokens": engine.metrics.computed_tokens, "steps": engine.metrics.steps,
            "preemptions": engine.scheduler.preemptions}


def run(args) -> dict:
    from .. import firmware
    from ..backends.cpu.batch import CpuBatchRunner, blocks_for_bytes
    from ..engine.llm import LLM
    from ..kvcache.blocks import blocks_for

    firmware.init(profile=args.profile, backend=args.backend)
    rt = firmware.runtime()
    if rt.is_cuda:
        raise ValueError("the serve stage drives the serving engine, which runs on the CPU backend only so far "
                         "(the CUDA batch runner is future work); run it with --backend cpu")
    _validate(args, cpu=True)
    model = args.model
    resolve_model_config(model)
    note = "CPU backend: a CPU figure, not comparable to a GPU"
    if model != CPU_MODEL and not getattr(args, "model_explicit", False):
        note = f"CPU backend: ran {CPU_MODEL} instead of {model} (a CPU figure, not comparable to a GPU)"
        model = CPU_MODEL
    longest = args.shared_prefix + round(args.prompt_tokens * 1.25) + args.new_tokens
    llm = LLM(model, backend="cpu", max_context=longest + 16)
    cfg = llm.config
    levels = {}
    try:
        for n in args.concurrency:
            requests = workload(n, args.prompt_tokens, args.new_tokens, args.shared_prefix, cfg.vocab_size)
            need = sum(blocks_for(len(p) + m) for p, m in requests)
            blocks = need if args.kv_memory is None else blocks_for_bytes(cfg, args.kv_memory)
            runner = CpuBatchRunner(llm.runner.decoder, blocks, llm.runner.max_context)
            run_level(runner, workload(1, 8, 2, 0, cfg.vocab_size), llm.runner.max_context, 512)  # warm-up
            runs = [run_level(runner, requests, llm.runner.max_context, 512) for _ in range(args.runs)]
            runs.sort(key=lambda r: r["output_tokens_per_s"])
            best = dict(runs[len(runs) // 2])
            best["output_tokens_per_s_runs"] = [r["output_tokens_per_s"] for r in runs]
            levels[str(n)] = best
            runner.close()
        peer = None
        if not args.no_peers:
            peer = _peer(llm, model, args)
            top = levels[str(max(args.concurrency))]
            if "output_tokens_per_s" in peer:
                peer["nexusrt_ratio"] = top["output_tokens_per_s"] / peer["output_tokens_per_s"]
    finally:
        llm.close()
    return {"backend": rt.backend, "device": rt.profile.device_name, "model": model, "note": note,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "shared_prefix": args.shared_prefix,
            "runs": args.runs, "token_budget": 512, "levels": levels, "transformers_continuous_batching": peer}


def _peer(llm, model: str, args) -> dict:
    if llm.model.path is None:
        return {"skipped": f"{model} has no checkpoint files for transformers to load"}
    from .hf_serve_peer import measure

    n = max(args.concurrency)
    return measure(str(llm.model.path), workload(n, args.prompt_tokens, args.new_tokens, args.shared_prefix,
                                                 llm.config.vocab_size), 512)


def render(r: dict) -> str:
    rows = []
    for n, lv in r["levels"].items():
        rows.append([n, f"{lv['output_tokens_per_s']:.0f}", f"{lv['ttft_p50_s'] * 1e3:.0f} / {lv['ttft_p99_s'] * 1e3:.0f}",
                     f"{lv['tpot_p50_s'] * 1e3:.1f} / {lv['tpot_p99_s'] * 1e3:.1f}",
                     f"{lv['kv_blocks_peak']} / {lv['kv_blocks_total']}", lv["prefix_hit_blocks"],
                     f"{lv['computed_tokens']} ({lv['prompt_tokens']} prompt)", lv["preemptions"]])
    title = (f"NexusRT serve benchmark: {r['model']} on {r['device']} ({r['backend']}); prompt ~{r['prompt_tokens']}"
             f"{' + shared ' + str(r['shared_prefix']) if r['shared_prefix'] else ''} tokens, {r['new_tokens']} new, "
             f"median of {r['runs']}")
    out = table(["requests", "out tok/s", "TTFT p50/p99 ms", "TPOT p50/p99 ms", "KV blocks peak/pool",
                 "prefix hits", "computed", "preempted"], rows, title=title)
    peer = r.get("transformers_continuous_batching")
    if peer is not None:
        if "output_tokens_per_s" in peer:
            out += (f"\ntransformers {peer['transformers']} continuous batching, same {peer['requests']} requests: "
                    f"{peer['output_tokens_per_s']:.0f} out tok/s -> NexusRT {peer['nexusrt_ratio']:.2f}x")
        else:
            out += f"\ntransformers continuous batching: {plain(peer)}"
    if r.get("note"):
        out += f"\nnote: {r['note']}"
    return out
