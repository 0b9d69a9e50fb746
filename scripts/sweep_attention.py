"""Time the tensor-core prefill attention variants on this GPU: every built block shape
(warps x m16 tiles per warp) and the register caps the 4-warp kernels are built with (blocks
per SM), at 8k causal, 32/8 heads.

    PYTHONPATH=. python3 scripts/sweep_attention.py

Each cap is a separate NVRTC build of cu/attention_prefill_mma.cu with -D overrides; every
variant is checked against the default build on the same random data before it is timed.
"""

from __future__ import annotations

import statistics

import numpy as np

import nexusrt as nrt
from nexusrt.kernels.compiler import compile_file
from nexusrt.kernels.launch import Library
from nexusrt.kernels.ops import attention_prefill as ap
from nexusrt.kernels.ops.bench_util import time_ms

TOKENS, HQ, HKV = 8192, 32, 8
# Register caps of the 4-warp, 1-tile kernels (-D overrides); caps of 2-4 blocks per SM measured
# within 2% of uncapped on 2026-12-01, so only the default build runs unless one is added here.
BUILDS = {"default": ()}


def main() -> None:
    nrt.firmware.init(backend="cuda")
    rt = nrt.firmware.runtime()
    rows = []
    for d in ap.HEAD_DIMS:
        cache = ap.random_cache(rt, TOKENS, HKV, d)
        q = nrt.memory.from_numpy(np.random.default_rng(d).standard_normal((TOKENS, HQ, d), dtype=np.float32))
        pos = nrt.memory.from_numpy(np.zeros(1, np.int32))
        ref = nrt.memory.empty((TOKENS, HQ * d), "bf16")
        out = nrt.memory.empty((TOKENS, HQ * d), "bf16")
        ap.attention_prefill(rt, q, ref, pos=pos, num_q_heads=HQ, num_kv_heads=HKV, head_dim=d, **cache).launch()
        want = ref.to_numpy().astype(np.float32)
        flops = ap.causal_flops(TOKENS, 0, HQ, d)
        for label, opts in BUILDS.items():
            lib = Library(compile_file(ap.SOURCE_MMA, rt.profile.arch, opts, use_cache=False).cubin, label)
            for block in ap.MMA_SHAPES[d]:
                warps, tiles, _ = block
                kernel = lib.kernel(ap.mma_kernel_name(d, block), ap.SIGNATURE)
                shared = ap.mma_shared_bytes(d, block)
                kernel.set_max_dynamic_shared(shared, rt.device.handle)
                args = kernel.pack(q.ptr, out.ptr, cache["k_pool"].ptr, cache["v_pool"].ptr, cache["block_table"].ptr,
                                   pos.ptr, TOKENS, HQ, HKV, ap.LOG2E / d ** 0.5)
                grid = (HQ, -(-TOKENS // (16 * warps * tiles)), 1)

                def launch(stream, kernel=kernel, grid=grid, warps=warps, args=args, shared=shared):
                    kernel.launch(grid, (32 * warps, 1, 1), args, stream, shared)

                launch(rt.streams["compute"])
                err = float(np.abs(out.to_numpy().astype(np.float32) - want).max())
                ms = statistics.median(time_ms(rt, launch, 10))
                rows.append((d, label, ap.mma_kernel_name(d, block)[22:], ms, flops / ms / 1e9, err))
            lib.unload()
        for t in (q, pos, ref, out, *cache.values()):
            t.free()
    print(f"{'d':>4} {'build':<20} {'kernel':>14} {'ms':>8} {'TFLOP/s':>8} {'max diff':>9}")
    for d, label, warps, ms, tf, err in rows:
        print(f"{d:>4} {label:<20} {warps:>14} {ms:>8.3f} {tf:>8.1f} {err:>9.2e}")
    nrt.firmware.shutdown()


if __name__ == "__main__":
    main()
