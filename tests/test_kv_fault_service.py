"""The fault ring's drain between decode steps, on the CPU: the knobs' refusals, the drain's plan
(sealed blocks only, the reserve's limit, back-pressure counts), the device work of
backends/cuda/faults.py run against CPU memory (a fake driver that executes each stream
operation at once), and the _host_fault kernels' build and launcher."""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

from nexusrt.kernels.compiler import compile_file
from nexusrt.kernels.ops import attention_decode as dec
from nexusrt.kvcache import fault_plan, fault_ring as fr
from nexusrt.kvcache.blocks import pool_shape
from nexusrt.kvcache.fault_plan import FaultDrain, MAX_RING_SLOTS, plan_faults, split_sealed
from nexusrt.kvcache.tiers import KvBudgetError, TierPlan, block_bytes, place_oldest_on_host

from fakes import FakeRuntime, tensor

UNIT = 1000  # bytes of one logical block in the plans below


def _post_all(model: fr.RingModel, ids) -> list[str]:
    out = []
    for h in ids:
        gen = model.producer(h)
        try:
            while True:
                next(gen)
        except StopIteration as stop:
            out.append(stop.value)
    return out


# ---------------------------------------------------------------------------- the knobs
def test_plan_faults_refuses_bad_knobs_before_any_work():
    plan = TierPlan(device_blocks=6, host_blocks=4, block_bytes=UNIT)
    assert plan_faults(plan, None) is None
    cfg = plan_faults(plan, 2 * UNIT + UNIT - 1, 8)
    assert (cfg.reserve_blocks, cfg.ring_slots) == (2, 8)
    for reserve, slots, words in ((UNIT, 3, "power of two"), (UNIT, 0, "power of two"),
                                  (UNIT, MAX_RING_SLOTS * 2, "up to"), (UNIT, 4.0, "an int"),
                                  (UNIT - 1, 8, "below one KV block"), (4 * UNIT + 1, 8, "more than the host tier"),
                                  ("1G", 8, "byte count"), (True, 8, "byte count")):
        with pytest.raises(KvBudgetError, match=words):
            plan_faults(plan, reserve, slots)
    with pytest.raises(KvBudgetError, match="needs a host tier"):
        plan_faults(TierPlan(10, 0, UNIT), UNIT)


def test_llm_and_cli_refuse_a_reserve_without_a_host_tier(cpu_rt):
    import subprocess
    import sys

    import nexusrt as nrt

    with pytest.raises(KvBudgetError, match="needs a host tier"):
        nrt.LLM("synthetic:tiny", backend="cpu", max_context=256, kv_fault_reserve=1 << 20)
    assert nrt.memory.stats()["in_use_bytes"] == 0
    r = subprocess.run([sys.executable, "-m", "nexusrt.cli.main", "generate", "--model", "synthetic:tiny",
                        "--backend", "cpu", "--prompt", "hi", "--kv-fault-reserve", "lots"],
                       capture_output=True, text=True, timeout=120, env={"NEXUSRT_BACKEND": "cpu", "PYTHONPATH": ".",
                                                                         "PATH": ""})
    assert r.returncode != 0 and "--kv-fault-reserve must be a size" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------- the plan
def test_only_sealed_blocks_move():
    where = fr.locate_hosts(place_oldest_on_host(6, 3), 3)  # host blocks 0, 1, 2 hold tokens 0..47
    assert split_sealed([0, 1, 2], where, 32) == ([0, 1], [2])  # block 2 still takes tokens 32..47
    assert split_sealed([2, 0], where, 48) == ([2, 0], [])
    assert split_sealed([1], where, 0) == ([], [1])


def _apply(words: np.ndarray, s, layout: fr.RingLayout) -> None:
    """The ring stores of service ``s``, as backends/cuda/faults.py makes them on the device."""
    for first, count in s.slots:
        words[first:first + count] = fr.EMPTY
    words[fr.TAIL] = np.uint32(s.tail).view(np.int32)
    words[layout.requested + np.array(s.cleared, dtype=np.int64)] = 0
    if s.park:
        words[layout.requested:] = 1


def test_drain_moves_into_the_reserve_and_counts_what_it_leaves():
    layout = fr.RingLayout(2, 4)
    model = fr.RingModel(layout)
    drain = FaultDrain.for_sequence(layout, place_oldest_on_host(7, 4), reserve_blocks=2, block_bytes=UNIT)
    assert _post_all(model, [0, 1, 2]) == ["posted", "posted", "overflow"]  # a ring of 2: back-pressure
    s = drain.service(model.words.copy(), written_tokens=24)  # block 1 (tokens 16..31) is still appended to
    assert [(m.host, m.device) for m in s.moves] == [(0, 3)] and s.table_writes == [(0, 3)]
    assert s.cleared == [0, 1] and not s.park and s.tail == 2 and s.slots == [(fr.ENTRIES, 2)]
    assert drain.table.tolist() == [3, -2, -3, -4, 0, 1, 2] and drain.where.tolist() == [-1, 1, 2, 3]
    _apply(model.words, s, layout)  # the drain's stores, as the device work makes them, then more posts
    assert _post_all(model, [1, 2]) == ["posted", "posted"]  # 1 unsealed, so cleared: posted again
    s = drain.service(model.words.copy(), written_tokens=64)
    assert [(m.host, m.device) for m in s.moves] == [(1, 4)] and drain.exhausted
    # 2 is left for lack of a block: the reserve is full for good, so every host block is parked.
    assert s.park and s.cleared == []
    _apply(model.words, s, layout)
    assert _post_all(model, [2, 3]) == ["in_flight", "in_flight"]  # never posted again
    c = drain.counts
    assert (c.posted, c.overflow, c.serviced, c.left, c.bytes_moved) == (4, 1, 2, 2, 2 * UNIT)
    assert fault_plan.spans([9, 2, 3, 4, 7, 8, 2]) == [(2, 3), (7, 3)] and fault_plan.spans([]) == []
    assert drain.runs([fr.Move(0, 3), fr.Move(1, 4), fr.Move(5, 5), fr.Move(2, 6), fr.Move(3, 7)]) == \
        [(0, 3, 2), (5, 5, 1), (2, 6, 2)]
    drain.release([0, 1])
    assert drain.pool.audit() == {"device_blocks": 5, "host_blocks": 4, "device_used": 5, "host_used": 2}
    with pytest.raises(ValueError, match="in order"):
        FaultDrain.for_sequence(layout, np.array([-2, -1, 0], np.int32), 1, UNIT)


