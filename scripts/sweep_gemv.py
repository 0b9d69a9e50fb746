"""Time every decode GEMV shape at several split-K factors, with and without PDL (GPU only).

    PYTHONPATH=. python3 scripts/sweep_gemv.py [--presets llama-3.2-1b llama-3.1-8b] [--m 1 8]

Prints one row per (shape, tokens, splits): microseconds and % of the read bandwidth measured
in the same run. Used to set the split heuristic in nexusrt/kernels/ops/gemv.py. ``--m`` also
times the batched decode's variants (gemv_m{2,4,8}_*: M tokens share one read of the weights,
but each reads its own x from shared memory; NOTES.md says what M = 8 should cost).
"""
import argparse

import nexusrt as nrt
from nexusrt.bench.kernels import _free, summarise, time_case
from nexusrt.kernels.ops import gemv as gv
from nexusrt.kernels.ops.membw import measure_read_bandwidth
from nexusrt.models.presets import preset

ap = argparse.ArgumentParser()
ap.add_argument("--presets", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
ap.add_argument("--splits", nargs="+", type=int, default=[1, 2, 3, 4, 6, 8])
ap.add_argument("--m", nargs="+", type=int, default=[1], help="token counts, 1..8 (default 1)")
a = ap.parse_args()
nrt.firmware.init(backend="cuda")
rt = nrt.firmware.runtime()
bw = measure_read_bandwidth(rt)
print(f"read bandwidth {bw / 1e9:.0f} GB/s")
for name in a.presets:
    cfg = preset(name)
    for shape, n, k, opts in gv.decode_shapes(cfg):
        for m in a.m:
            default = gv.plan_gemv(n, k, m, gate_up=opts.get("gate_up", False)).splits
            for s in a.splits:
                for pdl in (False, True):
                    try:
                        cases = gv.bench_cases(rt, cfg, splits=s, only=shape, m=m)
                    except ValueError as exc:
                        print(f"{name:14s} {shape:8s} m={m} splits={s}: {exc}")
                        break
                    for c in cases:
                        for sp in c.launch.specs:
                            sp.pdl = pdl
                        r = summarise(c, time_case(rt, c, 20), bw)
                        mark = "*" if s == default else " "
                        print(f"{name:14s} {shape:8s} {n}x{k} m={m} splits={s}{mark} pdl={int(pdl)} "
                              f"{r['us']:8.2f} us {r['pct_bw']:6.1f} %BW", flush=True)
                    _free(cases)
nrt.firmware.shutdown()
