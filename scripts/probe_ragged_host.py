"""The ragged prefill's host cost per step, on the CPU (a development probe, not a benchmark).

    PYTHONPATH=. python3 scripts/probe_ragged_host.py [--layers 32] [--rows 2048] [--max-batch 64]

Builds :class:`~nexusrt.backends.cuda.ragged.RaggedPrefill` over the CPU arena with the fake
kernel cache of ``tests/fakes.py`` (a small model of ``--layers`` layers and head_dim 128: the
host work per step depends on the layer and chunk counts, not on the widths), then times, per
step of ``k`` chunks of ~1,930 prompt ids in all (median of ``--repeat``):

- ``run``: what the runner does per step (layout, staging, walking the cached program,
  re-pointing each attention spec), with every launch, GEMM and copy a no-op. The driver's
  own time per call (cuLaunchKernel, cuLaunchKernelEx, cublasLtMatmul, the copies) is not
  in it: the launches are counted instead, for the GPU session to price.
- the alternatives it was chosen over: the launcher called per (layer, chunk) instead of a
  rebind, and the step's stage list built and validated as a task graph (what
  ``nexusrt.scheduler.submit`` does before it launches anything).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from types import SimpleNamespace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--ids", type=int, default=1930)
    ap.add_argument("--chunks", default="1,4,16,64")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    import nexusrt as nrt
    from nexusrt.backends.cuda import step as steps
    from nexusrt.backends.cuda.batch_buffers import BatchBuffers, batch_buckets
    from nexusrt.backends.cuda.buffers import RunnerBuffers
    from nexusrt.backends.cuda.ragged import RaggedPrefill
    from nexusrt.backends.cuda.ragged_layout import bucket_for_rows
    from nexusrt.kernels.ops import attention_prefill as attn_pre
    from nexusrt.models.presets import preset
    from nexusrt.scheduler.graph import TaskGraph
    from tests.fakes import FakeKernel, FakeRuntime
    from tests.test_cuda_ragged_cpu import _entries
    from tests.test_cuda_step_cpu import _FakeLt, _device_weights

    launches = [0]

    class Kernel(FakeKernel):
        def pack(self, *values):
            from nexusrt.kernels.launch import ArgPack, parse_signature

            return ArgPack(parse_signature(self.signature), values)  # the real ctypes packing

        def launch(self, grid, block, args, stream=None, shared=0, pdl=False):
            launches[0] += 1

    class Rt(FakeRuntime):
        def _get(self, source, name, signature):
            k = Kernel(name)
            k.signature = signature
            return k

    class Lt(_FakeLt):
        def plan(self, problem):
            def run(*a):
                launches[0] += 1
            return self.plans.setdefault(problem, SimpleNamespace(problem=problem, run=run))

    nrt.firmware.init(backend="cpu")
    cfg = dataclasses.replace(preset("tiny"), num_hidden_layers=args.layers, head_dim=128, num_attention_heads=8,
                              num_key_value_heads=2)
    rt, lt = Rt(), Lt()
    stream = SimpleNamespace(handle=0, synchronize=lambda: None)
    w = _device_weights(cfg)
    width = 64
    pre = RunnerBuffers(rt, cfg, width * 16, args.rows, positions=width * 16, pool_blocks=200)
    bmax = args.max_batch
    bb = BatchBuffers(rt, cfg, bmax, width, 4 * args.rows, pre.k_pools, pre.v_pools)
    t0 = time.perf_counter()
    rp = RaggedPrefill(rt, cfg, w, lt, pre, bb, scratch=199, stream=stream, batch_buckets=batch_buckets(bmax),
                       h2d=lambda *a: None, d2d=lambda *a: None)
    print(f"RaggedPrefill made in {time.perf_counter() - t0:.2f} s ({len(rp.buckets)} row buckets, "
          f"{cfg.num_hidden_layers} x {bmax} attention specs; cuBLASLt tuning not included)")
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def timed(fn) -> float:
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    for k in (int(x) for x in args.chunks.split(",")):
        k = min(k, bmax)
        lens = [args.ids // k + (1 if j < args.ids % k else 0) for j in range(k)]
        entries = _entries(lens, [16 * (j % 4) for j in range(k)], seed=k)
        launches[0] = 0
        rp.run(entries)
        count = launches[0]
        run_ms = timed(lambda: rp.run(entries))
        m = bucket_for_rows(sum(lens), rp.buckets)
        offsets = [sum(lens[:j]) for j in range(k)]
        buf = rp.buf

        def fresh_specs():
            return [[(f"s{j}", attn_pre.attention_prefill(
                rt, pre.q[o:o + n], pre.attn[o:o + n], pre.k_pools[i], pre.v_pools[i], buf.tables[j],
                buf.starts[j:j + 1], num_q_heads=hq, num_kv_heads=hkv, head_dim=d))
                for j, (o, n) in enumerate(zip(offsets, lens))] for i in range(cfg.num_hidden_layers)]

        launcher_ms = timed(fresh_specs)
        specs = fresh_specs()
        stages = steps.ragged_prefill_stages(rt, cfg, w, pre, buf, m, lt, attention=specs)
        build_ms = timed(lambda: steps.ragged_prefill_stages(rt, cfg, w, pre, buf, m, lt, attention=specs))
        validate_ms = timed(lambda: TaskGraph(stages, "step").validate())
        print(f"{k:3d} chunks, {sum(lens)} ids -> {m} rows: run {run_ms:6.2f} ms for {count} launches "
              f"({run_ms / count * 1e3:.1f} us each) | instead: launcher per (layer, chunk) {launcher_ms:6.2f} ms, "
              f"stage list {build_ms:6.2f} ms + task-graph validation {validate_ms:6.2f} ms ({len(stages)} stages)")
    for part in (rp, bb, pre, w):
        part.free()
    nrt.firmware.shutdown()


if __name__ == "__main__":
    main()
