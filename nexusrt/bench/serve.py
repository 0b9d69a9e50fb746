"""``nexusrt-bench --stage serve``: the serving engine under N concurrent requests.

For each ``--concurrency`` level, N requests with deterministic synthetic prompts (lengths
spread over 0.75–1.25 × ``--prompt-tokens`` by a golden-ratio sequence, after an optional
``--shared-prefix`` of tokens every request shares) arrive at once and generate exactly
``--new-tokens`` tokens each (greedy; no EOS). The engine runs on this thread, step after
step, as the server's loop would. Reported per level (median run by output tokens/s):
output tokens/s, TTFT and TPOT p50/p99, peak KV blocks used, prefix-cache hits, tokens
computed, preemptions. With transformers importable and a checkpoint model, the same
requests of the largest level also go through transformers' continuous batching, as a ratio.

On CUDA the engine drives :class:`~nexusrt.backends.cuda.batch.CudaBatchRunner` (token
budget 2048; ``--deterministic`` for the batch-invariant mode; ``--prefill-path`` picks how
prompt chunks run: ``ragged``, all of a step's chunks through each GEMM together, the
default, or ``per-sequence``, each chunk alone through the one-sequence prefill graphs, to
compare the two on the same workload), and with a level of 1 the
same lone request also runs through the one-sequence decode loop (the decode stage's path):
``engine_over_one_sequence`` is the engine's TPOT over it. With levels 1 and N, whether the
first request's greedy ids among N equal its ids alone is reported (``same_ids_as_alone``).
"""

from __future__ import annotations

import time

import numpy as np

from ..cli.parsing import int_range
from ..models.shipped import DEFAULT_MODEL
from . import common
from .common import add_model_argument, add_shared_argument, int_list, refuse_off_backend, resolve_model_config
from .table import plain, table

CPU_MODEL = DEFAULT_MODEL  # the shipped trained model: small enough for NumPy
GOLDEN = 0.6180339887498949
PREFILL_PATHS = ("ragged", "per-sequence")
MAX_CONCURRENCY = 4096  # requests at once: far past any engine's max_batch; the workload stays ~100 MB
CONTEXT_SLACK = 16  # positions the runner is asked for past the longest request (slack only)
# The options this stage reads (nexusrt-bench refuses them with another stage; see main's docstring).
OPTIONS = frozenset({"model", "prompt_tokens", "new_tokens", "runs", "no_peers", "concurrency", "shared_prefix",
                     "kv_memory", "kv_gpu_budget", "temperature", "deterministic", "prefill_path"})


def add_arguments(parser) -> None:
    add_model_argument(parser)
    add_shared_argument(parser, "--prompt-tokens", default=None, metavar="N[,N...]",
                        help="decode stage: prompt length (32); prefill stage: lengths to time (512,2048,8192); "
                             "serve stage: mean prompt length (CPU 128)")
    add_shared_argument(parser, "--runs", type=int, default=None, metavar="R",
                        help="timed runs, median reported (decode 5, prefill 3, serve 3)")
    add_shared_argument(parser, "--no-peers", action="store_true", help="decode/prefill/serve stages: skip the peers")
    parser.add_argument("--concurrency", default=None, metavar="N[,N...]",
                        help=f"serve stage: concurrent requests per level, each 1..{MAX_CONCURRENCY} (default 1,8,32 on "
                             "the CPU, 1,8,64 on CUDA)")
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                        help="serve stage: tokens of a system prompt every request starts with (0)")
    # Negative byte counts are refused by the parser; one too small for a block by _batch_runner,
    # which knows the model's block size.
    parser.add_argument("--kv-memory", type=int_range(0), default=None, metavar="BYTES",
                        help="serve stage: KV pool bytes, at least one KV block (default: room for every request "
                             "at once)")
    parser.add_argument("--kv-gpu-budget", type=int_range(0), default=None, metavar="BYTES",
                        help="serve stage on CUDA (refused on the CPU): cap the KV pool at BYTES and swap preempted "
                             "requests to a pinned host tier instead of recomputing them (compare with --kv-memory "
                             "BYTES)")
    add_shared_argument(parser, "--temperature", type=float, default=0.0, metavar="T",
                        help="serve stage: sample every request at temperature T (1024-candidate cap, no top-p), "
                             "request i with seed i; decode stage: every token at T (with --top-k/--top-p, "
                             "seed 0); 0 (default) is greedy")
    parser.add_argument("--deterministic", action="store_true",
                        help="serve stage on CUDA (refused on the CPU, whose engine is batch invariant already): the "
                             "batch-invariant engine mode (see nexusrt serve --deterministic)")
    parser.add_argument("--prefill-path", choices=PREFILL_PATHS, default="ragged",
                        help="serve stage on CUDA (per-sequence is refused on the CPU, whose runner has one prompt "
                             "path): a step's prompt chunks together through each GEMM (ragged, the default) or "
                             "each alone through the one-sequence prefill graphs (per-sequence)")


