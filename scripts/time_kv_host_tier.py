"""First timing of the host tier (issue 16): decode ms/token of synthetic:llama-3.1-8b at a
context of 8k and 32k tokens, all KV on the device vs the oldest half on the pinned host tier
read zero-copy, plus the pinned host->device copy rate measured in the same run.

    PYTHONPATH=. python3 scripts/time_kv_host_tier.py [--contexts 8192 32768] [--steps 64]

Prints one JSON line per (context, mode). Not yet a `nexusrt-bench --stage kv` case.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def pinned_copy_rate(nbytes: int = 1 << 30) -> float:
    import nexusrt as nrt
    from nexusrt.driver.calls import call

    host, dev = nrt.memory.pinned((nbytes,), "uint8"), nrt.memory.empty((nbytes,), "uint8")
    call("cuMemcpyHtoD", dev.ptr, host.ptr, nbytes)
    t0 = time.perf_counter()
    for _ in range(5):
        call("cuMemcpyHtoD", dev.ptr, host.ptr, nbytes)
    rate = 5 * nbytes / (time.perf_counter() - t0) / 1e9
    host.free(), dev.free()
    return rate


def main() -> None:
    import nexusrt as nrt
    from nexusrt.backends.cuda.runner import CudaRunner
    from nexusrt.kvcache.blocks import blocks_for
    from nexusrt.kvcache.tiers import block_bytes
    from nexusrt.models.loader import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    nrt.firmware.init(backend="cuda")
    print(json.dumps({"pinned_h2d_GBps": round(pinned_copy_rate(), 2)}), flush=True)
    model = load_model("synthetic:llama-3.1-8b")
    cfg = model.config
    unit = block_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    for ctx in args.contexts:
        for mode in ("all-device", "half-host-zero-copy"):
            max_context = ctx + args.steps + 1
            budget = None
            if mode != "all-device":
                budget = (blocks_for(max_context) // 2) * unit
            r = CudaRunner(model, nrt.firmware.runtime(), max_context=max_context, kv_gpu_budget=budget)
            try:
                r.prefill(np.random.default_rng(0).integers(0, cfg.vocab_size, ctx).astype(np.int32))
                r.decode(1)
                r.stream.synchronize()
                t0 = time.perf_counter()
                for i in range(args.steps - 1):
                    r.decode(2 + i)
                r.stream.synchronize()
                ms = (time.perf_counter() - t0) * 1e3 / (args.steps - 1)
                print(json.dumps({"context": ctx, "mode": mode, "decode_ms_per_token": round(ms, 3),
                                  **r.kv_tiers()}), flush=True)
            finally:
                r.close()
    nrt.firmware.shutdown()


if __name__ == "__main__":
    main()
