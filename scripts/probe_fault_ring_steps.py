"""Where the fault ring's moves land in the kv bench's row (b): per decode step, its device time
and the host time of the service after it (a GPU probe, not a benchmark).

    PYTHONPATH=. python3 scripts/probe_fault_ring_steps.py [--context 32768] [--steps 128] [--flush-after 0]
        [--reserve-blocks N]

Builds the bench's (b) runner (``--model``, default ``synthetic:llama-3.1-8b``): the oldest half
of ``--context`` tokens on the pinned host tier, a fault reserve as large as that half (or
``--reserve-blocks``: a smaller one parks the blocks it cannot take, and the services go quiet); prefills
to ``context - steps`` tokens and enqueues ``--steps`` decode steps back to back, as
``kv_timing.time_decode`` does (no synchronize between steps). With ``--flush-after N`` (N > 0)
it flushes the ring after step N, as the bench's warm-up run now ends. Prints one line per step:

- ``gpu ms``: timing events on the compute stream around the step (a gap where the host was
  late, e.g. inside a long service, counts in the step that follows it);
- ``service ms``: host time of the ``FaultService.service`` call after the step;
- ``moved``: blocks whose moves were issued so far; ``host``: table entries still naming host
  blocks (moves issued counted as done).

Then the median gpu ms per group of 32 steps (the bench's runs). What tells the hypotheses apart:
the moves issued in one service that takes hundreds of ms (the old ring-order copies) and
zero-copy step times (~47 ms at 32k) well past step 32 put the moving in the timed runs; steps
at the all-HBM time (~6.4 ms at 32k) once ``host`` is 0 clear the kernels; step times that stay
several ms above the all-HBM time with ``host`` 0 point at the ``_host_fault`` twins instead.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthetic:llama-3.1-8b")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--flush-after", type=int, default=0)
    ap.add_argument("--reserve-blocks", type=int, default=0, help="fault reserve in blocks (0: the host half)")
    args = ap.parse_args()

    import numpy as np

    import nexusrt as nrt
    from nexusrt.backends.cuda.chunks import BUCKETS, buckets_for
    from nexusrt.backends.cuda.runner import CudaRunner
    from nexusrt.driver.streams import Event
    from nexusrt.kvcache.blocks import blocks_for
    from nexusrt.kvcache.tiers import block_bytes
    from nexusrt.models.loader import load_model

    nrt.firmware.init(backend="cuda")
    rt = nrt.firmware.runtime()
    model = load_model(args.model)
    cfg = model.config
    unit = block_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    host = blocks_for(args.context // 2)
    capacity = args.context + buckets_for(args.context, BUCKETS)[0] - 1  # CudaRunner.capacity
    device = blocks_for(capacity) - host
    reserve = (args.reserve_blocks or host) * unit
    runner = CudaRunner(model, rt, max_context=args.context, kv_gpu_budget=device * unit, kv_fault_reserve=reserve)
    svc = runner._faults
    service, host_s = svc.service, []

    def timed_service(written_tokens):
        t0 = time.perf_counter()
        service(written_tokens)
        host_s.append(time.perf_counter() - t0)

    svc.service = timed_service

    def on_host() -> int:  # the drain's table copy (the key kv_tiers() reports is newer than some commits)
        return int((svc.drain.table < 0).sum())
    try:
        runner.prefill(np.random.default_rng(0).integers(0, cfg.vocab_size, args.context - args.steps).astype(np.int32))
        runner.stream.synchronize()
        marks, rows = [Event(rt.backend).record(runner.stream)], []
        for i in range(args.steps):
            runner.decode(1)
            marks.append(Event(rt.backend).record(runner.stream))
            rows.append((host_s[-1], svc.counts()["faults_serviced"], on_host()))
            if args.flush_after and i + 1 == args.flush_after:
                t0 = time.perf_counter()
                runner.service_faults(flush=True)  # the device idles meanwhile: the gap counts in the next step
                print(f"flushed after step {i + 1} in {(time.perf_counter() - t0) * 1e3:.1f} ms: moved "
                      f"{svc.counts()['faults_serviced']}, host {on_host()}")
        runner.stream.synchronize()
        gpu = [a.elapsed_ms(b) for a, b in zip(marks, marks[1:])]
        print(f"{'step':>5} {'gpu ms':>9} {'service ms':>11} {'moved':>6} {'host':>6}")
        for i, (ms, (s, moved, left)) in enumerate(zip(gpu, rows)):
            print(f"{i + 1:>5} {ms:>9.3f} {s * 1e3:>11.3f} {moved:>6} {left:>6}")
        for r in range(0, args.steps, 32):
            print(f"steps {r + 1}..{min(r + 32, args.steps)}: median {statistics.median(gpu[r:r + 32]):.3f} ms, "
                  f"sum {sum(gpu[r:r + 32]):.1f} ms")
        print("counts:", svc.counts())
        # The device's own table (what the kernels read), against the drain's copy: a move whose
        # table write never landed leaves a negative entry here while the drain counts it done.
        runner.service_faults(flush=True)
        device_table = runner.buffers.block_table.to_numpy().reshape(-1)
        print(f"device table: {int((device_table < 0).sum())} host entries of {device_table.size}; drain's copy "
              f"{on_host()}; entries that differ {int((device_table != svc.drain.table).sum())}")
        if not (device_table < 0).any():
            kernel_times(rt, runner, cfg)
    finally:
        runner.close()
        nrt.firmware.shutdown()


def kernel_times(rt, runner, cfg, launches: int = 200) -> None:
    """Layer 0's decode attention on the moved table (no host entry left), timed alone: the plain
    kernel, the host twin and the fault twin read the same device blocks, so any difference is
    the twin's own cost."""
    import statistics

    from nexusrt.driver.streams import Event
    from nexusrt.kernels.ops import attention_decode as attn_dec

    b, hq, hkv, d = runner.buffers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    specs = {}
    for label, extra in (("plain", {}), ("host", dict(host_pools=b.host_pools(0))),
                         ("host_fault", dict(host_pools=b.host_pools(0), fault_ring=b.fault_ring))):
        specs[label] = attn_dec.attention_decode(rt, b.q[0:1].reshape(hq, d), b.dec_attn.reshape(hq * d), b.k_pools[0],
                                                 b.v_pools[0], b.block_table, b.pos, b.attn_ws, num_q_heads=hq,
                                                 num_kv_heads=hkv, head_dim=d, **extra)
    stream = runner.stream
    e0, e1 = Event(rt.backend), Event(rt.backend)  # re-recorded for every timing
    try:
        for label, spec in specs.items():
            times = []
            for _ in range(5):
                e0.record(stream)
                for _ in range(launches):
                    spec.launch(stream)
                e1.record(stream)
                stream.synchronize()
                times.append(e0.elapsed_ms(e1) * 1e3 / launches)
            print(f"layer 0 attention {label:>10} ({spec.name}): median {statistics.median(times):.2f} us per launch")
    finally:
        e0.destroy()
        e1.destroy()


if __name__ == "__main__":
    main()