def _ring_ids(words: np.ndarray, layout: fr.RingLayout) -> list[int]:
    """The ids published between ``tail`` and ``head`` (a claimed slot not yet written is EMPTY)."""
    tail, head = int(words[fr.TAIL]) & 0xFFFFFFFF, int(words[fr.HEAD]) & 0xFFFFFFFF
    got = words[fr.ENTRIES + (tail + np.arange((head - tail) & 0xFFFFFFFF)) % layout.capacity]
    return got[got != fr.EMPTY].tolist()


@pytest.mark.parametrize("seed", range(30))
def test_a_small_reserve_keeps_the_producer_rule_under_random_interleavings(seed):
    """Producers (each step posts every host block the table names when it starts) interleaved at
    random with snapshots and services of a reserve smaller than the host tier, the service's
    stores landing while producers still run: no post lost, no id queued twice, each drained id
    moved, cleared (posted again once sealed) or parked, and once parked nothing posts again but
    a block a producer racing the park cleared on overflow."""
    rng = np.random.default_rng(seed)
    hosts, cap = int(rng.integers(3, 12)), int(rng.choice([1, 2, 4, 8]))
    layout = fr.RingLayout(cap, hosts)
    model = fr.RingModel(layout)
    drain = FaultDrain.for_sequence(layout, place_oldest_on_host(hosts + 2, hosts), int(rng.integers(1, hosts)), UNIT)
    outcomes, drained, live, snap = [], [], [], None
    written, parked_at, overflow_after_park = 0, None, set()

    def service():
        before = snap.copy()
        s = drain.service(snap, written)
        drained.extend(x for first, n in s.slots for x in before[first:first + n].tolist())
        _apply(model.words, s, layout)
        return s.park

    for step in range(30):
        written += int(rng.integers(0, 24))
        started = [int(h) for h in np.flatnonzero(drain.where >= 0)]
        live += [(h, model.producer(h), step) for h in started]
        while live:
            if rng.random() < 0.15:  # the drain: a snapshot, or the service of the last one
                if snap is None:
                    snap = model.words.copy()
                else:
                    if service() and parked_at is None:
                        parked_at = step
                    snap = None
            else:
                i = int(rng.integers(len(live)))
                h, gen, began = live[i]
                try:
                    next(gen)
                except StopIteration as stop:
                    outcomes.append((h, stop.value, began))
                    live.pop(i)
                    if parked_at is not None and stop.value == "overflow":
                        overflow_after_park.add(h)
            ring = _ring_ids(model.words, layout)
            assert len(set(ring)) == len(ring)  # never queued twice
        if parked_at is not None and parked_at < step:  # only a block an overflow cleared posts again
            assert {h for h, how, began in outcomes if began == step and how == "posted"} <= overflow_after_park
    snap = model.words.copy()
    service()
    assert sorted(drained) == sorted(h for h, how, _ in outcomes if how == "posted")  # every post drained once
    assert np.array_equal(drain.where, fr.locate_hosts(drain.table, hosts))
    moved = drain.counts.serviced
    assert moved == hosts - drain.host_entries and moved <= drain.pool.device.num_blocks - 2
    assert parked_at is not None  # the reserve, below the host tier, filled and parked the rest


# ---------------------------------------------------------------------------- the device work
WATCH, COMPUTE = "watch", "compute"  # the fake handles of the service's watch and the runner's compute stream


class _CpuDriver:
    """The driver calls faults.py makes, executed on CPU memory, every stream in order and at once,
    except two (:meth:`install`): the compute stream's operations wait until the test lets the
    stream finish its queue (:meth:`device_synchronize`, or its ``synchronize``), as queued decode
    steps would; the service's watch stream parks at a ``cuStreamWaitValue32`` whose word is not
    set, as the GPU's front end does, and runs on once a later call or an event query finds it
    set. Waiting for a watch that nothing queued can ring raises: on a GPU it would never return."""

    def __init__(self):
        self.calls = []
        self.parked = []  # the watch's operations behind an unmet wait, in order
        self.queued = []  # the compute stream's operations not run yet
        self.waited = []  # events the service made a stream wait for, in order
        self.compute = None

    def install(self, monkeypatch, rt) -> "_CpuDriver":
        from nexusrt.backends.cuda import faults
        from nexusrt.driver import doorbell
        from nexusrt.driver.streams import Stream

        driver = self
        monkeypatch.setattr(faults, "call", self)
        monkeypatch.setattr(doorbell, "call", self)  # the bell's stream writes and waits

        class Fake(Stream):
            def synchronize(self):
                driver.device_synchronize()  # the watch waits for what compute rings it with
                if driver.parked:
                    raise AssertionError("waited for a watch nothing can ring: on a GPU this never returns")

            def destroy(self):
                self.handle = None

        self.compute = Fake("compute", 0, COMPUTE)
        monkeypatch.setattr(rt.streams, "new", lambda role, level="mid": Fake(role, 0, WATCH))

        class WatchEvent(faults.Event):
            landed = True

            def record(self, stream=None):
                self.landed = not (stream is not None and stream.handle == WATCH and driver.parked)
                if not self.landed:
                    driver.parked.append(("record", self))
                return super().record(stream)

            def query(self):
                driver.pump()
                return self.landed and super().query()

            def wait_by(self, stream):
                driver.waited.append(self)
                super().wait_by(stream)

        monkeypatch.setattr(faults, "Event", WatchEvent)
        return self

    @staticmethod
    def _met(args) -> bool:
        _, ptr, value, _ = args  # CU_STREAM_WAIT_VALUE_AND: the word & value != 0
        return bool(ctypes.c_uint32.from_address(ptr).value & value)

    def _run(self, name, args):
        if name in ("cuMemcpyDtoHAsync", "cuMemcpyHtoDAsync"):
            dst, src, n, _ = args
            ctypes.memmove(dst, src, n)
        elif name == "cuMemsetD32Async":
            ptr, value, count, _ = args
            (ctypes.c_uint32 * count).from_address(ptr)[:] = [value] * count
        elif name == "cuStreamWriteValue32":
            _, ptr, value, _ = args
            ctypes.c_uint32.from_address(ptr).value = value
        elif name == "record":
            args.landed = True
        elif name != "cuStreamWaitValue32":
            raise AssertionError(f"unexpected driver call {name}")

    def pump(self) -> None:
        """Run the parked watch on as far as its waits are met."""
        while self.parked:
            name, args = self.parked[0]
            if name == "cuStreamWaitValue32" and not self._met(args):
                return
            self.parked.pop(0)
            self._run(name, args)

    def device_synchronize(self) -> None:
        """The compute stream finishes what is queued on it, and the watch runs on as far as it can
        (a whole-device wait, cuCtxSynchronize, returns only if the watch is not left parked)."""
        while self.queued:
            self._run(*self.queued.pop(0))
        self.pump()

    def __call__(self, name, *args):
        self.calls.append(name)
        stream = args[0] if name in ("cuStreamWaitValue32", "cuStreamWriteValue32") else args[-1]
        if stream == COMPUTE:
            self.queued.append((name, args))
        elif stream == WATCH and (self.parked or (name == "cuStreamWaitValue32" and not self._met(args))):
            self.parked.append((name, args))
        else:
            self._run(name, args)
        self.pump()


