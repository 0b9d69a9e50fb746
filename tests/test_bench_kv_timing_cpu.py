"""The kv stage's device probe (``bench/kv_timing.py``) wired to fake runners on the CPU: what it
prefills, where its decode steps land, which ``Rows`` the pruned row sends, that the host tier
holds exactly the evicted half under the real tier plan, and that every runner is closed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from nexusrt.backends.cuda import batch as batch_mod
from nexusrt.backends.cuda import runner as runner_mod
from nexusrt.backends.cuda.batch_buffers import check_entry

REFUSED = "this runner keeps RoPE positions equal to cache slots"  # a runner without pruning
from nexusrt.backends.cuda.chunks import BUCKETS, buckets_for
from nexusrt.bench import kv_speed
from nexusrt.bench.kv_speed import DecodePlan
from nexusrt.bench.kv_timing import CudaKvProbe
from nexusrt.kvcache.blocks import blocks_for
from nexusrt.kvcache.tiers import plan_tiers


class FakeStream:
    def synchronize(self):
        pass


class FakeRunner:
    """CudaRunner's surface as the probe uses it; the tier split is the real ``plan_tiers``'."""

    made: list = []

    def __init__(self, model, rt, max_context=None, kv_gpu_budget=None, kv_fault_reserve=None, kv_prefetch=True):
        cfg = self.config = model.config
        self.max_context, self.budget, self.reserve = max_context, kv_gpu_budget, kv_fault_reserve
        self.prefetch = kv_fault_reserve is not None and kv_prefetch
        self.buckets = buckets_for(max_context, BUCKETS)
        self.chunk, self.capacity = self.buckets[-1], max_context + self.buckets[0] - 1
        self.kv_plan = plan_tiers(blocks_for(self.capacity), kv_gpu_budget, num_layers=cfg.num_hidden_layers,
                                  num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, available=1 << 40)
        self.stream, self.position, self.log, self.closed, self.flushed = FakeStream(), 0, [], False, False
        self.rt = rt if rt is not None else SimpleNamespace(backend="cpu")  # the paced warm-up's events
        FakeRunner.made.append(self)

    def reset(self):
        self.position = 0

    def prefill(self, ids):
        assert ids.dtype == np.int32 and 0 < len(ids) and self.position + len(ids) <= self.max_context
        assert ids.min() >= 0 and ids.max() < self.config.vocab_size
        self.log.append(("prefill", self.position, len(ids)))
        self.position += len(ids)

    def adopt_kv(self, source):
        assert source.kv_plan.host_blocks == 0 and source.capacity == self.capacity and self.position == 0
        assert source.position and not source.closed
        self.log.append(("adopt_kv", source.position))
        self.position = source.position

    def decode(self, token):
        assert self.position < self.max_context
        self.log.append(("decode", self.position))
        self.position += 1

    def service_faults(self, flush=False):
        self.log.append(("service_faults", flush))
        self.flushed = self.flushed or (flush and self.reserve is not None)

    def kv_tiers(self, flush=True):
        if flush:
            self.service_faults(flush=True)
        p = self.kv_plan
        out = {"blocks_device": p.device_blocks, "blocks_host": p.host_blocks, "host_bytes": p.host_bytes,
               "host_entries": p.host_blocks}
        if self.reserve:  # what a ring that moved every host block once flushed would report
            out.update(blocks_reserve=self.reserve // p.block_bytes, ring_slots=4096, faults_posted=p.host_blocks,
                       faults_serviced=p.host_blocks, faults_overflow=0, faults_left=0, blocks_prefetched=0,
                       bytes_moved=p.host_bytes if self.flushed else 0, move_ms=40.0 if self.flushed else 0.0,
                       host_entries=0 if self.flushed else p.host_blocks)
            if self.prefetch:  # moved as the fill ended, before any step posted them
                out.update(faults_posted=0, faults_serviced=0, blocks_prefetched=p.host_blocks,
                           bytes_moved=p.host_bytes, host_entries=0, move_ms=40.0)
        return out

    def close(self):
        self.closed = True


class FakeBatch:
    """CudaBatchRunner's entry checks (the real ``check_entry``); ``honours_position`` False plays a
    runner that refuses a RoPE position apart from the slot (as the per-sequence prompt path does)."""

    honours_position = False
    made: list = []

    def __init__(self, base, num_blocks, max_batch=32, max_chunk=2048):
        self.base, self.num_blocks, self.max_chunk = base, num_blocks, max_chunk
        self.width = blocks_for(base.max_context + 63)
        self.steps, self.closed = [], False
        FakeBatch.made.append(self)

    def run_tokens(self, batch):
        assert len(batch) == 1
        r = batch[0]
        assert len(r.token_ids) <= self.max_chunk
        if not self.honours_position and r.position is not None and r.position != r.start:
            raise ValueError(REFUSED)
        check_entry(r, self.base.max_context, self.width, self.num_blocks, self.base.config.vocab_size)
        self.steps.append(batch[0])
        return [7 if r.logits else None]

    def close(self):
        self.closed = True


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setattr(runner_mod, "CudaRunner", FakeRunner)
    monkeypatch.setattr(batch_mod, "CudaBatchRunner", FakeBatch)
    FakeRunner.made, FakeBatch.made = [], []
    yield
    FakeBatch.honours_position = False


def test_all_device_prefills_the_half_times_it_and_decodes_to_the_context(fakes):
    probe = CudaKvProbe(None, "synthetic:llama-3.1-8b", runs=3)
    plan = DecodePlan(8192, 3)
    out = probe.all_device(plan, 4096, None)
    (r,) = FakeRunner.made
    prefills = [e for e in r.log if e[0] == "prefill"]
    # a warm-up chunk, three timed prefills of the evicted half from an empty cache, then the rest
    assert prefills == [("prefill", 0, 4096)] * 4 + [("prefill", 4096, plan.prefill_to - 4096)]
    decodes = [e[1] for e in r.log if e[0] == "decode"]
    assert decodes == list(range(plan.prefill_to, 8192)) and r.position == 8192 and r.closed
    assert len(out["recompute_s"]) == 3 and len(out["decode_ms"]) == 3 and "pruned" not in out
    assert out["kv_blocks"] == blocks_for(r.capacity)


def test_all_device_without_the_restore_row_fills_the_prefix_once(fakes):
    probe = CudaKvProbe(None, "synthetic:llama-3.1-8b", runs=3)
    plan = DecodePlan(8192, 3)
    out = probe.all_device(plan, 4096, None, restore=False)
    (r,) = FakeRunner.made
    prefills = [e for e in r.log if e[0] == "prefill"]
    assert prefills == [("prefill", 0, 4096), ("prefill", 4096, plan.prefill_to - 4096)]  # warm-up chunk, the rest
    assert out["recompute_s"] == [] and len(out["decode_ms"]) == 3 and r.position == 8192 and r.closed


def test_the_host_tier_holds_exactly_the_evicted_half(fakes):
    probe = CudaKvProbe(None, "synthetic:llama-3.1-8b", runs=1)
    s = kv_speed.measure(_Measured(probe), probe.config, "synthetic:llama-3.1-8b", [8192, 32768], 1, 4096)
    for row in s["contexts"]:
        c = row["host_zero_copy"]
        assert c["host_tokens"] == row["context"] // 2 == row["restore"]["evicted_tokens"]
    hosts = [r for r in FakeRunner.made if r.budget is not None and r.reserve is None]
    assert len(hosts) == 2 and all(r.closed and r.position == r.max_context for r in hosts)
    rings = [r for r in FakeRunner.made if r.reserve is not None and not r.prefetch]  # (b): reserve = host half
    ahead = [r for r in FakeRunner.made if r.prefetch]  # (f): the same, prefetching
    assert [r.reserve for r in ahead] == [r.reserve for r in rings] and all(r.closed for r in ahead)
    assert [row["prefetched"]["blocks_prefetched"] for row in s["contexts"]] == [r.kv_plan.host_blocks for r in ahead]
    for r in ahead:  # the prefetch's moves finished before the first step: their copies alone on the link
        first = next(i for i, e in enumerate(r.log) if e[0] == "decode")
        assert r.log[first - 1] == ("service_faults", True) and r.log[first - 2][0] == "adopt_kv"
    assert all(row["prefetched"]["prefetch_ms"] >= 0 for row in s["contexts"])
    assert [r.reserve // r.kv_plan.block_bytes for r in rings] == [r.kv_plan.host_blocks for r in rings] == \
        [blocks_for(c // 2) for c in (8192, 32768)]
    assert all(r.closed and r.log[-1] == ("service_faults", True) for r in rings)
    for r, row in zip(rings, s["contexts"]):  # the warm-up run's steps, then its moves finished, then the timed runs
        steps = [i for i, e in enumerate(r.log) if e[0] == "decode"]
        assert r.log[steps[DecodePlan.steps - 1] + 1] == ("service_faults", True)
        assert row["fault_ring"]["host_entries_timed"] == 0
        # The warm-up's flush timed alone: every host byte moved there, the counts read before it unflushed.
        assert r.log[steps[DecodePlan.steps - 1] + 1: steps[DecodePlan.steps - 1] + 2] == [("service_faults", True)]
        assert row["fault_ring"]["flush_bytes"] == r.kv_plan.host_bytes and row["fault_ring"]["flush_ms"] > 0
    assert all(row["fault_ring"]["faults_serviced"] == row["fault_ring"]["blocks_host"] for row in s["contexts"])
    # Filled by copying an all-HBM runner's prefill (closed after), never by a prefill into the host tier.
    prefix = DecodePlan(8192, 1).prefill_to
    assert [e for e in hosts[0].log if e[0] in ("prefill", "adopt_kv")] == [("adopt_kv", prefix)]
    sources = [r for r in FakeRunner.made if r.budget is None and r.log[:1] == [("prefill", 0, prefix)]]
    # One prefill of the prefix serves (c), (b) and (f) of a context; the next context's (a) gives it back.
    assert len(sources) == 1 and sources[0].closed and sources[0].position == prefix
    assert [e for e in sources[0].log if e[0] == "prefill"] == [("prefill", 0, prefix)]
    last = [r for r in FakeRunner.made if r.budget is None and r.log[:1] == [("prefill", 0, DecodePlan(32768, 1).prefill_to)]]
    assert len(last) == 1 and not last[0].closed
    probe.close()
    assert last[0].closed and probe._source is None


class _Measured:
    """The real probe with its two device measurements replaced by constants."""

    pinned_copy = CudaKvProbe.pinned_copy

    def __init__(self, probe):
        self.probe = probe

    def hbm_bandwidth(self):
        return 4e12

    def pinned_rate(self):
        return 5e10

    def fits(self, context):
        return None

    def __getattr__(self, name):
        return getattr(self.probe, name)


@pytest.mark.parametrize("honours", [False, True])
def test_the_pruned_row_sends_one_sequence_at_positions_past_its_slots(fakes, honours):
    FakeBatch.honours_position = honours
    probe = CudaKvProbe(None, "synthetic:llama-3.2-1b", runs=2)
    plan = DecodePlan(8192, 2)
    out = probe.all_device(plan, 4096, 4096)["pruned"]
    (b,) = FakeBatch.made
    assert b.num_blocks == blocks_for(4097) and b.closed and b.base is FakeRunner.made[0]
    prompt = [(r.start, len(r.token_ids), len(r.table), r.logits) for r in b.steps if len(r.token_ids) > 1]
    assert prompt == [(0, 2048, 128, False), (2048, 2048, 256, False)]
    steps = [r for r in b.steps if len(r.token_ids) == 1]
    unpruned = steps[:3 * plan.steps]  # a warm-up run and two timed ones
    assert all(r.start == 4096 and r.position is None and r.logits and len(r.table) == 257 for r in unpruned)
    assert int(unpruned[1].token_ids[0]) == 7  # each step feeds the previous pick
    assert len(out["unpruned_ms"]) == 2
    if not honours:
        assert out["pruned_refused"] == REFUSED and "pruned_ms" not in out
        return
    pruned = steps[3 * plan.steps + 1:]  # after the probing step
    first = 8192 - plan.steps
    assert [r.position for r in pruned] == list(range(first, 8192)) * 3
    assert all(r.start == 4096 for r in pruned) and len(out["pruned_ms"]) == 2


def test_a_host_split_the_runner_refuses_raises_before_any_runner(fakes):
    from nexusrt.kvcache.tiers import KvBudgetError

    probe = CudaKvProbe(None, "synthetic:tiny", runs=1)
    with pytest.raises(KvBudgetError, match="below one layer"):
        probe.half_host(DecodePlan(256, 1), 1)
    assert FakeRunner.made == []


def test_the_fault_ring_warm_up_is_paced_like_generate_tokens(monkeypatch):
    """At most QUEUE_AHEAD steps in flight, and the ring serviced while the host waits for the
    oldest: a host that enqueued the whole run at once drained the ring once or twice in it."""
    from nexusrt.bench import kv_timing
    from nexusrt.driver import streams

    queries = {"n": 0}

    class SlowEvent:  # done on its third query; every one destroyed
        live = 0

        def __init__(self, backend, timing=True):
            self.asked = 0
            SlowEvent.live += 1

        def record(self, stream):
            return self

        def query(self):
            queries["n"] += 1
            self.asked += 1
            return self.asked >= 3

        def destroy(self):
            SlowEvent.live -= 1

    monkeypatch.setattr(streams, "Event", SlowEvent)
    log = []
    runner = SimpleNamespace(rt=SimpleNamespace(backend="cuda"), stream=None,
                             decode=lambda token: log.append("decode"), service_faults=lambda: log.append("service"))
    kv_timing._paced_steps(runner, 20)
    waits = 20 - runner_mod.QUEUE_AHEAD
    assert log.count("decode") == 20 and log.count("service") == 2 * waits and queries["n"] == 3 * waits
    assert log[:runner_mod.QUEUE_AHEAD + 1] == ["decode"] * (runner_mod.QUEUE_AHEAD + 1)  # then a wait
    assert SlowEvent.live == 0
