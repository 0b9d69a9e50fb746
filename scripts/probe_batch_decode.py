"""Where the batched decode step's time goes, on the GPU (a development probe, not a benchmark).

    PYTHONPATH=. python3 scripts/probe_batch_decode.py [--model synthetic:llama-3.1-8b] [--context 768]

For each batch bucket: the captured batched-decode graph (CUDA events, median of 20) with
every row at ``--context`` tokens of random KV, against the floor (weights + the rows' KV
bytes over the read bandwidth measured in the same run). For the largest bucket also the
GEMMs alone, RoPE+attention alone, and attention at other split counts, each captured as
its own chain of the same launches.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import numpy as np


def chain(stages, keep):
    """The stages whose name passes ``keep``, re-chained in order."""
    out = []
    for st in stages:
        if keep(st.name):
            out.append(dataclasses.replace(st, depends_on=(out[-1].name,) if out else ()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthetic:llama-3.1-8b")
    ap.add_argument("--context", type=int, default=768)
    ap.add_argument("--buckets", default="1,8,32,64")
    args = ap.parse_args()

    import nexusrt as nrt
    from nexusrt import scheduler
    from nexusrt.backends.cuda import step as steps
    from nexusrt.backends.cuda.batch import CudaBatchRunner
    from nexusrt.kernels.ops import attention_decode as ad
    from nexusrt.kernels.ops.bench_util import time_ms
    from nexusrt.kernels.ops.elementwise import fill_uniform_bf16
    from nexusrt.kernels.ops.membw import measure_read_bandwidth
    from nexusrt.kvcache.blocks import blocks_for

    buckets = [int(b) for b in args.buckets.split(",")]
    nrt.firmware.init(backend="cuda")
    rt = nrt.firmware.runtime()
    llm = nrt.LLM(args.model, backend="cuda", max_context=args.context + 64)
    cfg, w = llm.config, llm.runner.weights
    per = blocks_for(args.context)
    batch = CudaBatchRunner(llm.runner, per * max(buckets) + 1, max(buckets), max_chunk=256)
    stream = rt.streams["compute"]
    try:
        for i, pool in enumerate(batch.pre.k_pools + batch.pre.v_pools):  # random KV, never zeros
            n = int(np.prod(pool.shape))
            fill_uniform_bf16(rt, pool.reshape(n), n, 100 + i, 1.0).launch(stream)
        bb = batch.bb
        bb.h_ids.array[:] = np.arange(bb.bmax) % cfg.vocab_size
        for r in range(bb.bmax):
            bb.h_meta.array[r] = (args.context - 1, args.context - 1, r, 0)
            bb.h_tables.array[r, :per] = np.arange(r * per, (r + 1) * per) % batch.num_blocks
            bb.h_tables.array[r, per:] = batch.scratch
        for dst, src in ((bb.ids, bb.h_ids), (bb.meta, bb.h_meta), (bb.tables, bb.h_tables)):
            dst.copy_from(src.array)
        bw = measure_read_bandwidth(rt)
        weight_bytes = sum(t.nbytes for t in w.owned)
        kv_row = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * args.context
        print(f"{args.model}: weights {weight_bytes / 1e9:.2f} GB, KV {kv_row / 1e6:.1f} MB per row at "
              f"context {args.context}, read bandwidth {bw / 1e9:.0f} GB/s")

        def timed(stages):
            g = scheduler.capture(stages, stream="compute")
            try:
                return statistics.median(time_ms(rt, lambda s: g.replay(), repeats=20, warmup=3))
            finally:
                g.close()

        for m in buckets:
            ms = statistics.median(time_ms(rt, lambda s: batch._graphs[("batch", m)].replay(), 20, 3))
            floor = (weight_bytes + m * kv_row) / bw * 1e3
            print(f"bucket {m:4d}: step {ms:.3f} ms, floor {floor:.3f} ms ({floor / ms:.0%}); "
                  f"{m / ms * 1e3:.0f} rows/s")
        m = max(buckets)
        ws = bb.workspaces[m]
        full = steps.batch_decode_stages(rt, cfg, w, bb, m, llm.runner.lt, ws)
        gemm = timed(chain(full, lambda n: n.split(".")[-1] in ("qkv", "o", "gate_up", "down", "lm_head")))
        attn = timed(chain(full, lambda n: n.split(".")[-1] in ("rope_append", "attention")))
        rest = timed(chain(full, lambda n: n.split(".")[-1] in ("embed", "attn_norm", "mlp_norm", "silu_mul",
                                                                 "final_norm", "argmax")))
        print(f"bucket {m}: GEMMs {gemm:.3f} ms (weights floor {weight_bytes / bw * 1e3:.3f}), rope+attention "
              f"{attn:.3f} ms (KV floor {m * kv_row / bw * 1e3:.3f}), norms/act/embed/argmax {rest:.3f} ms; "
              f"splits {ws.max_splits}")
        for splits in (1, 2, 4, 8, 16):
            ws2 = ad.alloc_workspace(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, splits,
                                     tag="probe", rows=m)
            try:
                st = steps.batch_decode_stages(rt, cfg, w, bb, m, llm.runner.lt, ws2)
                a = timed(chain(st, lambda n: n.split(".")[-1] in ("rope_append", "attention")))
                print(f"  splits {splits:3d}: rope+attention {a:.3f} ms")
            finally:
                ws2.free()
    finally:
        batch.close()
        llm.close()


if __name__ == "__main__":
    main()
