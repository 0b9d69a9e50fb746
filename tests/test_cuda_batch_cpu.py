"""``CudaBatchRunner``'s step on the CPU, its decode side: the real runner over the fake GPU of
``tests/cuda_batch_fakes.py``. Checks the graphs each mode captures and replays (batch bucket,
the one-sequence ``decode`` graph, deterministic mode), what a step stages in the pinned
buffers and copies before the replay, the pick each entry gets, refusals before any device
work, and the timing counters. The prompt paths: ``test_cuda_ragged_wiring_cpu``; the device
sampler's staging and rows: ``test_cuda_batch_sampling_cpu``.
"""

from __future__ import annotations

import numpy as np
import pytest

from nexusrt.reference.sampling import SamplingParams
from tests.cuda_batch_fakes import WAIT, chunk, dev, no_occupancy_query, one, row_table  # noqa: F401

SAMPLE = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=11)


@pytest.mark.parametrize("ragged", [True, False], ids=["ragged", "per-sequence"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["", "deterministic"])
def test_the_runner_captures_the_graphs_its_mode_uses(dev, ragged, deterministic):
    r = dev.runner(ragged=ragged, deterministic=deterministic)
    names = {g.name for g in r._graphs.values()}
    prompt = set() if ragged else {"prefill64", "prefill128", "logits"}
    decode = {"batch4"} if deterministic else {"decode", "batch1", "batch2", "batch4"}
    assert names == prompt | decode
    assert (r.ragged is not None) == ragged
    if ragged:  # the ragged programs, one per row bucket up to max_chunk (deterministic: the largest only)
        assert sorted(r.ragged.programs) == ([128] if deterministic else [64, 128]) and r.pre.chunk == 128
        assert sorted(r.ragged.logits) == ([4] if deterministic else [1, 2, 4])


@pytest.mark.parametrize("deterministic", [False, True], ids=["", "deterministic"])
def test_decode_rows_replay_the_smallest_bucket_that_holds_them(dev, deterministic):
    r = dev.runner(deterministic=deterministic)
    for n, graph in ((1, "decode"), (2, "batch2"), (3, "batch4"), (4, "batch4")):
        dev.log.clear()
        batch = [one(10 * i + n, 8 * i + n, [i, 10 + i], logits=True) for i in range(n)]
        assert r.run_tokens(batch) == dev.expected(batch)
        assert [e[1] for e in dev.kinds("replay")] == ["batch4" if deterministic else graph]


def test_a_step_of_decode_rows_stages_pads_and_replays_one_bucket(dev):
    r = dev.runner()
    bb = r.bb
    assert (r.width, r.scratch, bb.bmax) == (20, 60, 4)
    batch = [one(5, 20, [1, 2], logits=True), one(6, 40, [5, 6, 7]), one(7, 3, [8], logits=True)]
    out = r.run_tokens(batch)
    assert out == dev.expected(batch) and out[1] is None
    assert bb.h_ids.array.tolist() == [5, 6, 7, 0]
    # meta = (position, slot, table row, unused): a real row's 4th word is left as it was.
    assert bb.h_meta.array[:, :3].tolist() == [[20, 20, 0], [40, 40, 1], [3, 3, 2], [0, 0, 3]]
    assert bb.h_meta.array[3].tolist() == [0, 0, 3, 0] and bb.h_meta.array[0, 3] == -7
    want_tables = [row_table(r, t) for t in ([1, 2], [5, 6, 7], [8], [])]  # the padding row: all scratch
    assert bb.h_tables.array.tolist() == want_tables
    assert [e[0] for e in dev.log] == ["h2d"] * 5 + ["replay", "d2h"]
    assert dev.log[5] == ("replay", "batch4") and dev.log[6][1:] == (bb.h_next.ptr, bb.next.ptr, bb.h_next.nbytes)
    for dst, src, words in ((bb.ids, bb.h_ids, [5, 6, 7, 0]),
                            (bb.meta, bb.h_meta, bb.h_meta.array.reshape(-1).tolist()),
                            (bb.tables, bb.h_tables, sum(want_tables, []))):
        (copy,) = dev.copy_to(dst)
        assert (copy[2], copy[3], copy[4].tolist()) == (src.ptr, 4 * len(words), words)
    assert not dev.overwritten


def test_a_lone_decode_takes_the_one_sequence_graph_and_samples_row_0(dev):
    r = dev.runner()
    pre, bb = r.pre, r.bb
    batch = [one(9, 33, [4, 11, 2], logits=True, params=SAMPLE, step=4)]
    assert r.run_tokens(batch) == dev.expected(batch)
    slot = bb.h_pre_tables.shape[0] - 1  # the slot after the prompt chunks' table rows
    assert bb.h_pre_tables.array[slot].tolist() == row_table(r, [4, 11, 2])
    kinds = [e[0] for e in dev.log]
    assert kinds == ["h2d", "set", "set", "set", "set", "replay", "d2d", "h2d", "h2d", "launch", "launch", "d2h"]
    table, token, pos, rope_pos, rope_slot, replay, d2d = dev.log[:7]
    assert table[1:4] == (pre.block_table.ptr, bb.h_pre_tables.ptr + slot * r.width * 4, r.width * 4)
    assert table[4].tolist() == row_table(r, [4, 11, 2])
    assert token[1:] == (pre.token.ptr, 9) and pos[1:] == (pre.pos.ptr, 33) and replay[1] == "decode"
    # RoPE/append reads its position and slot from one_meta (equal here: nothing was pruned)
    assert rope_pos[1:] == (bb.one_meta.ptr, 33) and rope_slot[1:] == (bb.one_meta.ptr + 4, 33)
    assert d2d[1:] == (bb.logits.ptr, pre.logits.ptr, 4 * r.config.vocab_size)  # its logits to row 0
    partial, finish = dev.kinds("launch")  # the sampler over row 0: its logits in, pick 0 out
    assert (partial[1], partial[2][1]) == ("sample_rows_partial", 1)
    assert finish[1:3] == ("sample_rows_finish", (1, 1, 1))
    assert finish[3][0] == bb.logits.ptr and finish[3][7] == bb.next.ptr
    assert not dev.overwritten


STEP = dict(logits=True, params=SAMPLE)
BAD = [(dict(ids=[]), "at least one id"), (dict(start=256, table=range(17)), "exceed the context"),
       (dict(start=40), "does not cover"), (dict(table=range(21)), "does not cover"),
       (dict(table=[3, 60]), "outside 0..59"), (dict(ids=[512]), "token ids"), (dict(ids=[4, -1]), "token ids"),
       (dict(position=7), "KV pruning"), (dict(scores=np.zeros(20)), "scores hold 20 slots; the rows fill 21"),
       (dict(STEP, step=-1), "step must be"), (dict(STEP, step=2**31), "step must be"),
       (dict(STEP, step=1.5), "step must be"), (dict(STEP, step=True), "step must be")]


@pytest.mark.parametrize("ragged", [True, False], ids=["ragged", "per-sequence"])
@pytest.mark.parametrize("bad, match", BAD, ids=[f"{m}-{i}" for i, (_, m) in enumerate(BAD)])
def test_a_bad_entry_is_refused_before_any_device_work(dev, ragged, bad, match):
    r = dev.runner(ragged=ragged)
    kw = dict(ids=[5], start=20, table=[1, 2], logits=True) | bad
    entry = chunk(kw.pop("ids"), kw.pop("start"), kw.pop("table"), **kw)
    good = chunk(np.arange(1, 10), 0, [9], logits=True)
    # With a prompt chunk, and alone: a lone decode's sampler inputs are staged after its work.
    for step in ([good, entry], [entry]):
        with pytest.raises(ValueError, match=match):
            r.run_tokens(step)
        assert dev.log == [] and r.timings["steps"] == 0
    with pytest.raises(ValueError, match="max_batch"):
        r.run_tokens([one(5, 20, [1, 2])] * 5)
    with pytest.raises(ValueError, match="max_batch"):
        r.run_tokens([good] * 5)
    assert dev.log == [] and r.timings["steps"] == 0
    batch = [good, one(5, 20, [1, 2], logits=True)]
    assert r.run_tokens(batch) == dev.expected(batch) and not dev.overwritten


def test_a_sampling_step_is_checked_only_where_a_row_is_sampled(dev):
    r = dev.runner()
    batch = [one(5, 20, [1, 2], params=SAMPLE, step=-1),  # no logits: nothing to sample
             one(6, 20, [3, 4], logits=True, params=SamplingParams(), step=2**31)]  # greedy: the step is unused
    assert r.run_tokens(batch) == dev.expected(batch)


def test_timings_advance_one_step_per_call(dev):
    r = dev.runner()
    assert r.timings == {"steps": 0, "enqueue_s": 0.0, "wait_s": 0.0, "picks_s": 0.0}
    for n in (1, 2, 3):
        r.run_tokens([one(5, 20 + n, [1, 2], logits=True)] * (n % 2 + 1))
        # The fake clock ticks once per read; only the synchronize after the step's work waits.
        assert r.timings == {"steps": n, "enqueue_s": n * 1.0, "wait_s": n * (WAIT + 1), "picks_s": n * 1.0}
    assert r.run_tokens([]) == [] and r.timings["steps"] == 3 and dev.log[-1][0] == "d2h"
