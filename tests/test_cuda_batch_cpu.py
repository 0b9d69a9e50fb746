"""The CUDA batch runner's step wiring on the CPU: the real ``CudaBatchRunner`` over buffers of
the CPU arena, with its captured graphs, driver calls (``call``), kernel launches and clock
replaced by a recording fake device. Checks what ``run_tokens`` stages in the pinned buffers,
which graphs it replays with which inputs, in which order it copies, which logits row each
returned id comes from, and that every staged input is still intact when the step's copies
may run (at the synchronize that ends the step).
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

from nexusrt.backends.base import Rows
from nexusrt.backends.cuda import batch as batch_mod
from nexusrt.backends.cuda.chunks import plan_chunks
from nexusrt.kvcache.blocks import BLOCK_SIZE
from nexusrt.models.presets import preset
from nexusrt.reference.sampling import SamplingParams, sample
from tests.fakes import FakeKernel, FakeRuntime

PICK_BASE = 100  # the fake device's greedy pick for logits row r is PICK_BASE + r
WAIT = 1000.0  # seconds the fake clock spends in a synchronize that has work to wait for


class Device:
    """The fake device. ``log`` holds, in order: ("h2d", dst, src, nbytes, int32 words copied),
    ("d2d", dst, src, nbytes), ("set", dst, value), ("d2h", dst, src, nbytes), ("replay", key),
    ("launch", kernel name, grid, args). ``overwritten``: copies whose host source changed between
    the enqueue and the synchronize after it (the bytes the device would really have read)."""

    def __init__(self, monkeypatch):
        self.log, self.pending, self.overwritten, self.clock, self._synced = [], [], [], 0.0, 0
        dev = self

        class Graph:
            def __init__(self, key):
                self.key = key

            def replay(self):
                dev.log.append(("replay", self.key))

            def close(self):
                pass

        def capture(runner):
            keys = [("prefill", m) for m in runner.prefill_buckets] + [("logits",), ("decode1",)]
            runner._graphs.update((k, Graph(k)) for k in keys + [("batch", m) for m in runner.batch_buckets])

        monkeypatch.setattr(batch_mod.CudaBatchRunner, "_capture", capture)
        monkeypatch.setattr(batch_mod, "call", self.call)
        monkeypatch.setattr(batch_mod, "time", SimpleNamespace(perf_counter=self.now))
        self.monkeypatch, self.runners = monkeypatch, []

    def now(self) -> float:
        self.clock += 1.0
        return self.clock

    def synchronize(self) -> None:
        for dst, src, n, data in self.pending:
            if ctypes.string_at(src, n) != data:
                self.overwritten.append((dst, src, n))
        if len(self.log) > self._synced:  # work was queued since the last synchronize
            self.clock += WAIT
        self.pending, self._synced = [], len(self.log)

    def call(self, name, *args):
        if name == "cuMemcpyHtoDAsync":
            dst, src, n, _ = args
            data = ctypes.string_at(src, n)
            self.pending.append((dst, src, n, data))
            self.log.append(("h2d", dst, src, n, np.frombuffer(data, np.int32)))
        elif name == "cuMemcpyDtoDAsync":
            self.log.append(("d2d", *args[:3]))
        elif name == "cuMemsetD32Async":
            assert args[2] == 1
            self.log.append(("set", args[0], args[1]))
        elif name == "cuMemcpyDtoHAsync":
            dst, src, n, _ = args
            self.log.append(("d2h", dst, src, n))
            for h in (r.bb.h_next for r in self.runners if r.bb is not None and r.bb.h_next.ptr == dst):
                h.array[:min(n // 4, h.shape[0])] = PICK_BASE + np.arange(min(n // 4, h.shape[0]))  # the picks
        else:
            raise AssertionError(f"unexpected driver call {name}")

    def runner(self, deterministic=False) -> batch_mod.CudaBatchRunner:
        rt = FakeRuntime()
        rt.device = SimpleNamespace(handle=0, make_current=lambda: None)
        dev = self

        class Kernel(FakeKernel):
            def launch(self, grid, block, args, stream, shared, pdl=False):
                dev.log.append(("launch", self.name, tuple(grid), args))

        rt.kernels = SimpleNamespace(get=lambda source, name, sig: Kernel(name))
        stream = SimpleNamespace(handle=7, synchronize=self.synchronize)
        base = SimpleNamespace(config=preset("tiny"), rt=rt, max_context=256, buckets=(64, 128, 256),
                               stream=stream, weights=None, lt=None)
        r = batch_mod.CudaBatchRunner(base, 60, max_batch=4, max_chunk=128, deterministic=deterministic,
                                      ragged_prefill=False)  # the per-sequence prompt path (ragged: test_cuda_ragged_wiring_cpu)
        self.runners.append(r)
        return r

    def kinds(self, *kinds):
        return [e for e in self.log if e[0] in kinds]


@pytest.fixture
def dev(cpu_rt, monkeypatch):
    d = Device(monkeypatch)
    yield d
    for r in d.runners:
        r.close()


def _one(token, start, table, **kw):
    return Rows(np.asarray([token], np.int32), start, list(table), **kw)


def _dirty(r):
    """Stale bytes in every pinned staging buffer (pinned memory is not cleared between steps)."""
    for t in (r.bb.h_ids, r.bb.h_prompt, r.bb.h_meta, r.bb.h_tables, r.bb.h_pre_tables):
        t.array[...] = -7


def _row_table(r, table):
    return list(table) + [r.scratch] * (r.width - len(table))


def test_a_step_of_decode_rows_stages_pads_and_replays_one_bucket(dev):
    r = dev.runner()
    _dirty(r)
    bb = r.bb
    assert (r.width, r.scratch, bb.bmax) == (20, 60, 4)
    batch = [_one(5, 20, [1, 2], logits=True), _one(6, 40, [5, 6, 7]), _one(7, 3, [8], logits=True)]
    assert r.run_tokens(batch) == [PICK_BASE + 0, None, PICK_BASE + 2]
    assert bb.h_ids.array.tolist() == [5, 6, 7, 0]
    # meta = (position, slot, table row, unused): the runner leaves a real row's 4th word as it was.
    assert bb.h_meta.array[:, :3].tolist() == [[20, 20, 0], [40, 40, 1], [3, 3, 2], [0, 0, 3]]
    assert bb.h_meta.array[3].tolist() == [0, 0, 3, 0]
    want_tables = [_row_table(r, t) for t in ([1, 2], [5, 6, 7], [8], [])]  # the padding row: slot 0 of scratch
    assert bb.h_tables.array.tolist() == want_tables
    work = [e for e in dev.log if e[0] != "h2d"]
    assert [e[:2] for e in work] == [("replay", ("batch", 4)), ("d2h", bb.h_next.ptr)]
    assert work[1][2:] == (bb.next.ptr, bb.h_next.nbytes)
    copies = {e[1]: e for e in dev.kinds("h2d")}
    assert len(copies) == 3 and dev.log.index(work[0]) == 3  # all three before the replay
    for dst, src, words in ((bb.ids, bb.h_ids, [5, 6, 7, 0]),
                            (bb.meta, bb.h_meta, sum(bb.h_meta.array.tolist(), [])),
                            (bb.tables, bb.h_tables, sum(want_tables, []))):
        _, _, ptr, n, data = copies[dst.ptr]
        assert (ptr, n, data.tolist()) == (src.ptr, 4 * len(words), words)
    assert not dev.overwritten


def test_a_lone_decode_takes_the_one_sequence_graph_unless_deterministic(dev):
    r = dev.runner()
    _dirty(r)
    pre, bb = r.pre, r.bb
    assert r.run_tokens([_one(9, 33, [4, 11, 2], logits=True)]) == [PICK_BASE]
    slot = bb.h_pre_tables.shape[0] - 1
    assert bb.h_pre_tables.array[slot].tolist() == _row_table(r, [4, 11, 2])
    kinds = [e[0] for e in dev.log]
    assert kinds == ["h2d", "set", "set", "replay", "d2d", "launch", "d2h"]
    h2d, tok, pos, replay, d2d, launch, _ = dev.log
    assert h2d[1:4] == (pre.block_table.ptr, bb.h_pre_tables.ptr + slot * r.width * 4, r.width * 4)
    assert h2d[4].tolist() == _row_table(r, [4, 11, 2])
    assert tok[1:] == (pre.token.ptr, 9) and pos[1:] == (pre.pos.ptr, 33)
    assert replay[1] == ("decode1",)
    assert d2d[1:] == (bb.logits.ptr, pre.logits.ptr, 4 * r.config.vocab_size)
    assert launch[1:3] == ("argmax_rows", (1, 1, 1)) and launch[3][0] == bb.logits.ptr  # row 0
    assert not dev.overwritten

    det = dev.runner(deterministic=True)
    _dirty(det)
    dev.log.clear()
    assert det.run_tokens([_one(9, 33, [4, 11, 2], logits=True)]) == [PICK_BASE]
    assert [e[1] for e in dev.kinds("replay", "launch")] == [("batch", 4)]
    assert det.bb.h_meta.array[0, :3].tolist() == [33, 33, 0]
    assert det.bb.h_meta.array[1:].tolist() == [[0, 0, 1, 0]] * 3
    assert [e[3] for e in dev.kinds("h2d")] == [16, 64, 4 * det.width * 2]


def _replay_inputs(dev, r, key):
    """For each replay of ``key``: the ids last copied to ``pre.ids`` and the last ``pos`` set."""
    ids = pos = None
    out = []
    for e in dev.log:
        if e[0] == "h2d" and e[1] == r.pre.ids.ptr:
            ids = e[4].tolist()
        elif e[0] == "set" and e[1] == r.pre.pos.ptr:
            pos = e[2]
        elif e == ("replay", key):
            out.append((ids, pos))
    return out


def test_a_prompt_chunk_beside_decode_rows(dev):
    r = dev.runner()
    _dirty(r)
    pre, bb, bmax, vocab = r.pre, r.bb, r.bb.bmax, r.config.vocab_size
    prompt = np.arange(1, 71, dtype=np.int32)
    chunks = plan_chunks(70, r.prefill_buckets, 16, r.width * BLOCK_SIZE)
    assert chunks == [(64, 64), (64, 6)]
    batch = [_one(5, 20, [1, 2], logits=True), Rows(prompt, 16, [3, 4, 9, 10, 12, 13], logits=True),
             _one(6, 40, [5, 6, 7], logits=True)]
    assert r.run_tokens(batch) == [PICK_BASE + 0, PICK_BASE + bmax, PICK_BASE + 1]
    assert bb.h_prompt.array[:128].tolist() == prompt.tolist() + [0] * 58
    assert _replay_inputs(dev, r, ("prefill", 64)) == [(prompt[:64].tolist(), 16),
                                                       (prompt[64:].tolist() + [0] * 58, 80)]
    order = [e[1] for e in dev.kinds("replay", "launch")]
    assert order == [("prefill", 64), ("prefill", 64), ("logits",), ("batch", 2), "argmax_rows"]
    i_logits = dev.log.index(("replay", ("logits",)))
    # The chunk's last real row (5) to row 0 before the LM head, its logits to row bmax after it.
    assert dev.log[i_logits - 1] == ("d2d", pre.hidden.ptr, pre.hidden.ptr + 4 * r.config.hidden_size * 5,
                                     4 * r.config.hidden_size)
    assert dev.log[i_logits + 1] == ("d2d", bb.logits.ptr + 4 * vocab * bmax, pre.logits.ptr, 4 * vocab)
    (launch,) = dev.kinds("launch")
    assert launch[2] == (1, 1, 1) and launch[3][0] == bb.logits.ptr + 4 * vocab * bmax
    assert launch[3][2] == bb.next.ptr + 4 * bmax
    tables = [e for e in dev.kinds("h2d") if e[1] == pre.block_table.ptr]
    assert [t[4].tolist() for t in tables] == [_row_table(r, [3, 4, 9, 10, 12, 13])]
    assert dev.log.index(tables[0]) < dev.log.index(("replay", ("prefill", 64)))
    assert dev.kinds("d2h")[0] == dev.log[-1] and not dev.overwritten


def test_two_prompt_chunks_in_one_step_keep_their_own_staging(dev):
    r = dev.runner()
    _dirty(r)
    pre, bb, bmax = r.pre, r.bb, r.bb.bmax
    first, second = np.arange(1, 71, dtype=np.int32), np.arange(200, 209, dtype=np.int32)
    batch = [Rows(first, 16, [3, 4, 9, 10, 12, 13], logits=True), Rows(second, 0, [20], logits=True)]
    assert r.run_tokens(batch) == [PICK_BASE + bmax, PICK_BASE + bmax + 1]
    assert not dev.overwritten  # no staged id or table reused before its copy ran
    ids = [(e[2] - bb.h_prompt.ptr) // 4 for e in dev.kinds("h2d") if e[1] == pre.ids.ptr]
    assert ids == [0, 64, 128]
    tables = [e for e in dev.kinds("h2d") if e[1] == pre.block_table.ptr]
    assert [e[2] for e in tables] == [bb.h_pre_tables.ptr, bb.h_pre_tables.ptr + 4 * r.width]
    assert [e[4].tolist() for e in tables] == [_row_table(r, [3, 4, 9, 10, 12, 13]), _row_table(r, [20])]
    assert _replay_inputs(dev, r, ("prefill", 64))[2] == (second.tolist() + [0] * 55, 0)
    assert dev.log.count(("replay", ("logits",))) == 2
    (launch,) = dev.kinds("launch")
    assert launch[2] == (2, 1, 1) and launch[3][0] == bb.logits.ptr + 4 * r.config.vocab_size * bmax


SAMPLE_A = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=11)
SAMPLE_B = SamplingParams(temperature=1.3, top_k=0, top_p=1.0, seed=5)


def test_sampling_rows_are_sampled_on_the_host_by_the_engine_rule(dev):
    r = dev.runner()
    bb, bmax = r.bb, r.bb.bmax
    logits = (np.random.default_rng(0).standard_normal(bb.logits.shape) * 0.5).astype(np.float32)
    bb.logits.array[:] = logits  # what the device left in the logits rows
    batch = [_one(5, 20, [1, 2], logits=True, params=SAMPLE_A, step=5),
             Rows(np.arange(1, 10, dtype=np.int32), 0, [9], logits=True, params=SAMPLE_B, step=3),
             _one(6, 40, [5, 6, 7], logits=True, params=SamplingParams(seed=3), step=4),  # greedy: the pick
             _one(7, 3, [8], logits=True, params=SAMPLE_B, step=9)]
    want = [sample(logits[0], SAMPLE_A, 5), sample(logits[bmax], SAMPLE_B, 3), PICK_BASE + 1,
            sample(logits[2], SAMPLE_B, 9)]
    # The rows, params and steps are told apart: another row, params or step would give another id.
    assert want[0] not in (sample(logits[1], SAMPLE_A, 5), sample(logits[0], SAMPLE_B, 5),
                           sample(logits[0], SAMPLE_A, 0))
    assert want[3] not in (sample(logits[3], SAMPLE_B, 9), sample(logits[2], SAMPLE_B, 0))
    assert r.run_tokens(batch) == want
    got = r.run(batch)  # the same step, returning the rows it reads
    for i, row in enumerate((0, bmax, 1, 2)):
        assert np.array_equal(got[i], logits[row])


BAD = [(dict(ids=[]), "at least one id"), (dict(start=256, table=range(17)), "exceed the context"),
       (dict(start=40), "does not cover"), (dict(table=range(21)), "does not cover"),
       (dict(table=[3, 60]), "outside 0..59"), (dict(ids=[512]), "token ids"), (dict(ids=[4, -1]), "token ids"),
       (dict(position=7), "KV pruning"), (dict(scores=np.zeros(32)), "KV pruning")]


@pytest.mark.parametrize("bad, match", BAD, ids=[m for _, m in BAD])
def test_a_bad_entry_is_refused_before_any_device_work(dev, bad, match):
    r = dev.runner()
    kw = dict(ids=[5], start=20, table=[1, 2], logits=True) | bad
    entry = Rows(np.asarray(kw.pop("ids"), np.int32), kw.pop("start"), list(kw.pop("table")), **kw)
    good = Rows(np.arange(1, 10, dtype=np.int32), 0, [9], logits=True)
    with pytest.raises(ValueError, match=match):
        r.run_tokens([good, entry])
    assert dev.log == [] and r.timings["steps"] == 0
    with pytest.raises(ValueError, match="max_batch"):
        r.run_tokens([_one(5, 20, [1, 2])] * 5)
    assert dev.log == [] and r.timings["steps"] == 0
    assert r.run_tokens([good, _one(5, 20, [1, 2], logits=True)]) == [PICK_BASE + 4, PICK_BASE]
    assert r.bb.h_ids.array[0] == 5 and not dev.overwritten


def test_timings_advance_one_step_per_call(dev):
    r = dev.runner()
    assert r.timings == {"steps": 0, "enqueue_s": 0.0, "wait_s": 0.0, "picks_s": 0.0}
    for n in (1, 2, 3):
        r.run_tokens([_one(5, 20 + n, [1, 2], logits=True)] * (n % 2 + 1))
        # The fake clock ticks once per read; only the synchronize after the step's work waits.
        assert r.timings == {"steps": n, "enqueue_s": n * 1.0, "wait_s": n * (WAIT + 1), "picks_s": n * 1.0}
    assert r.run_tokens([]) == [] and r.timings["steps"] == 3
