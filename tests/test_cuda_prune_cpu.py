"""KV pruning on the CUDA batch runner, checked on the CPU: the real ``CudaBatchRunner`` over CPU
arena buffers, with graph capture, driver calls and kernel launches recorded. What each row's
``meta`` holds once a sequence's RoPE position runs ahead of its cache slot (batched decodes,
ragged chunks), which graph a pruned lone decode takes, what ``compact`` stages, copies and
launches (and that staged bytes stay intact until the stream may read them), what is refused
before any device work, the engine's per-policy check, and a NumPy model of the kernel's tile
order against ``compact_tokens``. The numbers themselves: ``test_cuda_prune.py`` on a GPU.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

from nexusrt import scheduler
from nexusrt.backends.base import Rows
from nexusrt.backends.cpu.batch import CpuBatchRunner
from nexusrt.backends.cpu.decoder import DecoderSteps
from nexusrt.backends.cuda import batch as batch_mod
from nexusrt.backends.cuda.batch_buffers import check_entry
from nexusrt.backends.cuda.chunks import BUCKETS
from nexusrt.kvcache.blocks import BLOCK_SIZE, compact_tokens, pool_shape
from nexusrt.reference.sampling import SamplingParams
from nexusrt.serving import Engine, KvPolicy, Sequence
from tests.test_cuda_ragged_cpu import _RecordingLt, _Rt
from tests.test_cuda_step_cpu import _config, _device_weights, no_occupancy_query  # noqa: F401

NUM_BLOCKS = 40


class _Device:
    """Records graph replays, kernel launches (``rt.trace``) and driver calls (``calls``); at every
    synchronize, notes each host-to-device copy whose source bytes changed since it was enqueued
    (``overwritten``: the device would have read the later bytes)."""

    def __init__(self, rt):
        self.rt, self.calls, self.pending, self.overwritten, self.syncs = rt, [], [], [], 0
        self.handle = 7

    def call(self, name, *args):
        self.calls.append((name, *args))
        if name == "cuMemcpyHtoDAsync":
            dst, src, n, _ = args
            data = ctypes.string_at(src, n)
            self.pending.append((dst, src, n, data))
            self.rt.trace.append(("h2d", dst, np.frombuffer(data, np.int32).copy()))

    def synchronize(self):
        self.syncs += 1
        self.overwritten += [p[:3] for p in self.pending if ctypes.string_at(p[1], p[2]) != p[3]]
        self.pending = []


def _graph(log):
    """``scheduler.capture`` standing in: a graph whose replay logs ``("replay", chain name)``."""
    def capture(stages, stream="compute"):
        name = stages[0].name.split(".")[0]
        return SimpleNamespace(replay=lambda stream=None: log.append(("replay", name)), close=lambda: None)
    return capture


@pytest.fixture
def make(cpu_rt, no_occupancy_query, monkeypatch):
    """``make(**kw)``: a CudaBatchRunner over 40 blocks (max_batch 8, max_chunk 256) and its _Device."""
    made = []
    cfg = _config("llama_tiny")
    w = _device_weights(cfg)

    def build(**kw):
        rt = _Rt()
        rt.device = SimpleNamespace(handle=0, make_current=lambda: None)
        dev = _Device(rt)
        monkeypatch.setattr(scheduler, "capture", _graph(rt.trace))
        monkeypatch.setattr(batch_mod, "call", dev.call)
        base = SimpleNamespace(config=cfg, rt=rt, max_context=300, buckets=BUCKETS, weights=w,
                               lt=_RecordingLt(rt.trace), stream=dev)
        runner = batch_mod.CudaBatchRunner(base, NUM_BLOCKS, **({"max_batch": 8, "max_chunk": 256} | kw))
        made.append(runner)
        runner.bb.h_next.array[:] = 1  # the picks the fake device leaves (a valid id)
        rt.trace.clear()
        dev.calls.clear()
        return runner, dev

    yield build
    for r in made:
        r.close()
    w.free()


def _one(token, start, table, position=None, logits=True):
    return Rows(np.asarray([token], np.int32), start, list(table), logits=logits, position=position)


def _events(dev, *kinds):
    return [e for e in dev.rt.trace if e[0] in kinds or e[0].startswith(kinds)]


# -- positions apart from slots -----------------------------------------------------------------
def test_batched_decode_rows_carry_their_position_and_their_slot(make):
    r, dev = make()
    batch = [_one(5, 20, [1, 2], position=57), _one(6, 40, [5, 6, 7]), _one(7, 3, [8], position=4)]
    r.run_tokens(batch)
    assert [e[1] for e in _events(dev, "replay")] == ["batch4"]
    # meta = (RoPE position, cache slot, table row, unused); the padding row: slot 0 of the scratch row.
    assert r.bb.h_meta.array[:4, :3].tolist() == [[57, 20, 0], [40, 40, 1], [4, 3, 2], [0, 0, 3]]
    (meta,) = [e for e in _events(dev, "h2d") if e[1] == r.bb.meta.ptr]
    assert meta[2].reshape(-1, 4)[:3, :3].tolist() == [[57, 20, 0], [40, 40, 1], [4, 3, 2]]
    assert not dev.overwritten


def _words(dev) -> dict:
    """The value each ``cuMemsetD32Async`` of the step set, by address."""
    return {c[1]: c[2] for c in dev.calls if c[0] == "cuMemsetD32Async"}


def test_a_pruned_lone_decode_keeps_the_gemv_graph_with_its_position_apart(make):
    r, dev = make()
    r.run_tokens([_one(9, 33, [4, 11, 2])])  # unpruned: the one-sequence GEMV graph
    assert [e[1] for e in _events(dev, "replay")] == ["decode"]
    dev.rt.trace.clear()
    dev.calls.clear()
    r.run_tokens([_one(9, 33, [4, 11, 2], position=90)])
    assert [e[1] for e in _events(dev, "replay")] == ["decode"]  # still the GEMVs
    words = _words(dev)
    one = r.bb.one_meta.ptr
    assert words[one] == 90 and words[one + 4] == 33  # RoPE at the position, K/V written at the slot
    assert words[r.pre.pos.ptr] == 33  # attention's length: the slot count
    assert [e[1] for e in _events(dev, "sample_rows_partial", "sample_rows_finish")] != []


def test_a_pruned_prompt_chunk_ropes_at_its_positions_and_attends_over_its_slots(make):
    r, dev = make()
    chunk = Rows(np.arange(1, 38, dtype=np.int32), 10, [3, 4, 9], logits=True, position=130)
    r.run_tokens([chunk, _one(6, 40, [5, 6, 7], position=41)])
    buf = r.ragged.buf
    meta = buf.h_meta.array
    assert meta[:37, 0].tolist() == list(range(130, 167))  # RoPE
    assert meta[:37, 1].tolist() == list(range(10, 47))  # slots: rope_append writes there
    assert (meta[:37, 2] == 0).all() and buf.h_starts.array[0] == 10  # attention starts at the slot
    words = _words(dev)  # the lone decode beside the chunk: position and slot apart in one_meta
    assert words[r.bb.one_meta.ptr] == 41 and words[r.bb.one_meta.ptr + 4] == 40


def test_the_per_sequence_prompt_path_refuses_a_pruned_chunk_before_any_device_work(make):
    r, dev = make(ragged_prefill=False)
    assert r.prune_policies == frozenset()
    chunk = Rows(np.arange(1, 38, dtype=np.int32), 10, [3, 4, 9], logits=True, position=130)
    with pytest.raises(ValueError, match="per-sequence prompt path.*RoPE position 130, cache slot 10"):
        r.run_tokens([_one(6, 40, [5, 6, 7]), chunk])
    assert dev.calls == [] and dev.rt.trace == [] and dev.syncs == 0
    r.run_tokens([_one(6, 40, [5, 6, 7], position=50)])  # its decodes read the position apart
    assert _words(dev)[r.bb.one_meta.ptr] == 50
    assert make()[0].prune_policies == frozenset({"sink-window", "h2o"})


@pytest.mark.parametrize("kw, match", [
    (dict(position=2), "RoPE position 2 lies below cache slot 3"),
    (dict(position=100), r"RoPE positions 100\.\.100 exceed the context of 100"),
    (dict(scores=np.zeros(3)), "scores hold 3 slots; the rows fill 4"),
])
def test_an_entry_with_impossible_positions_or_scores_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        check_entry(Rows(np.asarray([5], np.int32), 3, [7], **kw), 100, 8, 50, 300)
    check_entry(Rows(np.asarray([5], np.int32), 3, [7], position=99), 100, 8, 50, 300)
    check_entry(Rows(np.asarray([5, 6], np.int32), 3, [7], scores=np.zeros(5)), 100, 8, 50, 300)


# -- compaction ---------------------------------------------------------------------------------
def test_compact_copies_table_and_keep_then_launches_once_for_every_layer(make):
    r, dev = make()
    cfg, comp = r.config, r.compactor
    want = [p.ptr for pair in zip(r.pre.k_pools, r.pre.v_pools) for p in pair]
    assert comp.pools.array.tolist() == want  # layer l's K at 2l, its V at 2l + 1
    table = [5, 9, 2, 30]
    keep = np.r_[0:4, 20:50]
    r.compact(table, keep)
    (t_copy, k_copy), launches = _events(dev, "h2d"), _events(dev, "kv_compact")
    assert t_copy[1] == comp.table.ptr and t_copy[2].tolist() == table + [r.scratch] * (r.width - 4)
    assert k_copy[1] == comp.keep.ptr and k_copy[2].tolist() == keep.tolist()
    assert launches == [(f"kv_compact_d{cfg.head_dim}", (cfg.num_key_value_heads, 2 * cfg.num_hidden_layers, 1),
                         [comp.pools.ptr, comp.table.ptr, comp.keep.ptr, 34, 4, cfg.num_key_value_heads])]
    assert dev.rt.trace.index(launches[0]) == 2  # after both copies, on the runner's stream
    assert [c[-1] for c in dev.calls] == [dev.handle, dev.handle]
    r.compact(table, np.r_[0:2, 7:20])  # the one spec re-pointed: this call's count and first
    assert _events(dev, "kv_compact")[1][2][3:5] == [15, 2]
    dev.rt.trace.clear()
    r.compact(table, np.arange(30))  # nothing moves: nothing staged, nothing launched
    r.compact(table, [])
    assert dev.rt.trace == [] and not dev.overwritten


def _stub_cpu_runner(cfg):
    pools = ([np.zeros(pool_shape(NUM_BLOCKS, cfg.num_key_value_heads, cfg.head_dim), np.float32)],) * 2
    # the decoder's compaction walks only the pools: no weights needed
    decoder = SimpleNamespace(config=cfg, new_pools=lambda n: pools, prune_policies=frozenset({"sink-window"}),
                              compact_pools=lambda *args: DecoderSteps.compact_pools(None, *args))
    return CpuBatchRunner(decoder, NUM_BLOCKS, 300)


BAD_KEEPS = [
    (dict(keep=[0, 64]), "a kept slot or a block lies outside the table or the pool"),
    (dict(table=[5, 9, 2, NUM_BLOCKS]), "a kept slot or a block lies outside the table or the pool"),
    (dict(table=[5, -1, 2, 3]), "a kept slot or a block lies outside the table or the pool"),
    (dict(keep=[0, 5, 5, 9]), "ascend without repeats"),
    (dict(keep=[3, 1]), "ascend without repeats"),
    (dict(keep=[-1, 3]), "ascend without repeats"),
    (dict(keep=[[1, 2]]), "1-d array of integer slots"),
    (dict(keep=[1.0, 2.5]), "1-d array of integer slots"),
]


@pytest.mark.parametrize("bad, match", BAD_KEEPS, ids=[m for _, m in BAD_KEEPS])
def test_a_bad_compaction_is_refused_as_the_cpu_runner_refuses_it_before_any_device_work(make, bad, match):
    r, dev = make()
    kw = dict(table=[5, 9, 2, 30], keep=[0, 1, 20, 40]) | bad
    for runner in (r, _stub_cpu_runner(r.config)):
        with pytest.raises(ValueError, match=match):
            runner.compact(kw["table"], kw["keep"])
    assert dev.calls == [] and dev.rt.trace == []


def test_a_table_longer_than_the_runners_is_refused(make):
    r, dev = make()
    with pytest.raises(ValueError, match=f"block table \\({r.width + 1} blocks\\) is longer"):
        r.compact(list(range(r.width + 1)), [0, 3, 7])
    assert dev.calls == []


def test_compactions_of_one_step_keep_their_staging_until_the_stream_ran(make):
    r, dev = make()
    rows = r.compactor.rows
    assert rows == 8
    for s in range(rows + 3):  # more sequences than staging rows: one wait, then the rows are reused
        r.compact([s, s + 10], np.r_[0:4, 10 + s:30])
    assert dev.syncs == 1 and not dev.overwritten
    copies = [e for e in _events(dev, "h2d") if e[1] == r.compactor.keep.ptr]
    assert [c[2][4] for c in copies] == [10 + s for s in range(rows + 3)]
    r.run_tokens([_one(6, 40, [5, 6, 7])])  # a step starts with the stream idle: all rows free again
    assert r.compactor.used == 0 and dev.syncs == 3 and not dev.overwritten


# -- the engine's check -------------------------------------------------------------------------
def test_the_engine_takes_sink_window_and_h2o_on_cuda_and_refuses_them_by_name_per_sequence(make):
    r, _ = make()
    engine = Engine(r)
    engine.check(Sequence([1, 2, 3], SamplingParams(), 8, 300, kv=KvPolicy("sink-window", budget=40)))
    engine.check(Sequence([1, 2, 3], SamplingParams(), 8, 300, kv=KvPolicy("h2o", budget=40)))
    per_seq = Engine(make(ragged_prefill=False)[0])
    with pytest.raises(ValueError, match=r"kv_policy='h2o' is not available.*use kv_policy='full',"):
        per_seq.check(Sequence([1, 2, 3], SamplingParams(), 8, 300, kv=KvPolicy("h2o", budget=40)))
    with pytest.raises(ValueError, match=r"kv_policy='sink-window' is not available.*use kv_policy='full',"):
        per_seq.check(Sequence([1, 2, 3], SamplingParams(), 8, 300, kv=KvPolicy("sink-window", budget=40)))


# -- the kernel's order, modelled in NumPy ------------------------------------------------------
def tiled_compact(pool, table, keep, first: int, tile: int) -> None:
    """kv_compact.cu's order for one pool: ascending tiles of ``tile`` slots, each tile's sources
    all read before any of its destinations is written (the barrier)."""
    table = np.asarray(table)
    for base in range(first, len(keep), tile):
        dst = np.arange(base, min(base + tile, len(keep)))
        src = np.asarray(keep)[dst]
        rows = pool[table[src // BLOCK_SIZE], :, src % BLOCK_SIZE, :].copy()  # registers
        pool[table[dst // BLOCK_SIZE], :, dst % BLOCK_SIZE, :] = rows


@pytest.mark.parametrize("tile", [1, 32, 64, 128])  # kv_compact.cu: 128 slots a tile at d64, 64 at d128, 32 at d256
def test_the_kernels_tile_order_equals_compact_tokens(tile):
    rng = np.random.default_rng(tile)
    for trial in range(40):
        table = rng.permutation(30)[:int(rng.integers(1, 25))]
        slots = len(table) * BLOCK_SIZE - int(rng.integers(0, BLOCK_SIZE))
        if trial % 3 == 0:  # sink-window: every slot shifts onto the next
            sinks = int(rng.integers(0, 5))
            keep = np.r_[0:min(sinks, slots), max(sinks, slots // 2):slots]
        else:
            keep = np.sort(rng.choice(slots, int(rng.integers(1, slots + 1)), replace=False))
        pool = rng.standard_normal((30, 2, BLOCK_SIZE, 3)).astype(np.float32)
        want, got = pool.copy(), pool.copy()
        compact_tokens(want, table, keep)
        moved = np.flatnonzero(keep != np.arange(len(keep)))
        tiled_compact(got, table, keep, int(moved[0]) if len(moved) else len(keep), tile)
        assert np.array_equal(got, want), (trial, tile)


def test_the_model_has_teeth_descending_tiles_would_corrupt_a_shift():
    pool = np.arange(4 * BLOCK_SIZE, dtype=np.float32).reshape(4, 1, BLOCK_SIZE, 1)
    table, keep = [2, 0, 3, 1], np.r_[0:4, 5:64]
    want = pool.copy()
    compact_tokens(want, table, keep)
    bad = pool.copy()
    for base in reversed(range(4, len(keep), 16)):  # the wrong order: a tile overwrites a later tile's source
        dst = np.arange(base, min(base + 16, len(keep)))
        src = keep[dst]
        bad[np.asarray(table)[dst // BLOCK_SIZE], :, dst % BLOCK_SIZE, :] = \
            bad[np.asarray(table)[src // BLOCK_SIZE], :, src % BLOCK_SIZE, :].copy()
    assert not np.array_equal(bad, want)