def test_service_copies_sealed_blocks_rewrites_the_table_and_frees_the_ring(cpu_rt, monkeypatch):
    import nexusrt as nrt
    from nexusrt.backends.cuda import faults

    driver = _CpuDriver().install(monkeypatch, cpu_rt)
    cfg = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=2, head_dim=64)
    layout = fr.RingLayout(4, 4)
    rng = np.random.default_rng(0)
    host = [nrt.memory.pinned(pool_shape(4, 2, 64), "bf16") for _ in range(4)]
    for t in host:
        t.array[...] = rng.standard_normal(t.shape).astype(t.array.dtype)
    dev = [nrt.memory.zeros(pool_shape(3 + 2, 2, 64), "bf16") for _ in range(4)]
    b = SimpleNamespace(k_host_pools=host[:2], v_host_pools=host[2:], k_pools=dev[:2], v_pools=dev[2:],
                        block_table=nrt.memory.from_numpy(place_oldest_on_host(7, 4)),
                        fault_ring=fr.DeviceRing(nrt.memory.from_numpy(layout.initial()), layout))
    svc = faults.FaultService(cpu_rt, cfg, b, 2, driver.compute)
    model = fr.RingModel(layout)
    model.words = b.fault_ring.words.array  # the kernels' posts land in the device words
    try:
        assert _post_all(model, [2, 0, 1]) == ["posted"] * 3
        svc.flush(written_tokens=40)  # blocks 0 and 1 are sealed, block 2 (tokens 32..47) is not
        assert b.block_table.to_numpy().tolist() == [3, 4, -3, -4, 0, 1, 2]
        for d, h in zip(dev, host):
            assert np.array_equal(d.to_numpy()[3:5].view(np.uint16), h.to_numpy()[0:2].view(np.uint16))
            assert not d.to_numpy()[:3].view(np.uint16).any()
        w = b.fault_ring.words.to_numpy()
        assert w[fr.HEAD] == w[fr.TAIL] == 3 and (w[fr.ENTRIES:fr.ENTRIES + 4] == fr.EMPTY).all()
        assert (w[layout.requested:] == 1).all()  # the reserve is full: every host block parked
        counts = svc.counts()
        assert counts["faults_posted"] == 3 and counts["faults_serviced"] == 2 and counts["faults_left"] == 1
        assert counts["bytes_moved"] == 2 * block_bytes(2, 2, 64) and counts["blocks_reserve_free"] == 0
        assert counts["move_ms"] > 0  # the moves' time between their two events (host clocks on the CPU)
        assert counts["host_entries"] == 2  # host blocks 2 and 3 are still read zero-copy
        assert svc.drain.pool.audit()["host_used"] == 2  # the moved host blocks went back
        # One run of two blocks (K and V of two layers), then one run of two table entries.
        assert driver.calls.count("cuMemcpyHtoDAsync") == 5
        assert svc.idle and driver.calls.count("cuMemcpyDtoHAsync") == 1  # no snapshot after the last move
        driver.calls.clear()
        svc.service(written_tokens=48)
        assert driver.calls == []
    finally:
        svc.free()
        for t in host + dev + [b.block_table, b.fault_ring.words]:
            t.free()
    assert nrt.memory.stats()["in_use_bytes"] == 0


def test_interleaved_posts_move_in_a_few_calls_and_land_right(cpu_rt, monkeypatch):
    """The splits of a step post concurrently, so the ring holds consecutive host blocks
    interleaved. The drain must still move them as one run (a copy per layer and K/V, not per
    block) and write the table, the consumed slots and ``requested`` a run of words at a time;
    the blocks and the table must land exactly where one call per block would put them."""
    import nexusrt as nrt
    from nexusrt.backends.cuda import faults

    driver = _CpuDriver().install(monkeypatch, cpu_rt)
    layers, nhost, splits = 2, 64, 8
    cfg = SimpleNamespace(num_hidden_layers=layers, num_key_value_heads=1, head_dim=64)
    layout = fr.RingLayout(64, nhost)
    rng = np.random.default_rng(1)
    host = [nrt.memory.pinned(pool_shape(nhost, 1, 64), "bf16") for _ in range(2 * layers)]
    for t in host:
        t.array[...] = rng.standard_normal(t.shape).astype(t.array.dtype)
    dev = [nrt.memory.zeros(pool_shape(2 + nhost, 1, 64), "bf16") for _ in range(2 * layers)]
    b = SimpleNamespace(k_host_pools=host[:layers], v_host_pools=host[layers:], k_pools=dev[:layers],
                        v_pools=dev[layers:], block_table=nrt.memory.from_numpy(place_oldest_on_host(nhost + 2, nhost)),
                        fault_ring=fr.DeviceRing(nrt.memory.from_numpy(layout.initial()), layout))
    svc = faults.FaultService(cpu_rt, cfg, b, nhost, driver.compute)
    model = fr.RingModel(layout)
    model.words = b.fault_ring.words.array
    try:
        per = nhost // splits  # split s covers blocks s*per ..; their first pages land first, and so on
        order = [s * per + i for i in range(per) for s in range(splits)]
        assert _post_all(model, order) == ["posted"] * nhost
        svc.service(written_tokens=(nhost + 2) * 16)  # the snapshot
        driver.calls.clear()
        svc.flush(written_tokens=(nhost + 2) * 16)
        assert driver.calls.count("cuMemcpyHtoDAsync") == 2 * layers + 1  # the blocks' run, the table's run
        assert driver.calls.count("cuMemsetD32Async") <= 2 * 3 + 1  # slots, tail, requested (+ a wrap)
        table = b.block_table.to_numpy()
        assert table.tolist() == list(range(2, 2 + nhost)) + [0, 1]  # host block h in device block 2 + h
        for d, h in zip(dev, host):
            assert np.array_equal(d.to_numpy()[2:].view(np.uint16), h.to_numpy().view(np.uint16))
        w = b.fault_ring.words.to_numpy()
        assert w[fr.TAIL] == nhost and (w[fr.ENTRIES:fr.ENTRIES + 64] == fr.EMPTY).all()
        assert (w[layout.requested:] == 1).all() and svc.counts()["host_entries"] == 0
        with pytest.raises(RuntimeError, match="never be written again"):
            svc._stage([(0, 5)])
    finally:
        svc.free()
        for t in host + dev + [b.block_table, b.fault_ring.words]:
            t.free()
    assert nrt.memory.stats()["in_use_bytes"] == 0


