"""``nexusrt-bench --stage prefill``: time to first token against the compute floor and PyTorch.

Batch 1, one prompt per ``--prompt-tokens`` length (512,2048,8192), deterministic ids, one
warm-up then the median of ``--runs`` runs (3). TTFT is prefill of the whole prompt plus the
first token sampled on the device and read by the host. The floor is the prompt's FLOPs
(every linear layer on every row, causal attention, the LM head of the last row) divided by
the bf16 matrix rate cuBLASLt reaches on this card in this run (an 8192-cubed GEMM on
random data). With torch importable, HF transformers runs the same shape (random bf16
weights, sdpa attention) in the same process, and SDPA's causal attention at 8k is timed
beside our attention kernel. On the CPU backend it runs ``nexusrt:stdlib-tiny`` and says so.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from ..models.shipped import DEFAULT_MODEL
from .common import (add_model_argument, add_shared_argument, check_context, int_list, prompt_ids,
                     resolve_model_config)
from .table import table

CPU_MODEL = DEFAULT_MODEL  # the shipped trained model: small enough for NumPy
DEFAULT_LENGTHS = (512, 2048, 8192)
CPU_MAX_TOKENS = 256  # the NumPy prefill is O(n^2) per layer in Python; keep the stage short
ATTENTION_TOKENS = 8192
# The options this stage reads (nexusrt-bench refuses them with another stage; see main's docstring).
OPTIONS = frozenset({"model", "prompt_tokens", "runs", "no_peers"})


def add_arguments(parser) -> None:
    add_model_argument(parser)
    add_shared_argument(parser, "--prompt-tokens", default=None, metavar="N[,N...]",
                        help="decode stage: prompt length (32); prefill stage: lengths to time (512,2048,8192)")
    add_shared_argument(parser, "--runs", type=int, default=None, metavar="R",
                        help="timed runs, median reported (decode 5, prefill 3)")
    add_shared_argument(parser, "--no-peers", action="store_true", help="decode/prefill stages: skip the PyTorch peers")


def prefill_flops(cfg, tokens: int) -> dict:
    """FLOPs of prefilling ``tokens`` tokens from an empty cache: linear layers on every row,
    causal attention (``4 * D`` per visible key per head), the LM head on the last row."""
    h, d, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    hq, hkv, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    per_row = 2 * ((hq + 2 * hkv) * d * h + h * hq * d + 3 * inter * h)
    linear = L * per_row * tokens
    attention = L * 4 * d * hq * (tokens * (tokens + 1) // 2)
    head = 2 * cfg.vocab_size * h
    return {"linear": linear, "attention": attention, "lm_head": head, "total": linear + attention + head}


def run(args) -> dict:
    from .. import firmware
    from ..engine.llm import LLM
    from ..reference.sampling import SamplingParams

    lengths = int_list(args.prompt_tokens, DEFAULT_LENGTHS, "--prompt-tokens")
    runs = 3 if args.runs is None else args.runs
    if runs < 1:
        raise ValueError(f"--runs must be >= 1, got {runs}")
    firmware.init(profile=args.profile, backend=args.backend)
    rt = firmware.runtime()
    model = args.model
    cfg = resolve_model_config(model)  # an unknown name or a bad directory fails here, on any backend
    notes = []
    if not rt.is_cuda:
        if model != CPU_MODEL and not getattr(args, "model_explicit", False):
            notes.append(f"CPU backend: ran {CPU_MODEL} instead of {model} (a CPU figure, not comparable to a GPU)")
            model = CPU_MODEL
            cfg = resolve_model_config(model)
        if max(lengths) > CPU_MAX_TOKENS:
            notes.append(f"CPU backend: prompts capped at {CPU_MAX_TOKENS} tokens")
            lengths = sorted({min(n, CPU_MAX_TOKENS) for n in lengths})
    # Before the kernels compile and the model loads; the runner is asked for one position more.
    check_context(cfg, rt.backend, model, max(lengths), max(lengths) + 1,
                  "the longest --prompt-tokens")
    compile_s = None
    if rt.is_cuda:  # compile (or read from the disk cache) every kernel first, so capture_s is capture
        from ..kernels.compiler import all_sources

        t0 = time.perf_counter()
        for source in all_sources():
            rt.kernels.library(source)
        compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm = LLM(model, max_context=max(lengths) + 1)
    load_s = time.perf_counter() - t0
    cfg, runner = llm.config, llm.runner
    greedy = SamplingParams(temperature=0.0)
    rows = []
    try:
        for n in lengths:
            ids = prompt_ids(n, cfg.vocab_size)
            times = []
            for r in range(runs + 1):  # the first is the warm-up
                runner.reset()
                start = time.perf_counter()
                runner.prefill(ids)
                runner.sample(greedy, 0)  # the first token, on the host
                if r:
                    times.append(time.perf_counter() - start)
            flops = prefill_flops(cfg, n)
            ms = statistics.median(times) * 1e3
            rows.append({"prompt_tokens": n, "ttft_ms": ms, "runs_ms": [t * 1e3 for t in times],
                         "flops": flops["total"], "attention_flops": flops["attention"],
                         "tflops": flops["total"] / (ms * 1e-3) / 1e12})
        timings = dict(getattr(runner, "timings", {}))
    finally:
        llm.close()
    result = {"backend": rt.backend, "device": rt.profile.device_name, "profile": rt.profile.name, "model": model,
              "notes": notes, "runs": runs, "load_s": load_s, "lengths": rows, "kernels_load_s": compile_s,
              "capture_s": timings.get("capture_s"), "buckets": list(getattr(runner, "buckets", []) or [])}
    if rt.is_cuda:
        _add_floors(rt, result)
        if not args.no_peers:
            _add_peers(rt, cfg, result, runs)
    return result


def _add_floors(rt, result: dict) -> None:
    from ..kernels.ops.cublaslt import LtContext
    from ..kernels.ops.matmul_rate import measure_matmul_rate

    lt = LtContext(rt)
    try:
        rate = measure_matmul_rate(rt, lt)
    finally:
        lt.close()
    result["matmul_flops_s"] = rate
    for row in result["lengths"]:
        row["floor_ms"] = row["flops"] / rate * 1e3
        row["fraction_of_floor"] = row["floor_ms"] / row["ttft_ms"]


def _add_peers(rt, cfg, result: dict, runs: int) -> None:
    try:
        import torch

        if not torch.cuda.is_available():
            result["peers"] = {"skipped": "torch has no CUDA here"}
            return
    except Exception as exc:  # torch missing or broken: the peers are optional
        result["peers"] = {"skipped": f"torch not importable: {exc}"}
        return
    from . import torch_prefill_peer as peer

    lengths = [row["prompt_tokens"] for row in result["lengths"]]
    hf = peer.hf_prefill_ms(cfg, lengths, runs)
    for row in result["lengths"]:
        got = hf.get(row["prompt_tokens"], {})
        row["hf"] = got
        if "ttft_ms" in got:
            row["speedup_vs_hf"] = got["ttft_ms"] / row["ttft_ms"]
    result["attention"] = _attention_vs_sdpa(rt, cfg, runs)


def _attention_vs_sdpa(rt, cfg, runs: int) -> list[dict]:
    """Our tensor-core causal attention over an 8k prompt in one launch against torch SDPA (flash)
    on the same shape (the model's heads; head_dim 64 and 128), TFLOP/s in the same run."""
    from . import torch_prefill_peer as peer
    from .. import memory
    from ..kernels.ops import attention_prefill as ap
    from ..kernels.ops.bench_util import time_ms

    n, hq, hkv = ATTENTION_TOKENS, cfg.num_attention_heads, cfg.num_key_value_heads
    out = []
    for d, shape in ((d, ap.MMA_SHAPE[d]) for d in ap.HEAD_DIMS):
        flops = ap.causal_flops(n, 0, hq, d)
        cache = ap.random_cache(rt, n, hkv, d)
        rng = np.random.default_rng(d)
        q = memory.from_numpy(rng.standard_normal((n, hq, d), dtype=np.float32), tag="bench")
        o = memory.empty((n, hq * d), "bf16", tag="bench")
        pos = memory.from_numpy(np.zeros(1, np.int32), tag="bench")
        try:
            spec = ap.attention_prefill(rt, q, o, pos=pos, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                                        block=shape, **cache)
            ms = statistics.median(time_ms(rt, spec.launch, max(runs, 5)))
        finally:
            rt.device.synchronize()
            for t in (q, o, pos, *cache.values()):
                t.free()
        row = {"tokens": n, "head_dim": d, "block": f"{shape[0]} warps x {16 * shape[1]} rows"
                                                      + (", Q in smem" if shape[2] else ""),
               "num_q_heads": hq, "num_kv_heads": hkv, "ms": ms,
               "tflops": flops / (ms * 1e-3) / 1e12}
        sdpa = peer.sdpa_ms(n, hq, hkv, d, max(runs, 5))
        if "ms" in sdpa:
            sdpa["tflops"] = flops / (sdpa["ms"] * 1e-3) / 1e12
            row["fraction_of_sdpa"] = row["tflops"] / sdpa["tflops"]
        row["sdpa"] = sdpa
        out.append(row)
    return out


def render(r: dict) -> str:
    lines = [f"model {r['model']} on {r['device']} ({r['backend']}, profile {r['profile']}); batch 1, "
             f"median of {r['runs']} after a warm-up"]
    if r.get("matmul_flops_s"):
        lines.append(f"bf16 matrix rate (cuBLASLt 8192^3, random data, this run): {r['matmul_flops_s'] / 1e12:.0f} TFLOP/s")
    if r.get("capture_s") is not None:
        lines.append(f"graphs captured at load: {r['capture_s'] * 1e3:.0f} ms (decode + prefill chunks {r['buckets']}; "
                     f"kernels loaded before: {r['kernels_load_s'] or 0:.2f} s)")
    rows = []
    for x in r["lengths"]:
        hf = x.get("hf") or {}
        rows.append([x["prompt_tokens"], f"{x['ttft_ms']:.2f}", f"{x['tflops']:.3g}",
                     f"{x['floor_ms']:.2f}" if "floor_ms" in x else "-",
                     f"{x['fraction_of_floor']:.1%}" if "fraction_of_floor" in x else "-",
                     f"{hf['ttft_ms']:.2f}" if "ttft_ms" in hf else (hf.get("error", "-")[:40] if hf else "-"),
                     f"{x['speedup_vs_hf']:.2f}x" if "speedup_vs_hf" in x else "-"])
    lines.append(table(["prompt", "TTFT ms", "TFLOP/s", "floor ms", "of floor", "HF eager ms", "vs HF"], rows,
                       title="Prefill: time to first token"))
    att = r.get("attention") or []
    if att:
        arows = []
        for a in att:
            s = a.get("sdpa") or {}
            arows.append([f"{a['tokens']} causal, {a['num_q_heads']}/{a['num_kv_heads']} heads, d{a['head_dim']}, "
                          f"{a['block']}",
                          f"{a['ms']:.3f}", f"{a['tflops']:.0f}",
                          f"{s['tflops']:.0f}" if "tflops" in s else s.get("error", "-")[:40],
                          f"{a['fraction_of_sdpa']:.0%}" if "fraction_of_sdpa" in a else "-"])
        lines.append(table(["attention", "ms", "TFLOP/s", "SDPA TFLOP/s", "of SDPA"], arows,
                           title="Prefill attention alone, against torch SDPA (flash) in the same run"))
    if isinstance(r.get("peers"), dict) and "skipped" in r["peers"]:
        lines.append(f"peers skipped: {r['peers']['skipped']}")
    for n in r.get("notes") or []:
        lines.append(f"note: {n}")
    return "\n".join(lines)
