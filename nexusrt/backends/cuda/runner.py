"""``CudaRunner``: the ModelRunner of the CUDA backend (see nexusrt/backends/base.py).

Weights and every buffer live in the arena. A prefill chunk and the decode step are
chains of scheduler stages (step.py) captured once as CUDA graphs; a token costs one
``cuGraphLaunch``. The sampler runs on the device and writes each token into a pinned
ring the host polls, so the fast path (``generate_tokens``) keeps several steps queued
and never synchronises per token.

Prefill runs on tensor cores (cuBLASLt GEMMs, mma.sync attention) in chunks of a few fixed
sizes (chunks.py): one graph per size, captured when the runner is made, so any prompt
length replays graphs that already exist; the prompt's ids are staged in pinned memory
and copied in stream order, so no chunk waits for the host.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from ... import memory, scheduler
from ...reference.ops import rope_inv_freq
from ...errors import ModelError, NexusRTError
from ...driver.calls import call
from ...kernels.ops import attention_decode as attn_dec
from ...kernels.ops import qkv_rope
from ...kernels.ops.common import sm_count
from ...kernels.ops.cublaslt import LtContext
from ...kvcache.blocks import blocks_for
from ...kvcache.fault_plan import RING_SLOTS, FaultCounts, plan_faults
from ...kvcache.tiers import block_copies, plan_tiers
from . import persistent
from . import step as steps
from .buffers import RING, RunnerBuffers
from .chunks import BUCKETS, buckets_for, plan_chunks
from .faults import FaultService
from .weights import upload

DEFAULT_MAX_CONTEXT = 4096
QUEUE_AHEAD = 8  # decode steps in flight ahead of the host in generate_tokens


def _check_supported(cfg) -> None:
    """Shapes the CUDA kernels do not cover fail here, before any memory is taken."""
    dims = attn_dec.HEAD_DIMS  # rope takes more head dims; decode attention is the narrowest
    if cfg.head_dim not in dims:
        raise ModelError(f"the CUDA backend supports head_dim {' or '.join(map(str, dims))}; "
                         f"{cfg.source or 'this model'} has head_dim {cfg.head_dim} (use backend='cpu')")
    for name in ("hidden_size", "intermediate_size"):  # the bf16 prefill reads rows in 16-byte vectors
        if getattr(cfg, name) % 8:
            raise ModelError(f"the CUDA prefill needs {name} to be a multiple of 8; this model has "
                             f"{getattr(cfg, name)} (use backend='cpu')")
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    if group > attn_dec.MAX_GROUP:
        raise ModelError(f"the CUDA backend supports GQA groups up to {attn_dec.MAX_GROUP} query heads per KV head; "
                         f"this model has {group}")


def _check_host_mapped(pools) -> None:
    """The kernels address the host tier by its host pointer (unified addressing, as the token
    ring): refuse a device where the mapped address differs instead of reading a wrong page."""
    for t in pools:
        dev = int(call("cuMemHostGetDevicePointer", t.ptr, 0))
        if dev != t.ptr:
            raise NexusRTError(f"pinned KV host pool at {t.ptr:#x} maps to device address {dev:#x}; the host "
                               "tier needs unified addressing (same address on both sides)")


class CudaRunner:
    """One sequence on the GPU. ``CudaRunner(model, runtime, max_context=None)``."""

    def __init__(self, model, rt, max_context: int | None = None, buckets: tuple[int, ...] = BUCKETS,
                 progress=None, kv_gpu_budget: int | None = None, kv_fault_reserve: int | None = None,
                 kv_fault_ring_slots: int = RING_SLOTS, tp=None, kv_prefetch: bool = True):
        """``kv_gpu_budget``: bytes of KV kept on the device; the sequence's oldest blocks past it
        live in pinned host memory, read zero-copy (:mod:`nexusrt.kvcache.tiers`).
        ``kv_fault_reserve``: bytes of device KV beyond the budget, free at first, that the fault
        ring fills: decode attention posts the host blocks it reads to a ring of
        ``kv_fault_ring_slots`` slots and the runner moves sealed ones into the reserve between
        steps (:mod:`.faults`); None: host blocks stay zero-copy. A budget, reserve or ring that
        cannot work is refused here, before any memory is taken. ``kv_prefetch`` (with a reserve):
        once a prefill has filled host blocks, move them into the reserve right away, the oldest
        first, instead of waiting for the first decode step to post them (off: only posts move
        blocks, as the kv bench's fault-ring row measures).
        ``tp`` (a :class:`~.collectives.RankComm`): ``model`` is one tensor-parallel rank's shard
        (its config the rank's local shape); the graphs all-reduce after O and down and gather the
        vocab-parallel logits (:mod:`.collectives`), so :meth:`last_logits` is the whole vocabulary."""
        cfg = model.config
        self.config, self.rt = cfg, rt
        _check_supported(cfg)
        limit = cfg.max_position_embeddings
        if cfg.sliding_window:
            # Our attention kernels have no window: within the window the result is exact, so
            # the context stops there instead of silently computing something else past it.
            limit = min(limit, cfg.sliding_window)
        self.max_context = int(min(max_context or DEFAULT_MAX_CONTEXT, limit))
        if self.max_context < 1:
            raise ValueError(f"max_context must be >= 1, got {max_context}")
        self.buckets = buckets_for(self.max_context, buckets)
        self.chunk = self.buckets[-1]
        # A padded last chunk writes up to min(buckets) - 1 rows past the context.
        self.capacity = self.max_context + self.buckets[0] - 1
        # The tier split is checked before a byte of weights moves (KvBudgetError).
        self.kv_plan = plan_tiers(blocks_for(self.capacity), kv_gpu_budget, num_layers=cfg.num_hidden_layers,
                                  num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim)
        self.fault_plan = plan_faults(self.kv_plan, kv_fault_reserve, kv_fault_ring_slots)
        # NEXUSRT_DECODE, NEXUSRT_PERSISTENT_PROFILE and NEXUSRT_PERSISTENT_RING read (a bad value
        # refused) before any upload, and the persistent path's clash with a host tier.
        persistent.profiling()
        persistent.weight_ring()
        if persistent.decode_mode() == "persistent" and self.kv_plan.host_blocks:
            raise ModelError("NEXUSRT_DECODE=persistent reads KV from HBM only; a host KV tier (kv_gpu_budget) "
                             "needs the graph path (NEXUSRT_DECODE=graph)")
        if persistent.decode_mode() == "persistent" and tp is not None:
            raise ModelError("NEXUSRT_DECODE=persistent has no collectives yet; a tensor-parallel rank needs the "
                             "graph path (NEXUSRT_DECODE=graph)")
        self.tp = tp
        self.kv_prefetch = bool(kv_prefetch)
        # Decode attention by the tensor-core kernels where they run (NEXUSRT_ATTN_MMA): one graph for
        # every context (two at long context, below). Without them, by the cluster kernels while the context fits one cluster of
        # steps (faster there, slower past it): two decode graphs, picked per step by context.
        self.attn_mma = attn_dec.mma_ok(rt)
        cluster = attn_dec.cluster_ok(rt) and not self.attn_mma and not self.kv_plan.host_blocks and tp is None
        self.cluster_limit = attn_dec.cluster_context_limit(
            cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads) if cluster else 0
        # With them, at head_dim 64 and a max_context that reaches MMA_WIDE_FROM, a second graph whose
        # attention takes splits for three blocks an SM, replayed from that context on (measured on
        # one device with every KV block in HBM: not with a host tier or tensor parallelism).
        wide = attn_dec.wide_splits(cfg.num_key_value_heads, cfg.head_dim,
                                    cfg.num_attention_heads // cfg.num_key_value_heads, self.max_context,
                                    sm_count(rt)) if self.attn_mma and tp is None and not self.kv_plan.host_blocks else 0
        self.wide_from = attn_dec.MMA_WIDE_FROM[cfg.head_dim] if wide else 0
        self.stream = rt.streams["compute"]
        self.position = 0
        self._graphs: dict = {}
        self._params = None
        self._sample_specs = None
        self.timings: dict = {}
        rt.device.make_current()
        self.weights = self.buffers = self.lt = self._persistent = self._faults = None
        try:
            self.lt = LtContext(rt)  # fails first, with what to install, if cuBLASLt is missing
            t0 = time.perf_counter()
            self.weights = upload(rt, model.weights, self.stream, progress)
            inv = memory.from_numpy(rope_inv_freq(cfg).astype(np.float32), tag="weights")
            self.weights.inv_freq = inv
            self.weights.owned.append(inv)
            if self.weights.load_report is not None:
                self.timings["load"] = self.weights.load_report.as_dict()
            self.timings["upload_s"] = time.perf_counter() - t0
            self.buffers = RunnerBuffers(rt, cfg, self.max_context, self.chunk, positions=self.capacity,
                                         host_blocks=self.kv_plan.host_blocks, faults=self.fault_plan,
                                         lm_head_rows=None if tp is None else tp.vocab_part,
                                         attn_wide_splits=wide)
            _check_host_mapped(self.buffers.k_host_pools + self.buffers.v_host_pools)
            if self.fault_plan is not None:
                self._faults = FaultService(rt, cfg, self.buffers, self.fault_plan.reserve_blocks, self.stream)
            self._persistent = persistent.maybe_build(rt, cfg, self.weights, self.buffers)  # NEXUSRT_DECODE
            if tp is not None:  # NCCL connects on first use: outside the captures below
                tp.warm_up([self.buffers.hidden[0:1], self.buffers.hidden], self.buffers.logits, self.stream)
            t0 = time.perf_counter()
            self._decode_graph(sample=True)
            if self.cluster_limit:
                self._decode_graph(sample=True, context=1)
            if self.wide_from:
                self._decode_graph(sample=True, context=self.wide_from)
            self._graph(("logits",), lambda: steps.logits_stages(rt, cfg, self.weights, self.buffers, tp))
            for m in self.buckets:
                self._prefill_graph(m)
            self.timings["capture_s"] = time.perf_counter() - t0
        except BaseException:
            self.close()
            raise

    # -- graphs -------------------------------------------------------------------------------
    def _graph(self, key, build):
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = scheduler.capture(build(), stream="compute")
        return g

    def _decode_graph(self, sample: bool, context: int | None = None):
        """The graph of one decode step whose attention reads ``context`` tokens (None: any; the
        graph whose attention kernels serve every context: the mma ones, or the plain CUDA-core ones;
        a context within ``cluster_limit`` takes the cluster kernels' graph, one from ``wide_from``
        on the mma kernels' wide split count's)."""
        # NEXUSRT_DECODE=persistent: one launch per step, greedy or sampled alike (it reads the
        # same SampleParams struct and step word as the graph path's sampler).
        if self._persistent is not None:
            return self._graph(("persistent", sample), lambda: self._persistent.stages(sample))
        cluster = context is not None and context <= self.cluster_limit
        wide = bool(self.wide_from) and context is not None and context >= self.wide_from
        return self._graph(("decode", sample, cluster) + (("wide",) if wide else ()), lambda: steps.decode_stages(
            self.rt, self.config, self.weights, self.buffers, sample=sample, tp=self.tp,
            fuse_rope=qkv_rope.enabled(), cluster=cluster, mma=self.attn_mma, wide=wide))

    def _prefill_graph(self, m: int):
        return self._graph(("prefill", m), lambda: steps.prefill_stages(
            self.rt, self.config, self.weights, self.buffers, m, self.lt, tp=self.tp))

    # -- small device writes in stream order -----------------------------------------------------
    def _set_word(self, word, value: int) -> None:
        call("cuMemsetD32Async", word.ptr, int(value) & 0xFFFFFFFF, 1, self.stream.handle)

    def _stage_prompt(self, ids: np.ndarray) -> None:
        """Put the prompt into the pinned staging buffer, zeros after it (a padded chunk's rows)."""
        self.stream.synchronize()  # once per prompt: earlier copies may still read the buffer
        staged = self.buffers.prompt.array
        staged[:ids.size] = ids
        staged[ids.size:] = 0

    def _copy_ids(self, offset: int, rows: int) -> None:
        """Chunk ids from the staging buffer into ``ids``, in stream order (no host wait)."""
        src = self.buffers.prompt.ptr + 4 * offset
        call("cuMemcpyHtoDAsync", self.buffers.ids.ptr, src, 4 * rows, self.stream.handle)

    # -- ModelRunner ----------------------------------------------------------------------------
    def reset(self) -> None:
        self.stream.synchronize()
        if self._faults is not None:  # a pending copy must not read blocks the next prefill rewrites
            self._faults.quiesce()
        self.position = 0

    def service_faults(self, flush: bool = False) -> None:
        """Let the fault ring's drain run (no-op without one): start or finish a service without
        waiting for the compute stream, or with ``flush`` until what finished steps posted is moved."""
        if self._faults is not None:
            (self._faults.flush if flush else self._faults.service)(self.position)

    def _check_room(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"token count must be >= 0, got {n}")
        if self.position + n > self.max_context:
            raise ModelError(f"the sequence would hold {self.position + n} tokens; this runner's context "
                             f"is {self.max_context} (max_context=...)")

    def prefill(self, token_ids) -> None:
        ids = np.ascontiguousarray(np.asarray(token_ids, dtype=np.int32).reshape(-1))
        if ids.size == 0:
            raise ValueError("prefill needs at least one token")
        self._check_room(ids.size)
        self.rt.device.make_current()
        base = self.position
        self._stage_prompt(ids)
        done = 0
        for bucket, real in plan_chunks(ids.size, self.buckets, base, self.capacity):
            self._copy_ids(done, bucket)  # past the prompt: the staged zeros
            self._set_word(self.buffers.pos, base + done)
            self._prefill_graph(bucket).replay()
            done += real
        if real > 1:  # the prompt's last row to row 0, where the LM head graph reads it
            h = self.config.hidden_size
            hidden = self.buffers.hidden
            call("cuMemcpyDtoDAsync", hidden.ptr, hidden.ptr + 4 * h * (real - 1), 4 * h, self.stream.handle)
        self._graphs[("logits",)].replay()
        self.position = base + ids.size
        self._set_word(self.buffers.pos, self.position - 1)  # the last row's position
        self._after_fill()

    def _after_fill(self) -> None:
        """After a prefill (or ``adopt_kv``): the fault service learns what the fill wrote (moves
        of those blocks need not wait for later steps), and with ``kv_prefetch`` the host blocks
        it sealed go into the fault reserve now."""
        if self._faults is not None:
            self._faults.filled(self.position)
            if self.kv_prefetch:
                self._faults.prefetch(self.position)

    def adopt_kv(self, source: "CudaRunner") -> None:
        """Take ``source``'s sequence as if this runner had prefilled it: its K/V blocks copied
        into this runner's tiers (the oldest onto the host tier, where this runner's table puts
        them) and its position. ``source``: a runner of the same model shape and context with
        every block in HBM; this one must hold nothing yet. Linear in the context, where a
        prefill into a host tier is not: every chunk past the host half reads it zero-copy.
        The copies are on the shared compute stream, which this waits for: ``source`` may be
        closed right after."""
        if source.config != self.config or source.capacity != self.capacity:
            raise ValueError("adopt_kv needs a source runner of the same model shape and context")
        if source.kv_plan.host_blocks or self.tp is not None or source.tp is not None:
            raise ValueError("adopt_kv copies from a device-only, single-GPU runner")
        if self.position:
            raise ValueError(f"adopt_kv needs an empty runner; this one holds {self.position} tokens")
        self.rt.device.make_current()
        self.stream.synchronize()  # the tables are read below; source's prefill is on this stream
        src = source.buffers.block_table.to_numpy().reshape(-1)
        size = source.buffers.k_pools[0].nbytes // src.size  # one block of one layer's K (or V)
        b = self.buffers
        for first, on_host, dest, count in block_copies(src, b.block_table.to_numpy(), blocks_for(source.position)):
            dst_pools = (b.k_host_pools + b.v_host_pools) if on_host else (b.k_pools + b.v_pools)
            for dst, pool in zip(dst_pools, source.buffers.k_pools + source.buffers.v_pools):
                fn = "cuMemcpyDtoHAsync" if on_host else "cuMemcpyDtoDAsync"
                call(fn, dst.ptr + dest * size, pool.ptr + first * size, count * size, self.stream.handle)
        self.position = source.position
        self._set_word(self.buffers.pos, self.position - 1)  # as prefill leaves it: the last row's position
        self.stream.synchronize()
        self._after_fill()

    def decode(self, token_id: int) -> None:
        self._check_room(1)
        self.rt.device.make_current()
        self._set_word(self.buffers.token, token_id)
        self._set_word(self.buffers.pos, self.position)
        self._decode_graph(sample=False, context=self.position + 1).replay()
        self.position += 1
        self.service_faults()

    def last_logits(self) -> np.ndarray:
        self.stream.synchronize()
        return self.buffers.logits.to_numpy().reshape(-1).astype(np.float32)

    def forward_all(self, token_ids, chunk: int | None = None) -> np.ndarray:
        """Logits of every row (fp32 [n, vocab]) from a fresh sequence, in chunks of ``chunk``
        rows (default: the largest bucket), submitted stage by stage (not captured). A
        tensor-parallel rank other than 0 runs the same steps and collectives but returns None:
        its gathered logits equal rank 0's, and copying them to the host would be waste."""
        ids = np.ascontiguousarray(np.asarray(token_ids, dtype=np.int32).reshape(-1))
        chunk = min(int(chunk or self.chunk), self.chunk, 1024)  # bounds the fp32 logits buffer
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.reset()
        self._check_room(ids.size)
        self._stage_prompt(ids)
        vocab, size = self.config.vocab_size, 1 if self.tp is None else self.tp.size
        out = np.empty((ids.size, vocab), np.float32) if self.tp is None or self.tp.rank == 0 else None
        with contextlib.ExitStack() as owned:
            # Under tensor parallelism: the rank's [m, V/N] slice, then every rank's gathered behind it.
            logits = owned.enter_context(memory.empty((chunk, vocab // size), "fp32", tag="runner"))
            gathered = None if self.tp is None else owned.enter_context(
                memory.empty((size * chunk * (vocab // size),), "fp32", tag="runner"))
            for start in range(0, ids.size, chunk):
                m = min(chunk, ids.size - start)
                self._copy_ids(start, m)
                self._set_word(self.buffers.pos, self.position)
                part = None if gathered is None else gathered[0:size * m * (vocab // size)]
                stages = steps.prefill_stages(self.rt, self.config, self.weights, self.buffers, m, self.lt,
                                              all_logits=logits[0:m], tp=self.tp, gathered=part)
                scheduler.submit(stages)
                scheduler.wait_barrier()
                if out is not None and part is None:
                    out[start:start + m] = logits.to_numpy()[:m]
                elif out is not None:  # [N, m, V/N] in rank order -> [m, V]
                    out[start:start + m] = part.to_numpy().reshape(size, m, -1).transpose(1, 0, 2).reshape(m, vocab)
                self.position += m
        self._set_word(self.buffers.pos, self.position - 1)
        return out

    def _set_params(self, params) -> None:
        key = (float(params.temperature), int(params.top_k or 0), float(params.top_p), int(params.seed or 0))
        if key != self._params:
            self.stream.synchronize()
            self.buffers.sampler.set_params(*key)
            self._params = key

    def sample(self, params, step: int) -> int:
        """Sample on the device from the last logits; the cache position is unchanged."""
        self.rt.device.make_current()
        self._set_params(params)
        ring = self.buffers.ring.array
        slot = step % RING
        ring[slot] = -1
        self._set_word(self.buffers.step, step)
        self._set_word(self.buffers.pos, self.position - 1)
        self._launch_sampler()
        self.stream.synchronize()
        return int(ring[slot])

    def _launch_sampler(self) -> None:
        if self._sample_specs is None:
            self._sample_specs = [st.kernel for st in steps.sample_stages(self.rt, self.buffers)]
        for spec in self._sample_specs:
            spec.launch(self.stream)

    def _wait_token(self, ring, slot: int) -> int:
        """Spin on the ring slot; check the stream now and then so a device fault raises
        instead of spinning forever."""
        spins = 0
        while ring[slot] < 0:  # the device writes the token; the host only reads memory
            spins += 1
            if spins % 4096 == 0 and self.stream.query() and ring[slot] < 0:
                raise NexusRTError("the decode stream went idle without writing the next token")
        return int(ring[slot])

    def generate_tokens(self, prompt_ids, max_new_tokens: int, params, on_token) -> int:
        """Prefill, then the whole decode loop on the device: one graph launch per token, up to
        ``QUEUE_AHEAD`` launches in flight, tokens read from the pinned ring as they land."""
        self.rt.device.make_current()
        self.reset()
        ids = np.asarray(prompt_ids, dtype=np.int32).reshape(-1)
        self._check_room(ids.size)
        budget = min(int(max_new_tokens), self.max_context - ids.size + 1)
        if budget <= 0:
            return 0
        self._set_params(params)
        ring = self.buffers.ring.array
        ring[:] = -1
        self.prefill(ids)
        self._set_word(self.buffers.step, 0)
        self._launch_sampler()  # first token from the prefill logits; pos -> T
        launched, got = 1, 0
        launch_s = []
        try:
            while got < budget:
                while launched < budget and launched - got < QUEUE_AHEAD:
                    t0 = time.perf_counter()
                    # This step appends position ids.size + launched - 1: its attention reads one more.
                    self._decode_graph(sample=True, context=ids.size + launched).replay()
                    launch_s.append(time.perf_counter() - t0)
                    launched += 1
                slot = got % RING
                token = self._wait_token(ring, slot)
                ring[slot] = -1
                got += 1
                if self._faults is not None:  # the steps launched so far fill the cache to this length
                    self._faults.service(ids.size + launched - 1)
                if on_token(token):
                    break
        finally:
            self.stream.synchronize()
            # Every launched step appended one token to the cache (the last sampled one is not in it).
            self.position = ids.size + launched - 1
            self.timings["host_launch_s"] = float(np.median(launch_s)) if launch_s else 0.0
        return got

    def kv_tiers(self, flush: bool = True) -> dict:
        """Blocks on each tier (the ``kv`` report): one sequence holds every block, its oldest
        on the host as placed. Without a fault ring zero-copy reads move nothing (the fault
        figures stay 0); with one, the figures since the runner was made (:meth:`FaultService.counts`).
        ``host_entries``: table entries naming a host block, i.e. blocks a decode step reads zero-copy
        (with a ring: as of its last service, the moves it issued counted as done). With a ring it
        first finishes the moves the finished steps asked for, so the counts cover every step
        (only a report pays that wait, not every request); ``flush=False``: the counts as they
        stand, with no wait."""
        if flush:
            self.service_faults(flush=True)
        out = {"blocks_device": self.kv_plan.device_blocks, "blocks_host": self.kv_plan.host_blocks,
               "host_bytes": self.kv_plan.host_bytes, "host_mode": "zero-copy" if self.kv_plan.host_blocks else None,
               **FaultCounts().report(), "host_entries": self.kv_plan.host_blocks}
        if self._faults is not None:
            out.update(self._faults.counts(), host_mode="fault-ring",
                       blocks_reserve=self.fault_plan.reserve_blocks, ring_slots=self.fault_plan.ring_slots)
        return out

    def close(self) -> None:
        steps.close_graphs(self.stream, self._graphs)
        if self._faults is not None:  # its copies write the pools: done before they are freed
            self._faults.free()
            self._faults = None
        if self._persistent is not None:
            self._persistent.free()
            self._persistent = None
        if self.buffers is not None:
            self.buffers.free()
            self.buffers = None
        if self.weights is not None:
            self.weights.free()
            self.weights = None
        if self.lt is not None:
            self.lt.close()
            self.lt = None