def _counted_events(monkeypatch, fail_at: int | None = None) -> tuple[list, set]:
    """faults.Event counted: every one made, and the ids of those not destroyed yet (the leak
    audit of events); the ``fail_at``-th one made (1-based) fails, as a driver error would."""
    from nexusrt.backends.cuda import faults

    made, live = [], set()

    class Counted(faults.Event):
        def __init__(self, *args, **kwargs):
            if len(made) + 1 == fail_at:
                raise RuntimeError("cuEventCreate failed (fake)")
            super().__init__(*args, **kwargs)
            made.append(self)
            live.add(id(self))

        def destroy(self):
            super().destroy()
            live.discard(id(self))

    monkeypatch.setattr(faults, "Event", Counted)
    return made, live


def _rig(nblocks: int, nhost: int, reserve: int, capacity: int, layers: int = 1):
    """The buffers a FaultService drains, in CPU memory: a one-sequence table of ``nblocks`` with
    the oldest ``nhost`` on the host (random K/V), device pools with ``reserve`` spare blocks."""
    import nexusrt as nrt

    cfg = SimpleNamespace(num_hidden_layers=layers, num_key_value_heads=1, head_dim=64)
    layout = fr.RingLayout(capacity, nhost)
    rng = np.random.default_rng(nblocks + nhost)
    host = [nrt.memory.pinned(pool_shape(nhost, 1, 64), "bf16") for _ in range(2 * layers)]
    for t in host:
        t.array[...] = rng.standard_normal(t.shape).astype(t.array.dtype)
    dev = [nrt.memory.zeros(pool_shape(nblocks - nhost + reserve, 1, 64), "bf16") for _ in range(2 * layers)]
    b = SimpleNamespace(k_host_pools=host[:layers], v_host_pools=host[layers:], k_pools=dev[:layers],
                        v_pools=dev[layers:], block_table=nrt.memory.from_numpy(place_oldest_on_host(nblocks, nhost)),
                        fault_ring=fr.DeviceRing(nrt.memory.from_numpy(layout.initial()), layout))
    return cfg, b, host + dev + [b.block_table, b.fault_ring.words]


def _step_posts(b) -> list[int]:
    """One decode step's posts: the producer rule run for every host block the device table names,
    one after another (a step reads each once); returns the ids posted."""
    words, layout = b.fault_ring.words.array, b.fault_ring.layout
    table = b.block_table.array
    hosts = ~table[table < 0].astype(np.int64)
    requested = words[layout.requested:]
    want = hosts[requested[hosts] == 0]  # atomicCAS(requested[h], 0, 1) succeeds
    head, tail = int(words[fr.HEAD]) & 0xFFFFFFFF, int(words[fr.TAIL]) & 0xFFFFFFFF
    take = want[:layout.capacity - ((head - tail) & 0xFFFFFFFF)]  # the rest find the ring full
    words[fr.ENTRIES + (head + np.arange(take.size)) % layout.capacity] = take
    words[fr.HEAD] = np.uint32((head + take.size) & 0xFFFFFFFF).view(np.int32)
    words[fr.OVERFLOW] += want.size - take.size
    requested[take] = 1  # an overflow stores requested[h] = 0 again
    if take.size:
        words[fr.BELL] = 1  # each post rings the doorbell once its id is in
    return take.tolist()


def test_prefetch_moves_the_oldest_sealed_blocks_before_any_post():
    layout = fr.RingLayout(4, 4)
    model = fr.RingModel(layout)
    drain = FaultDrain.for_sequence(layout, place_oldest_on_host(7, 4), reserve_blocks=3, block_bytes=UNIT)
    with pytest.raises(ValueError, match="limit must be >= 0"):
        drain.prefetch(64, -1)
    s = drain.prefetch(written_tokens=40, limit=1)  # blocks 0, 1 sealed; the limit takes the oldest
    assert [(m.host, m.device) for m in s.moves] == [(0, 3)] and s.table_writes == [(0, 3)]
    assert s.slots == [] and s.cleared == [] and not s.park and s.tail == 0
    s = drain.prefetch(written_tokens=40)  # block 2 (tokens 32..47) is still appended to
    assert [(m.host, m.device) for m in s.moves] == [(1, 4)] and not s.park
    assert drain.table.tolist() == [3, 4, -3, -4, 0, 1, 2]
    # A post of block 1 made before its table write landed is stale when drained: cleared, not "left".
    assert _post_all(model, [1, 2]) == ["posted", "posted"]
    s = drain.service(model.words.copy(), written_tokens=48)
    assert [(m.host, m.device) for m in s.moves] == [(2, 5)] and s.cleared == [] and s.park  # reserve full
    c = drain.counts
    assert (c.prefetched, c.serviced, c.left, c.bytes_moved) == (2, 1, 0, 3 * UNIT)
    assert c.report()["blocks_prefetched"] == 2
    assert drain.prefetch(written_tokens=64).moves == []  # exhausted: nothing more to move