def prompt_length(i: int, prompt_tokens: int) -> int:
    """Request ``i``'s own prompt length (after the shared prefix): 0.75-1.25 x ``prompt_tokens``."""
    return max(1, round(prompt_tokens * (0.75 + 0.5 * ((i * GOLDEN) % 1.0))))


def request_sizes(n: int, prompt_tokens: int, new_tokens: int, shared_prefix: int) -> list[int]:
    """Tokens (prompt and new) of each of :func:`workload`'s ``n`` requests, without building them."""
    return [shared_prefix + prompt_length(i, prompt_tokens) + new_tokens for i in range(n)]


def workload(n: int, prompt_tokens: int, new_tokens: int, shared_prefix: int, vocab: int) -> list[tuple[list[int], int]]:
    """``n`` deterministic (prompt ids, new tokens) requests; ids avoid the first 8 (specials)."""
    span = vocab - 16
    prefix = [(j * 7919 + 11) % span + 8 for j in range(shared_prefix)]
    out = []
    for i in range(n):
        length = prompt_length(i, prompt_tokens)
        own = [((i + 1) * 104729 + j * 7919) % span + 8 for j in range(length)]
        out.append((prefix + own, new_tokens))
    return out


def _validate(args, cpu: bool) -> None:
    lengths = int_list(args.prompt_tokens, (128,) if cpu else (512,), "--prompt-tokens")
    if len(lengths) != 1:
        raise ValueError(f"the serve stage takes one --prompt-tokens value, got {args.prompt_tokens!r}")
    args.prompt_tokens = lengths[0]
    args.concurrency = int_list(args.concurrency, (1, 8, 32) if cpu else (1, 8, 64), "--concurrency")
    if max(args.concurrency) > MAX_CONCURRENCY:  # the workload is built as Python lists, request by request
        raise ValueError(f"--concurrency values must be at most {MAX_CONCURRENCY}, got {max(args.concurrency)}")
    args.runs = 3 if args.runs is None else args.runs
    for name in ("new_tokens", "runs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.shared_prefix < 0:
        raise ValueError(f"--shared-prefix must be >= 0, got {args.shared_prefix}")
    args.temperature = float(getattr(args, "temperature", 0.0))
    if not args.temperature >= 0:  # NaN too
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")


def _check_before_loading(args, rt, cfg, model: str) -> int:
    """What the run asks for against what it gets, before the model loads: flags its backend
    ignores, the longest request against the context, and on the CPU the KV pool against the
    host memory available now (the pool is host memory there, committed as blocks are written).
    Returns the longest request's tokens."""
    cpu = not rt.is_cuda
    refuse_off_backend(rt, "serve", "--deterministic", bool(getattr(args, "deterministic", False)))
    refuse_off_backend(rt, "serve", "--prefill-path", getattr(args, "prefill_path", "ragged") != "ragged")
    refuse_off_backend(rt, "serve", "--kv-gpu-budget", getattr(args, "kv_gpu_budget", None) is not None)
    top = max(args.concurrency)
    if cpu and args.kv_memory is None:  # a bound first, cheap whatever --concurrency: a block a request at least
        common.check_memory(top * _cpu_unit(cfg), f"--concurrency {top} requests at once (a KV block each at "
                                 "least, fp32 on the CPU)", "give fewer --concurrency")
    sizes = request_sizes(top, args.prompt_tokens, args.new_tokens, args.shared_prefix)
    longest = max(sizes)
    prefix = f"--shared-prefix {args.shared_prefix} + " if args.shared_prefix else ""
    spread = longest - args.shared_prefix - args.new_tokens
    common.check_context(cfg, rt.backend, model, longest, longest + CONTEXT_SLACK,
                         f"the longest request: {prefix}--prompt-tokens {args.prompt_tokens} ({spread} with the "
                         f"0.75-1.25x spread) + --new-tokens {args.new_tokens}")
    if cpu:
        from ..kvcache.blocks import blocks_for

        unit = _cpu_unit(cfg)
        if args.kv_memory is not None:
            common.check_memory(args.kv_memory, f"--kv-memory {args.kv_memory} (the KV pool, fp32 on the CPU)",
                                "give a smaller --kv-memory")
        else:
            need = sum(blocks_for(n) for n in sizes) * unit
            common.check_memory(
                need, f"--concurrency {top} requests of up to {longest} tokens at once (their KV pool, fp32 on "
                      "the CPU)",
                "give fewer --concurrency, shorter --prompt-tokens/--new-tokens, or a --kv-memory to preempt within")
    return longest


def _pct(values, q) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def run_level(runner, requests, max_context: int, budget: int, fixed_chunks: int = 0,
              prefix_caching: bool = True, temperature: float = 0.0) -> dict:
    """One timed run of ``requests`` arriving together on a fresh engine over ``runner``'s pool
    (greedy, or sampled at ``temperature`` with request i's seed i)."""
    from ..reference.sampling import SamplingParams
    from ..serving import Engine, SchedulerConfig, Sequence

    n = len(requests)
    config = SchedulerConfig(max_running=n, token_budget=max(budget, n + fixed_chunks), fixed_chunks=fixed_chunks)
    engine = Engine(runner, config, prefix_caching=prefix_caching)
    params = [SamplingParams(temperature=temperature, seed=i) if temperature > 0 else SamplingParams()
              for i in range(n)]
    seqs = [Sequence(ids, p, new, max_context) for (ids, new), p in zip(requests, params)]
    timings = getattr(runner, "timings", None)
    before = dict(timings) if timings else None
    t0 = time.perf_counter()
    for s in seqs:
        s.t_arrival = t0
        engine.add(s)
    peak = 0
    phase = {"prefill_steps": 0, "prefill_steps_s": 0.0, "decode_steps": 0, "decode_steps_s": 0.0}
    while engine.has_work:
        running = len(engine.scheduler.running) + len(engine.scheduler.waiting)
        ts = time.perf_counter()
        computed = engine.step()
        kind = "prefill" if computed > running else "decode"  # a step with prompt ids, or decodes only
        phase[f"{kind}_steps"] += 1
        phase[f"{kind}_steps_s"] += time.perf_counter() - ts
        peak = max(peak, engine.blocks.num_used)
    wall = time.perf_counter() - t0
    engine.blocks.audit()
    if engine.blocks.num_used or any(s.finish_reason != "length" for s in seqs):
        raise RuntimeError(f"the run ended badly: {[s.finish_reason for s in seqs]}, {engine.blocks.num_used} blocks held")
    out = sum(len(s.output_ids) for s in seqs)
    ttft = [s.t_first - t0 for s in seqs]
    tpot = [(s.t_last - s.t_first) / (len(s.output_ids) - 1) for s in seqs if len(s.output_ids) > 1]
    split = {}
    if before is not None:  # the CUDA runner's share of the wall time: host enqueue, device wait, picks
        split = {f"runner_{k}": timings[k] - before[k] for k in ("enqueue_s", "wait_s", "picks_s")}
        split["engine_host_s"] = wall - sum(split.values())
    return {**split, **phase, "wall_s": wall, "output_tokens": out, "output_tokens_per_s": out / wall,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "tpot_p50_s": _pct(tpot, 50), "tpot_p99_s": _pct(tpot, 99),
            "kv_blocks_peak": peak, "kv_blocks_total": engine.blocks.num_blocks,
            "prefix_hit_blocks": engine.blocks.hits, "prompt_tokens": sum(len(i) for i, _ in requests),
            "computed_tokens": engine.metrics.computed_tokens, "steps": engine.metrics.steps,
            "preemptions": engine.scheduler.preemptions, "output_ids": [list(s.output_ids) for s in seqs],
            **({"swap": engine.swap.counts()} if engine.swap is not None else {})}


def _median_run(runs: list[dict]) -> dict:
    runs = sorted(runs, key=lambda r: r["output_tokens_per_s"])
    best = dict(runs[len(runs) // 2])
    best["output_tokens_per_s_runs"] = [r["output_tokens_per_s"] for r in runs]
    return best


def _one_sequence_tpot(llm, ids: list[int], new_tokens: int, runs: int) -> float:
    """Median seconds per output token of the runner's own decode loop (the decode stage's path)."""
    from ..reference.sampling import SamplingParams

    times = []
    for _ in range(runs):
        stamps = []
        llm.runner.generate_tokens(ids, new_tokens, SamplingParams(), lambda t: stamps.append(time.perf_counter()) and False)
        times.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    return float(np.median(times))


def run(args) -> dict:
    from .. import firmware
    from ..engine.llm import LLM
    from ..engine.requests import CUDA_TOKEN_BUDGET, FIXED_CHUNK
    from ..kvcache.blocks import blocks_for

    firmware.init(profile=args.profile, backend=args.backend)
    rt = firmware.runtime()
    cpu = not rt.is_cuda
    _validate(args, cpu=cpu)
    model = args.model
    cfg = resolve_model_config(model)
    note = "CPU backend: a CPU figure, not comparable to a GPU" if cpu else ""
    if cpu and model != CPU_MODEL and not getattr(args, "model_explicit", False):
        note = f"CPU backend: ran {CPU_MODEL} instead of {model} (a CPU figure, not comparable to a GPU)"
        model = CPU_MODEL
        cfg = resolve_model_config(model)
    longest = _check_before_loading(args, rt, cfg, model)
    deterministic = bool(getattr(args, "deterministic", False)) and not cpu
    prefill_path = None if cpu else getattr(args, "prefill_path", "ragged")  # the CPU runner has one path
    budget = 512 if cpu else CUDA_TOKEN_BUDGET + (FIXED_CHUNK if deterministic else 0)
    llm = LLM(model, backend=rt.backend, max_context=longest + CONTEXT_SLACK)
    cfg = llm.config
    levels, one_seq = {}, None
    runner = None
    try:
        top = max(args.concurrency)
        workloads = {n: workload(n, args.prompt_tokens, args.new_tokens, args.shared_prefix, cfg.vocab_size)
                     for n in args.concurrency}
        need = max(sum(blocks_for(len(p) + m) for p, m in w) for w in workloads.values())
        runner = _pool_runner(llm, cpu, need, args, top, budget, deterministic, prefill_path)
        fixed = FIXED_CHUNK if deterministic else 0
        for n in args.concurrency:
            run_level(runner, workload(1, 8, 2, 0, cfg.vocab_size), llm.runner.max_context, budget, fixed,
                      not deterministic, args.temperature)  # warm-up
            runs = [run_level(runner, workloads[n], llm.runner.max_context, budget, fixed, not deterministic,
                              args.temperature) for _ in range(args.runs)]
            levels[str(n)] = _median_run(runs)
        if not cpu and 1 in args.concurrency:  # the same lone request through the one-sequence decode loop
            ids, new = workloads[1][0]
            one_seq = _one_sequence_tpot(llm, ids, new, args.runs)
            levels["1"]["one_sequence_tpot_s"] = one_seq
            levels["1"]["engine_over_one_sequence"] = levels["1"]["tpot_p50_s"] / one_seq
        if str(top) in levels and "1" in levels and top > 1:  # batch invariance: the lone ids vs among others
            alone = levels["1"]["output_ids"][0]
            among = levels[str(top)]["output_ids"][0]
            levels[str(top)]["same_ids_as_alone"] = alone == among
        for lv in levels.values():
            lv.pop("output_ids", None)
        peer = None
        if not args.no_peers:
            peer = _peer(llm, model, args)
            if "output_tokens_per_s" in peer:
                peer["nexusrt_ratio"] = levels[str(top)]["output_tokens_per_s"] / peer["output_tokens_per_s"]
    finally:
        if runner is not None:
            runner.close()
        llm.close()
    return {"backend": rt.backend, "device": rt.profile.device_name, "model": model, "note": note,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "shared_prefix": args.shared_prefix,
            "runs": args.runs, "token_budget": budget, "deterministic": deterministic, "prefill_path": prefill_path,
            "temperature": args.temperature, "levels": levels,
            "transformers_continuous_batching": peer}


def _batch_runner(llm, cpu: bool, need: int, kv_memory, max_batch: int, budget: int, deterministic: bool,
                  prefill_path: str | None = "ragged", kv_gpu_budget: int | None = None):
    """The backend's batch runner over ``llm``'s weights, with ``need`` blocks (or ``kv_memory`` bytes);
    on CUDA, prompt chunks by ``prefill_path`` (:data:`PREFILL_PATHS`), and with ``kv_gpu_budget`` the
    pool capped at it and a host tier for preempted requests (``engine.requests.engine_tiers``)."""
    from ..kvcache.tiers import block_bytes

    if kv_gpu_budget is not None and cpu:
        raise ValueError("--kv-gpu-budget needs the CUDA backend (the CPU engine keeps its KV in one memory)")
    cfg = llm.config
    unit = block_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)  # bf16, as on CUDA
    if cpu:
        from ..backends.cpu.batch import CpuBatchRunner, blocks_for_bytes

        blocks = need if kv_memory is None else blocks_for_bytes(cfg, kv_memory)
        _holds_a_block("--kv-memory", kv_memory, blocks, 2 * unit)  # the CPU pools are fp32
        return CpuBatchRunner(llm.runner.decoder, blocks, llm.runner.max_context)
    from ..backends.cuda.batch import CudaBatchRunner
    from ..engine.requests import engine_tiers

    for flag, value in (("--kv-memory", kv_memory), ("--kv-gpu-budget", kv_gpu_budget)):
        _holds_a_block(flag, value, None if value is None else value // unit, unit)
    blocks, host = engine_tiers(cfg, max_batch, llm.runner.max_context,
                                need * unit if kv_memory is None else kv_memory, kv_gpu_budget)
    if prefill_path not in PREFILL_PATHS:
        raise ValueError(f"--prefill-path must be one of {', '.join(PREFILL_PATHS)}, got {prefill_path!r}")
    return CudaBatchRunner(llm.runner, blocks, max_batch, max_chunk=budget, deterministic=deterministic,
                           ragged_prefill=prefill_path == "ragged", host_blocks=host)


def _cpu_unit(cfg) -> int:
    from ..backends.cpu.batch import cpu_block_bytes

    return cpu_block_bytes(cfg)


def _pool_runner(llm, cpu: bool, need: int, args, top: int, budget: int, deterministic: bool, prefill_path):
    """:func:`_batch_runner` with the stage's flags; a pool that does not fit the memory it goes
    to is said naming the flag that sized it (not as the CLI's "--max-context", which the bench
    does not have)."""
    kv_memory, kv_gpu_budget = args.kv_memory, getattr(args, "kv_gpu_budget", None)
    try:
        return _batch_runner(llm, cpu, need, kv_memory, top, budget, deterministic, prefill_path, kv_gpu_budget)
    except MemoryError as exc:
        where = "host" if cpu else "device"
        if kv_memory is not None or kv_gpu_budget is not None:
            flags = " and ".join(f"{f} {v}" for f, v in (("--kv-memory", kv_memory), ("--kv-gpu-budget", kv_gpu_budget))
                                 if v is not None)
            raise ValueError(f"{flags} bytes: the KV pool does not fit the {where} memory ({exc}); "
                             "give fewer bytes") from None
        raise ValueError(f"the KV pool for --concurrency {top} requests at once ({need} blocks) does not fit the "
                         f"{where} memory ({exc}); give fewer --concurrency, shorter requests, or --kv-memory "
                         "BYTES to preempt within") from None


def _holds_a_block(flag: str, value: int | None, blocks: int | None, unit: int) -> None:
    """Refuse a byte count ``value`` given to ``flag`` that makes no KV block of ``unit`` bytes,
    naming the flag (the runner's own "num_blocks must be >= 1" does not say which flag)."""
    if value is not None and blocks < 1:
        raise ValueError(f"{flag} {value} bytes holds no KV block ({unit} bytes) of this model; "
                         f"give at least {unit}, or leave it out")


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
             f"median of {r['runs']}{', prefill ' + r['prefill_path'] if r.get('prefill_path') else ''}"
             f"{', temperature ' + str(r['temperature']) if r.get('temperature') else ''}")
    out = table(["requests", "out tok/s", "TTFT p50/p99 ms", "TPOT p50/p99 ms", "KV blocks peak/pool",
                 "prefix hits", "computed", "preempted"], rows, title=title)
    peer = r.get("transformers_continuous_batching")
    if peer is not None:
        if "output_tokens_per_s" in peer:
            out += (f"\ntransformers {peer['transformers']} continuous batching, same {peer['requests']} requests: "
                    f"{peer['output_tokens_per_s']:.0f} out tok/s -> NexusRT {peer['nexusrt_ratio']:.2f}x")
        else:
            out += f"\ntransformers continuous batching: {plain(peer)}"
    for n, lv in r["levels"].items():
        if "runner_wait_s" in lv:
            out += (f"\n{n} requests, where the wall time went: device (host waiting) {lv['runner_wait_s']:.2f} s, "
                    f"runner enqueue {lv['runner_enqueue_s']:.2f} s, picks {lv['runner_picks_s']:.2f} s, "
                    f"engine {lv['engine_host_s']:.2f} s of {lv['wall_s']:.2f} s; {lv['prefill_steps']} steps with "
                    f"prompt ids took {lv['prefill_steps_s']:.2f} s "
                    f"({lv['prefill_steps_s'] / max(lv['prefill_steps'], 1) * 1e3:.1f} ms each), {lv['decode_steps']} decode-only steps "
                    f"{lv['decode_steps_s'] / max(lv['decode_steps'], 1) * 1e3:.2f} ms each")
    for n, lv in r["levels"].items():
        if "swap" in lv:
            sw = lv["swap"]
            out += (f"\n{n} requests, host tier ({sw['host_blocks']} blocks): {sw['swapped_out']} preemptions swapped "
                    f"out ({sw['blocks_swapped_out']} blocks) and {sw['swapped_in']} back in "
                    f"({sw['blocks_swapped_in']} blocks copied, {sw['blocks_reused']} found in the prefix cache), "
                    f"{lv['preemptions'] - sw['swapped_out']} recomputed")
    one = r["levels"].get("1", {})
    if "one_sequence_tpot_s" in one:
        out += (f"\n1 request: engine TPOT {one['tpot_p50_s'] * 1e3:.3f} ms vs the one-sequence decode loop "
                f"{one['one_sequence_tpot_s'] * 1e3:.3f} ms -> {one['engine_over_one_sequence']:.3f}x")
    for n, lv in r["levels"].items():
        if "same_ids_as_alone" in lv:
            out += (f"\nbatch invariance ({'deterministic mode' if r.get('deterministic') else 'default mode'}): "
                    f"request 0's {'seeded' if r.get('temperature') else 'greedy'} ids among {n} "
                    f"{'equal' if lv['same_ids_as_alone'] else 'DIFFER from'} "
                    "its ids alone")
    if r.get("note"):
        out += f"\nnote: {r['note']}"
    return out
