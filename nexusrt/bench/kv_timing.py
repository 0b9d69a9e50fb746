"""The device work of the kv stage's speed half: runners built, filled and timed on CUDA.

:class:`CudaKvProbe` returns raw measurements (ms, seconds, bytes/s, the runner's tier
counts); :mod:`.kv_speed` turns them into figures. Decode runs are timed on the host clock
around a stream synchronize: a run is 32 steps of at least ~1 ms each, so the two
synchronizes cost well under 1% of it, and the steps queue back to back on the device as the
host enqueues them.
"""

from __future__ import annotations

import time

import numpy as np

from ..kvcache.blocks import blocks_for

PINNED_BYTES = 1 << 30
PINNED_REPS = 5
TOKEN = 1  # the id every timed step feeds: content does not change a decode step's work
MAX_CHUNK = 2048  # the pruned row's prompt chunks (the batch runner's default token budget)


def _paced_steps(runner, steps: int) -> None:
    """``steps`` decode steps with at most ``QUEUE_AHEAD`` in flight, as ``generate_tokens`` keeps
    them (it waits for each token), the host servicing the fault ring while it waits."""
    from ..backends.cuda.runner import QUEUE_AHEAD
    from ..driver.streams import Event

    marks = []
    try:
        for _ in range(steps):
            runner.decode(TOKEN)
            marks.append(Event(runner.rt.backend, timing=False).record(runner.stream))
            if len(marks) > QUEUE_AHEAD:
                oldest = marks.pop(0)
                while not oldest.query():
                    runner.service_faults()
                oldest.destroy()
    finally:
        for ev in marks:
            ev.destroy()


def time_decode(runner, plan, warmup: list | None = None, on_warm=None, flush: dict | None = None) -> list[float]:
    """ms/token of each timed run: ``runner`` holds ``plan.prefill_to`` tokens; one warm-up run and
    ``plan.runs`` timed ones of ``plan.steps`` steps each fill it to ``plan.context``. ``warmup``: a
    list that receives the warm-up run's ms/token too; ``on_warm()`` is called (untimed) between
    the warm-up run and the first timed one. ``flush``: a dict that receives the warm-up's flush
    timed alone (``seconds``, from the compute stream's idle to the moves' end) and the bytes the
    runner had moved before it (``bytes_before``).

    The warm-up run ends by finishing the fault ring's moves (``service_faults(flush=True)``, a
    no-op without a ring), inside its timer: left alone, the drain of the warm-up's posts (and the
    copies, and the table writes after them) landed in the timed runs, which then read host blocks
    zero-copy for a while. With a ring (``flush`` given) the warm-up is paced as
    ``generate_tokens`` paces a request (:func:`_paced_steps`): a host that enqueued all 32 steps at
    once and then only waited would drain the ring once or twice while they run."""
    if runner.position != plan.prefill_to:
        raise RuntimeError(f"the runner holds {runner.position} tokens, the plan wants {plan.prefill_to}")
    out = []
    for run in range(plan.runs + 1):
        runner.stream.synchronize()
        t0 = time.perf_counter()
        if run or flush is None:
            for _ in range(plan.steps):
                runner.decode(TOKEN)
        else:
            _paced_steps(runner, plan.steps)
        if not run:
            if flush is not None:
                runner.stream.synchronize()  # the flush waits for it first anyway
                flush["bytes_before"] = runner.kv_tiers(flush=False)["bytes_moved"]
                t1 = time.perf_counter()
            runner.service_faults(flush=True)
            if flush is not None:
                flush["seconds"] = time.perf_counter() - t1
        runner.stream.synchronize()
        ms = (time.perf_counter() - t0) * 1e3 / plan.steps
        if run:
            out.append(ms)
            continue
        if warmup is not None:
            warmup.append(ms)
        if on_warm is not None:
            on_warm()
    return out


def time_rows(batch, table: list[int], keep: int, plan, position: int | None) -> list[float]:
    """ms/token of each timed run of one sequence through ``batch.run_tokens``: every step writes
    slot ``keep`` and reads slots ``0 .. keep``, i.e. the steady state of a cache pruned back to
    ``keep`` slots after each step; ``position`` is the first step's RoPE position (None: the
    slot, an unpruned sequence). One warm-up run, ``plan.runs`` timed ones."""
    from ..backends.base import Rows

    token, out = TOKEN, []
    for run in range(plan.runs + 1):
        t0 = time.perf_counter()
        for i in range(plan.steps):  # run_tokens ends each step with a synchronize
            pos = None if position is None else position + i
            token = batch.run_tokens([Rows(np.asarray([token], np.int32), keep, table, True, position=pos)])[0]
        if run:
            out.append((time.perf_counter() - t0) * 1e3 / plan.steps)
    return out