def test_service_prefetch_copies_without_touching_the_ring(cpu_rt, monkeypatch):
    from nexusrt.backends.cuda import faults

    driver = _CpuDriver().install(monkeypatch, cpu_rt)
    cfg, b, owned = _rig(8, 4, 4, 8, layers=2)
    svc = faults.FaultService(cpu_rt, cfg, b, 4, driver.compute)
    try:
        before = b.fault_ring.words.to_numpy().copy()
        svc.prefetch(written_tokens=40)  # host blocks 0, 1 sealed (2 takes tokens 32..47)
        assert b.block_table.to_numpy().tolist() == [4, 5, -3, -4, 0, 1, 2, 3]
        for d, h in zip(b.k_pools + b.v_pools, b.k_host_pools + b.v_host_pools):
            assert np.array_equal(d.to_numpy()[4:6].view(np.uint16), h.to_numpy()[0:2].view(np.uint16))
        assert np.array_equal(b.fault_ring.words.to_numpy(), before)  # no slot, no tail, no requested word
        assert "cuMemsetD32Async" not in driver.calls
        assert _step_posts(b) == [2, 3]  # the next step posts only what is still on the host
        svc.flush(written_tokens=64)
        assert b.block_table.to_numpy().tolist() == [4, 5, 6, 7, 0, 1, 2, 3] and svc.idle
        c = svc.counts()
        assert (c["blocks_prefetched"], c["faults_serviced"], c["faults_left"]) == (2, 2, 0)
        assert svc.drain.pool.audit()["host_used"] == 0  # every moved host block went back
    finally:
        svc.free()
        for t in owned:
            t.free()


def test_a_reserve_below_the_host_tier_parks_the_rest_and_goes_quiet(cpu_rt, monkeypatch):
    """Reserve of 8 blocks, 1,024 on the host, every step posting what is not requested: the
    service that fills the reserve parks every host block (one memset), so no step posts them
    again and later services make no driver call, no event and no snapshot; each service is a
    handful of calls (not one per drained id); the drain's index matches the table after the
    moves; five events are made in all (three made once: the compute mark, the snapshot, the
    fill; two timing the moves), all freed."""
    import nexusrt as nrt
    from nexusrt.backends.cuda import faults

    driver = _CpuDriver().install(monkeypatch, cpu_rt)
    made, live = _counted_events(monkeypatch)
    layers, nblocks, nhost, reserve = 2, 2048, 1024, 8
    cfg, b, owned = _rig(nblocks, nhost, reserve, 1024, layers)
    svc = faults.FaultService(cpu_rt, cfg, b, reserve, driver.compute)
    try:
        posts, calls, events = [], [], []
        for _ in range(8):
            posts.append(len(_step_posts(b)))
            driver.calls.clear()
            n = len(made)
            svc.service(written_tokens=nblocks * 16)
            calls.append(list(driver.calls))
            events.append(len(made) - n)
        assert posts == [nhost] + [0] * 7  # posted once; the drained ids parked, never re-posted
        # The first snapshot (the watch's wait, clear and copy; the compute stream's ring).
        assert calls[0] == ["cuStreamWaitValue32", "cuStreamWriteValue32", "cuMemcpyDtoHAsync", "cuStreamWriteValue32"]
        # The drain: the slots' run, tail, one copy per layer and K/V (8 blocks in one run), the
        # table's run, the park; no snapshot after it. Then nothing at all.
        assert sorted(calls[1]) == sorted(["cuMemsetD32Async"] * 3 + ["cuMemcpyHtoDAsync"] * (2 * layers + 1))
        assert calls[2:] == [[]] * 6 and svc.idle
        assert len(made) == 5 and events[2:] == [0] * 6
        words = b.fault_ring.words.to_numpy()
        assert (words[b.fault_ring.layout.requested:] == 1).all() and words[fr.TAIL] == nhost
        c = svc.counts()
        assert (c["faults_posted"], c["faults_serviced"], c["faults_left"]) == (nhost, reserve, nhost - reserve)
        assert c["host_entries"] == nhost - reserve and c["blocks_reserve_free"] == 0
        table = b.block_table.to_numpy()
        assert np.array_equal(table, svc.drain.table) and np.array_equal(svc.drain.where, fr.locate_hosts(table, nhost))
        assert table[:reserve].tolist() == list(range(nblocks - nhost, nblocks - nhost + reserve))
        spare = nblocks - nhost  # the reserve's first device block
        for d, h in zip(owned[2 * layers:4 * layers], owned[:2 * layers]):
            assert np.array_equal(d.to_numpy()[spare:].view(np.uint16), h.to_numpy()[:reserve].view(np.uint16))
        assert svc.drain.pool.audit()["host_used"] == nhost - reserve  # the moved host blocks went back
    finally:
        svc.free()
        for t in owned:
            t.free()
    assert not live and nrt.memory.stats()["in_use_bytes"] == 0


def test_unsealed_blocks_are_posted_again_and_move_once_sealed(cpu_rt, monkeypatch):
    from nexusrt.backends.cuda import faults

    driver = _CpuDriver().install(monkeypatch, cpu_rt)
    cfg, b, owned = _rig(8, 4, 4, 8)
    svc = faults.FaultService(cpu_rt, cfg, b, 4, driver.compute)
    try:
        written = 40  # host blocks 0, 1 sealed; 2 takes tokens 32..47, 3 is not written yet
        posts = []
        for step in range(6):
            posts.append(_step_posts(b))
            svc.service(written)
            if step == 1:
                assert svc.counts()["faults_serviced"] == 2 and not svc.drain.exhausted
                written = 64
        # Drained unsealed at the second service (cleared, the reserve has room): posted again.
        assert posts == [[0, 1, 2, 3], [], [2, 3], [], [], []]  # 5, 6: the moves retire (two calls)
        assert b.block_table.to_numpy().tolist() == [4, 5, 6, 7, 0, 1, 2, 3] and svc.idle
        assert svc.counts()["faults_left"] == 2 and svc.counts()["host_entries"] == 0
    finally:
        svc.free()
        for t in owned:
            t.free()


def test_the_snapshot_waits_for_a_post_or_the_queued_steps_never_longer(cpu_rt, monkeypatch):
    """A service arms its snapshot behind the bell: with no post and the queued steps not done
    the watch waits (no copy, nothing drained however often the host calls); an id stored
    without its bell is not seen; the bell runs the watch on with no host wait, and the next call
    drains it. With no post at all the watch still ends once the steps queued before it are done
    (the compute stream rings too), so a whole-device wait never hangs on it."""
    from nexusrt.backends.cuda import faults

    driver = _CpuDriver().install(monkeypatch, cpu_rt)
    cfg, b, owned = _rig(8, 4, 4, 8)
    svc = faults.FaultService(cpu_rt, cfg, b, 4, driver.compute)
    model = fr.RingModel(b.fault_ring.layout)
    model.words = b.fault_ring.words.array
    try:
        for _ in range(4):
            svc.service(written_tokens=64)
        # Armed once, waiting since: the copy and its event are queued behind the wait, not run;
        # the compute stream's ring is queued behind its steps.
        assert driver.calls == ["cuStreamWaitValue32", "cuStreamWriteValue32", "cuMemcpyDtoHAsync",
                                "cuStreamWriteValue32"]
        assert [name for name, _ in driver.parked] == driver.calls[:3] + ["record"]
        assert [name for name, _ in driver.queued] == ["cuStreamWriteValue32"]
        post = model.producer(1)
        while model.words[fr.ENTRIES] != 1:  # up to the id's store, the bell not rung yet
            next(post)
        svc.service(written_tokens=64)
        assert driver.parked and svc.counts()["faults_posted"] == 0
        with pytest.raises(StopIteration):
            next(post)  # the bell
        svc.service(written_tokens=64)  # the watch ran on at the bell; this call drains its copy
        c = svc.counts()
        assert (c["faults_posted"], c["faults_serviced"]) == (1, 1) and model.words[fr.BELL] == 0
        assert b.block_table.to_numpy()[1] == 4  # host block 1 -> the reserve's first block
        assert driver.parked  # re-armed behind the bell
        driver.device_synchronize()  # the queued steps end, posting nothing: their ring ends the wait
        assert not driver.parked
        svc.service(written_tokens=64)  # an empty snapshot: nothing drained, armed again
        assert svc.counts()["faults_serviced"] == 1 and driver.parked
        svc.flush(written_tokens=64)
        assert svc.counts()["faults_serviced"] == 1
    finally:
        svc.free()
        for t in owned:
            t.free()
    assert not driver.parked


def test_moves_of_blocks_the_fill_wrote_wait_for_the_fill_only(cpu_rt, monkeypatch):
    """Blocks below the fill's length are written by the fill alone, so their copies wait for the
    fill's event and overlap the decode steps queued after it; a block a later step sealed waits
    for the compute stream's queue; after quiesce (a new sequence) nothing counts as filled."""
    from nexusrt.backends.cuda import faults

    driver = _CpuDriver().install(monkeypatch, cpu_rt)
    cfg, b, owned = _rig(8, 4, 4, 8)
    svc = faults.FaultService(cpu_rt, cfg, b, 4, driver.compute)
    try:
        svc.filled(40)  # tokens 0..39: host blocks 0 and 1 sealed by the fill
        assert _step_posts(b) == [0, 1, 2, 3]
        svc.service(written_tokens=40)
        svc.service(written_tokens=40)  # moves 0 and 1 (2 and 3 are not sealed)
        assert driver.waited == [svc._fill_done] and b.block_table.to_numpy()[:2].tolist() == [4, 5]
        assert _step_posts(b) == [2, 3]
        svc.service(written_tokens=64)  # the decode steps sealed 2 and 3: behind the compute stream
        assert driver.waited == [svc._fill_done, svc._mark]
        assert b.block_table.to_numpy()[:4].tolist() == [4, 5, 6, 7]
        svc.quiesce()
        assert svc._fill_tokens is None
    finally:
        svc.free()
        for t in owned:
            t.free()


def test_the_kernels_ring_layout_is_the_python_one():
    """fault_ring.cuh spells the word offsets again for the kernels: they must match."""
    import re
    from pathlib import Path

    import nexusrt.kernels

    text = (Path(nexusrt.kernels.__file__).parent / "cu" / "fault_ring.cuh").read_text()
    line = int(re.search(r"kLineWords = (\d+);", text).group(1))
    got = {}
    for name, expr in re.findall(r"\bk(Head|Tail|Overflow|Bell|Entries) = ([^,;]+)", text):
        factor = re.fullmatch(r"(?:(\d+) \* )?kLineWords|(0)", expr.strip())
        assert factor, f"k{name} = {expr}: not a multiple of kLineWords"
        got[name.upper()] = 0 if factor.group(2) else int(factor.group(1) or 1) * line
    assert line == fr.LINE_WORDS
    assert got == {"HEAD": fr.HEAD, "TAIL": fr.TAIL, "OVERFLOW": fr.OVERFLOW, "BELL": fr.BELL, "ENTRIES": fr.ENTRIES}


@pytest.mark.parametrize("fail", ["table copy", "second pinned buffer", "second event", "watch stream"])
def test_a_failing_service_or_constructor_leaks_no_event_and_no_memory(cpu_rt, monkeypatch, fail):
    import nexusrt as nrt
    from nexusrt.backends.cuda import faults
    from nexusrt.driver import doorbell

    driver = _CpuDriver()
    cfg, b, owned = _rig(8, 4, 4, 8)

    def failing(name, *args):
        if name == "cuMemcpyHtoDAsync" and args[0] == b.block_table.ptr:
            raise RuntimeError("cuMemcpyHtoDAsync failed (fake)")
        return driver(name, *args)

    pinned = nrt.memory.pinned

    def second_fails(*args, **kwargs):
        if second_fails.n == 1:
            raise MemoryError("no pinned memory (fake)")
        second_fails.n += 1
        return pinned(*args, **kwargs)

    second_fails.n = 0
    monkeypatch.setattr(faults, "call", failing)
    monkeypatch.setattr(doorbell, "call", failing)  # the bell's stream writes and waits
    made, live = _counted_events(monkeypatch, fail_at=2 if fail == "second event" else None)
    if fail == "second pinned buffer":
        monkeypatch.setattr(faults.memory, "pinned", second_fails)
    if fail == "watch stream":
        def no_stream(*args, **kwargs):
            raise RuntimeError("cuStreamCreateWithPriority failed (fake)")
        monkeypatch.setattr(cpu_rt.streams, "new", no_stream)
    try:
        if fail == "table copy":
            svc = faults.FaultService(cpu_rt, cfg, b, 4, cpu_rt.streams["compute"])
            _step_posts(b)
            with pytest.raises(RuntimeError, match="failed"):
                svc.flush(written_tokens=128)
            assert live  # the events in use are still held ...
            svc.free()  # ... until the runner frees the service
        else:
            with pytest.raises((MemoryError, RuntimeError), match="fake"):
                faults.FaultService(cpu_rt, cfg, b, 4, cpu_rt.streams["compute"])
    finally:
        monkeypatch.undo()
        for t in owned:
            t.free()
    assert not live and len(made) == {"table copy": 4, "second pinned buffer": 0, "second event": 1, "watch stream": 3}[fail]
    assert nrt.memory.stats()["in_use_bytes"] == 0 and not [a for a in nrt.memory.audit() if a.get("tag") == "kv_fault"]