class CudaKvProbe:
    """Measurements of one model on the running CUDA device (``spec``: any name ``load_model`` takes)."""

    pinned_copy = {"bytes": PINNED_BYTES, "reps": PINNED_REPS}

    def __init__(self, rt, spec: str, runs: int):
        from ..models.loader import load_model

        self.rt, self.spec, self.runs = rt, spec, runs
        self.model = load_model(spec)
        self.config = self.model.config
        self._source = None  # (plan, the all-HBM runner holding its prefix): the host rows' fill

    def _filled_source(self, plan):
        """An all-HBM runner holding ``plan.prefill_to`` tokens, prefilled once per plan: every
        host row of a context adopts its blocks (:meth:`half_host`)."""
        from ..backends.cuda.runner import CudaRunner

        if self._source is not None and self._source[0] == plan:
            return self._source[1]
        self.close()
        runner = CudaRunner(self.model, self.rt, max_context=plan.context)
        try:
            runner.prefill(self._ids(plan.prefill_to))
        except BaseException:
            runner.close()
            raise
        self._source = (plan, runner)
        return runner

    def close(self) -> None:
        """Give back the host rows' source runner (if one is held)."""
        if self._source is not None:
            _, runner = self._source
            self._source = None
            runner.close()

    def _ids(self, n: int) -> np.ndarray:
        return np.random.default_rng(0).integers(0, self.config.vocab_size, n).astype(np.int32)

    def hbm_bandwidth(self) -> float:
        from ..kernels.ops.membw import measure_read_bandwidth

        return measure_read_bandwidth(self.rt)

    def pinned_rate(self) -> float:
        from .memory import pinned_h2d_rate

        return pinned_h2d_rate(self.rt, PINNED_BYTES, PINNED_REPS)

    def fits(self, context: int) -> str | None:
        """Why one sequence of ``context`` tokens does not fit the device now, or None."""
        from ..engine.fit import check_fit
        from ..errors import ModelTooLarge

        try:
            check_fit(self.config, "cuda", context, self.spec)
        except ModelTooLarge as exc:
            return str(exc)
        return None

    def all_device(self, plan, evicted: int, keep: int | None, restore: bool = True) -> dict:
        """(a), (d) and (e) on one all-HBM runner of ``plan.context`` tokens: ``recompute_s`` the
        prefills of ``evicted`` tokens from an empty cache (empty without ``restore``),
        ``decode_ms``, ``kv_blocks`` (the runner's KV blocks) and, with ``keep``, ``pruned`` (see
        :meth:`_pruned`)."""
        from ..backends.cuda.runner import CudaRunner

        self.close()  # the last context's source runner: its memory is this context's
        ids = self._ids(plan.prefill_to)
        runner = CudaRunner(self.model, self.rt, max_context=plan.context)
        try:
            runner.prefill(ids[:min(evicted, runner.chunk)])  # warm-up: the graphs' first replay
            recompute = []
            for _ in range(self.runs if restore else 0):  # rebuilding the oldest half = prefilling it
                runner.reset()
                t0 = time.perf_counter()
                runner.prefill(ids[:evicted])
                runner.stream.synchronize()
                recompute.append(time.perf_counter() - t0)
            if runner.position < plan.prefill_to:  # the rest of the prefix after the warm-up or the restores
                runner.prefill(ids[runner.position:])
            out = {"kv_blocks": blocks_for(runner.capacity), "recompute_s": recompute,
                   "decode_ms": time_decode(runner, plan)}
            if keep is not None:
                out["pruned"] = self._pruned(runner, plan, keep)
            return out
        finally:
            runner.close()

    def _pruned(self, base, plan, keep: int) -> dict:
        """(e) through a batch runner on ``base``'s weights: ``unpruned_ms`` (slots = positions) and
        ``pruned_ms`` at RoPE positions ``plan.context - plan.steps ..``, or ``pruned_refused``.

        The kept slots hold the K/V of a plain prefill of ``keep`` ids: a step's work depends on
        how many slots it reads, not on what they hold. The pruned row sets ``Rows.position`` (RoPE
        position) apart from the slot ``start``; a runner that refuses that (the per-sequence prompt
        path offers no pruning) is reported as ``pruned_refused`` instead of a figure."""
        from ..backends.base import Rows
        from ..backends.cuda.batch import CudaBatchRunner

        chunk = min(keep, MAX_CHUNK)
        table = list(range(blocks_for(keep + 1)))
        batch = CudaBatchRunner(base, len(table), max_batch=1, max_chunk=chunk)
        try:
            ids = self._ids(keep)
            for s in range(0, keep, chunk):
                n = min(chunk, keep - s)
                batch.run_tokens([Rows(ids[s:s + n], s, table[:blocks_for(s + n)])])
            out = {"unpruned_ms": time_rows(batch, table, keep, plan, None)}
            first = plan.context - plan.steps
            try:  # the unpruned steps ran on this same table: only the position differs here
                batch.run_tokens([Rows(np.asarray([TOKEN], np.int32), keep, table, True, position=first)])
            except ValueError as exc:
                out["pruned_refused"] = str(exc)
                return out
            out["pruned_ms"] = time_rows(batch, table, keep, plan, first)
            return out
        finally:
            batch.close()

    def half_host(self, plan, device_blocks: int, reserve_blocks: int = 0, prefetch: bool = False) -> dict:
        """(c): a runner of ``plan.context`` tokens keeping ``device_blocks`` KV blocks in HBM and
        the oldest rest on the pinned host tier, filled with an all-HBM runner's prefill
        (:meth:`~nexusrt.backends.cuda.runner.CudaRunner.adopt_kv`) and timed like (a); with
        ``reserve_blocks``, (b): that many more device blocks the fault ring fills as decode reads
        the host blocks (``warmup_ms``: the warm-up run, which ends once its moves are done;
        ``host_entries_timed``: the table entries still naming host blocks when the timed runs began;
        ``flush_s`` / ``flush_bytes``: the warm-up's closing flush timed alone and the bytes it still
        had to move).
        ``prefetch`` (with a reserve, row (f)): the fill's sealed host blocks are moved in as soon as
        it ends (``kv_prefetch``), and the first step waits for those moves (``prefetch_s``, host
        time; their copies run with the link to themselves, so ``move_ms`` times the ring's copies
        alone), counted into ``warmup_ms`` per step; without it only decode's posts move blocks, as
        (b) measures.
        Raises :class:`~nexusrt.kvcache.tiers.KvBudgetError` (before any memory) for a split
        the runner refuses."""
        from ..backends.cuda.runner import CudaRunner
        from ..kvcache.tiers import block_bytes

        cfg = self.config
        unit = block_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        # (b) measures the fault ring itself: blocks move when decode posts them; (f) prefetches too.
        ring = {"kv_fault_reserve": reserve_blocks * unit, "kv_prefetch": bool(prefetch)} if reserve_blocks else {}
        runner = CudaRunner(self.model, self.rt, max_context=plan.context, kv_gpu_budget=device_blocks * unit, **ring)
        try:
            # Filled by copying an all-HBM prefill's blocks: a prefill into the host tier reads the
            # host half zero-copy for every chunk past it, which at 128k did not fit a device call.
            runner.adopt_kv(self._filled_source(plan))
            prefetch_s = 0.0
            if prefetch and reserve_blocks:  # the prefetch's copies, alone on the link, before any step
                t0 = time.perf_counter()
                runner.service_faults(flush=True)
                prefetch_s = time.perf_counter() - t0
            warmup: list[float] = []
            warm: dict = {}  # the tiers the timed runs start from
            flush: dict = {}
            decode_ms = time_decode(runner, plan, warmup, on_warm=lambda: warm.update(runner.kv_tiers()),
                                    flush=flush if reserve_blocks else None)
            runner.service_faults(flush=True)  # the counts include what the last steps posted
            out = {"decode_ms": decode_ms, "warmup_ms": warmup[0] + prefetch_s * 1e3 / plan.steps,
                   "tiers": runner.kv_tiers(), "host_entries_timed": warm["host_entries"]}
            if prefetch and reserve_blocks:
                out["prefetch_s"] = prefetch_s
            if reserve_blocks:
                out.update(flush_s=flush["seconds"], flush_bytes=warm["bytes_moved"] - flush["bytes_before"])
            return out
        finally:
            runner.close()