# ---------------------------------------------------------------------------- the kernels
def test_every_fault_twin_is_built_and_picked_with_the_ring_last():
    cubin = compile_file("attention_decode", "sm_90a").cubin
    names = {dec.kernel_name(d, g, host=True, fault=True) for d in dec.HEAD_DIMS for g in range(1, 9)}
    assert len(names) == 12 and all(n.encode() in cubin for n in names)
    with pytest.raises(ValueError, match="host-tier twins"):
        dec.kernel_name(128, 4, fault=True)
    hq, hkv, d = 32, 8, 128
    hp = []
    for _ in range(2):
        t = tensor(pool_shape(4, hkv, d), "bf16", ptr=0x7000)
        t.device, t.pinned = False, True
        hp.append(t)
    ws = dec.DecodeWorkspace(tensor((hkv, 4, 4, d), "fp32"), tensor((hkv, 4, 4, 2), "fp32"),
                             tensor((hkv,), "int32"), 4)
    pool = tensor(pool_shape(10, hkv, d), "bf16")
    layout = fr.RingLayout(16, 4)
    ring = fr.DeviceRing(tensor((layout.words,), "int32", ptr=0x9000), layout)
    rt = FakeRuntime()
    args = (rt, tensor((hq, d), "fp32"), tensor((hq * d,), "fp32"), pool, pool, tensor((10,), "int32"),
            tensor((1,), "int32"), ws)
    heads = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
    spec = dec.attention_decode(*args, **heads, host_pools=tuple(hp), fault_ring=ring)
    assert rt.asked[-1][1] == "attention_decode_host_fault_d128_g4" and rt.asked[-1][2].endswith("ptr ptr ptr i32")
    assert spec.args[-4:] == (0x7000, 0x7000, 0x9000, 16)
    spec = dec.attention_decode(*args, **heads, host_pools=tuple(hp), fault_ring=ring, mma=True)
    assert rt.asked[-1][:2] == ("attention_decode_mma", "attention_decode_mma_host_fault_d128_g4")
    assert spec.args[-4:] == (0x7000, 0x7000, 0x9000, 16)
    with pytest.raises(ValueError, match="give host_pools"):
        dec.attention_decode(*args, **heads, fault_ring=ring)
    with pytest.raises(ValueError, match="tracks 5 host blocks"):
        dec.attention_decode(*args, **heads, host_pools=tuple(hp), fault_ring=fr.DeviceRing(
            tensor((fr.RingLayout(16, 5).words,), "int32"), fr.RingLayout(16, 5)))
    with pytest.raises(ValueError, match="fault_ring.words has shape"):
        dec.attention_decode(*args, **heads, host_pools=tuple(hp), fault_ring=fr.DeviceRing(
            tensor((7,), "int32"), layout))


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("hq, hkv, d", [(32, 8, 128), (6, 2, 64)])
@pytest.mark.parametrize("seq_len, capacity", [(100, 64), (1000, 64), (4097, 1)])
@pytest.mark.parametrize("mma", [False, True])
def test_fault_twin_reads_like_the_host_twin_and_posts_each_host_block_once(gpu_rt, hq, hkv, d, seq_len, capacity,
                                                                             mma):
    import nexusrt as nrt
    from test_kv_host_tier import _tier, decode_case, pinned_pools

    if mma and not dec.mma_ok(gpu_rt):
        pytest.skip("the mma kernels need sm_80 (and NEXUSRT_ATTN_MMA not 0)")
    n, k, v, table, q, pos, heads, ws = decode_case(hq, hkv, d, seq_len)
    tiered, dk, dv, hk, hv = _tier(table, k, v, max(1, n // 2))
    host = pinned_pools(hk, hv)
    layout = fr.RingLayout(capacity, hk.shape[0])
    ring = fr.DeviceRing(nrt.memory.from_numpy(layout.initial()), layout)
    outs = []
    for fault_ring in (None, ring):
        out = nrt.memory.from_numpy(np.full(hq * d, np.nan, np.float32))
        dec.attention_decode(gpu_rt, q, out, nrt.memory.from_numpy(dk), nrt.memory.from_numpy(dv),
                             nrt.memory.from_numpy(tiered), pos, ws, **heads, host_pools=host,
                             fault_ring=fault_ring, mma=mma).launch()
        outs.append(out.to_numpy())
    assert np.isfinite(outs[0]).all() and np.array_equal(outs[0], outs[1])
    w = ring.words.to_numpy()
    posted = min(capacity, hk.shape[0])
    assert w[fr.HEAD] == posted and w[fr.TAIL] == 0 and w[fr.BELL] == 1  # the posts rang the doorbell
    entries = w[fr.ENTRIES:fr.ENTRIES + capacity][:posted]
    assert len(set(entries.tolist())) == posted and set(entries.tolist()) <= set(range(hk.shape[0]))
    assert w[fr.OVERFLOW] >= hk.shape[0] - posted  # a full ring refuses, never waits
    assert (w[layout.requested + entries] == 1).all()


def _reserve(runner, blocks: int) -> int:
    return blocks * runner.kv_plan.block_bytes


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["llama", "qwen3"])
def test_fault_ring_runner_matches_all_device_and_moves_blocks(variant, gpu_rt, tmp_path_factory):
    from nexusrt.reference.sampling import SamplingParams
    from test_cuda_model import _checkpoint
    from test_kv_host_tier import _runner

    path = _checkpoint(variant, tmp_path_factory)
    ids = np.random.default_rng(5).integers(0, 384, 70).astype(np.int32)
    probe = _runner(path, 0.5)
    reserve = _reserve(probe, probe.kv_plan.host_blocks)  # room for every host block
    probe.close()
    results, tiers = [], None
    for kw in ({}, {"kv_fault_reserve": reserve}):
        r = _runner(path, 0.5 if kw else 0, **kw)
        try:
            logits = r.forward_all(ids)
            r.reset()
            r.prefill(ids[:50])
            steps = []
            for t in ids[50:]:  # decode() services the ring after each step, concurrently with the next
                steps.append(r.last_logits())
                r.decode(int(t))
            got = []
            r.generate_tokens(ids[:60], 40, SamplingParams(temperature=0.0), lambda x: bool(got.append(x)))
            results.append((logits, np.stack(steps), got))
            if kw:
                tiers = r.kv_tiers()
                table = r.buffers.block_table.to_numpy()
                assert (table < 0).sum() < r.kv_plan.host_blocks  # blocks migrated into the reserve
                assert r._faults.drain.pool.audit()["host_used"] == (table < 0).sum()
        finally:
            r.close()
    (l0, s0, g0), (l1, s1, g1) = results
    assert np.array_equal(l0, l1) and np.array_equal(s0, s1) and g0 == g1
    assert tiers["host_mode"] == "fault-ring" and tiers["faults_posted"] > 0 and tiers["faults_serviced"] > 0
    assert tiers["blocks_prefetched"] > 0  # the prefills' sealed host blocks, moved before any post
    assert tiers["bytes_moved"] == ((tiers["faults_serviced"] + tiers["blocks_prefetched"]) * tiers["host_bytes"]
                                    // tiers["blocks_host"])


@pytest.mark.gpu
def test_the_doorbell_starts_the_drain_while_the_steps_run(gpu_rt, tmp_path_factory):
    """No prefetch and no flush. A snapshot armed with no step queued ends behind the prefill (the
    compute stream rings too), so a whole-device wait (to_numpy's cuCtxSynchronize) returns; the
    first decode step's posts ring the bell and the copy lands with no host wait; the next
    services move every host block (their copies wait for the prefill only) and the device table
    ends with no host entry."""
    import time

    from test_cuda_model import _checkpoint
    from test_kv_host_tier import _runner

    path = _checkpoint("llama", tmp_path_factory)
    ids = np.random.default_rng(11).integers(0, 384, 108).astype(np.int32)
    probe = _runner(path, 0.5)
    reserve = _reserve(probe, probe.kv_plan.host_blocks)
    host_blocks = probe.kv_plan.host_blocks
    probe.close()
    r = _runner(path, 0.5, kv_fault_reserve=reserve, kv_prefetch=False)
    try:
        r.prefill(ids[:100])  # seals every host block (the oldest 96 tokens)
        assert host_blocks * 16 <= 100
        svc = r._faults
        svc.service(r.position)  # armed with no step queued: nothing will post before the next decode
        assert (r.buffers.block_table.to_numpy() < 0).sum() == host_blocks  # cuCtxSynchronize returns
        assert svc._copied.query()  # the compute stream's ring, behind the prefill, ended the wait
        svc.service(r.position)  # an empty snapshot drained; armed again
        assert r.kv_tiers(flush=False)["faults_posted"] == 0
        r.decode(int(ids[100]))  # arms the watch after the step's launch
        deadline = time.perf_counter() + 10
        while not svc._copied.query():  # the kernel's bell (or the step's end)
            assert time.perf_counter() < deadline, "the doorbell did not end the watch's wait within 10 s"
        for t in ids[101:]:  # each decode() services: drains what rang, moves behind the prefill only
            r.decode(int(t))
        for _ in range(3):  # what the last steps' posts rang, drained with no flush
            r.stream.synchronize()
            svc.control.synchronize()
            r.service_faults()
        tiers = r.kv_tiers(flush=False)
        assert tiers["faults_serviced"] == host_blocks and tiers["host_entries"] == 0
        assert tiers["faults_posted"] >= host_blocks and tiers["faults_overflow"] == 0
        r.stream.synchronize()
        svc.control.synchronize()
        assert (r.buffers.block_table.to_numpy() >= 0).all()  # on the device, too
    finally:
        r.close()


@pytest.mark.gpu
def test_a_one_slot_ring_overflows_without_a_hang_or_a_wrong_token(gpu_rt, tmp_path_factory):
    from nexusrt.reference.sampling import SamplingParams
    from test_cuda_model import _checkpoint
    from test_kv_host_tier import _runner

    path = _checkpoint("llama", tmp_path_factory)
    ids = np.random.default_rng(7).integers(0, 384, 90).astype(np.int32)
    outs = []
    # No prefetch: it would fill the one-block reserve at the prefill's end and park the ring.
    for frac, kw in ((0, {}), (0.5, {"kv_fault_reserve": _one_block(path), "kv_fault_ring_slots": 1,
                                     "kv_prefetch": False})):
        r = _runner(path, frac, **kw)
        try:
            got = []
            r.generate_tokens(ids, 30, SamplingParams(temperature=0.0), lambda x: bool(got.append(x)))
            outs.append((got, r.kv_tiers()))
        finally:
            r.close()
    assert outs[0][0] == outs[1][0]
    tiers = outs[1][1]
    assert tiers["faults_overflow"] > 0 and tiers["faults_serviced"] <= 1 and tiers["ring_slots"] == 1


def _one_block(path) -> int:
    from nexusrt.models.loader import load_model

    cfg = load_model(path).config
    return block_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)


@pytest.mark.gpu
def test_cancelled_request_with_the_fault_ring_leaves_no_memory(gpu_rt):
    import nexusrt as nrt

    before = nrt.memory.stats()
    llm = nrt.LLM("synthetic:tiny", backend="cuda", max_context=512)
    cfg, n = llm.config, llm.runner.kv_plan.device_blocks
    llm.close()
    unit = block_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    llm = nrt.LLM("synthetic:tiny", backend="cuda", max_context=512, kv_gpu_budget=(n // 2) * unit,
                  kv_fault_reserve=4 * unit)
    stream = llm.stream("hello " * 40, max_new_tokens=200, temperature=0)
    next(iter(stream))
    stream.close()  # cancelled mid-generation, copies possibly in flight
    result = llm.generate("hello " * 40, max_new_tokens=8, temperature=0)
    assert result.kv["faults_posted"] + result.kv["blocks_prefetched"] > 0  # prefetched, or posted and moved
    assert result.kv["blocks_host"] == llm.runner.kv_plan.host_blocks
    llm.close()
    after = nrt.memory.stats()
    assert after["in_use_bytes"] == before["in_use_bytes"] and after["pinned_bytes"] == before["pinned_bytes"]
    assert not [a for a in nrt.memory.audit() if a.get("tag") in ("kv_host", "kv_fault")]
