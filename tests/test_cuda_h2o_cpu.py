"""h2o's scores on the CUDA batch runner, wired on the CPU (the fake device of
:mod:`tests.cuda_batch_fakes`, whose ``attention_scores_rows`` adds 1 to every slot a query row
attends to, once per layer): which graph a scored entry takes, what is zeroed and copied back,
how a prompt chunk of an h2o sequence becomes one query row per id (in replays of ``max_batch``
rows, the last ids together), what lands in ``Rows.scores``, and the engine's h2o steps end to
end. The numbers themselves: ``test_attention_scores.py`` and ``test_cuda_prune.py`` on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from nexusrt.reference.sampling import SamplingParams
from nexusrt.serving import Engine, KvPolicy, Sequence
from nexusrt.serving.scheduler import SchedulerConfig
from tests.cuda_batch_fakes import chunk, dev, one  # noqa: F401
from tests.test_cuda_step_cpu import no_occupancy_query  # noqa: F401


def _layers(dev):
    return dev.cfg.num_hidden_layers


def _fills(dev, r):
    return [e for e in dev.kinds("fill") if e[1] == r.scores.scores.ptr]


def test_a_scored_decode_row_takes_the_scores_twin_and_gains_one_step_of_mass(dev):
    r = dev.runner()
    prior = np.random.default_rng(1).random(30)
    scored = one(5, 20, [1, 2], logits=True, scores=prior.copy())
    step = [scored, one(9, 7, [3], logits=True)]
    assert r.run_tokens(step) == dev.expected(step)
    assert dev.work()[0] == "batch2-scores"
    assert _fills(dev, r) == [("fill", r.scores.scores.ptr, 0, 2 * r.max_context)]  # zeroed before the replay
    assert ("d2h", r.h_scores.ptr, r.scores.scores.ptr, 4 * 2 * r.max_context) in dev.log
    want = prior.copy()
    want[:21] += _layers(dev)  # slots 0..20, once per layer; slots past the row's untouched
    np.testing.assert_array_equal(scored.scores, want)
    assert not dev.overwritten
    dev.log.clear()
    step = [one(5, 21, [1, 2], logits=True), one(9, 8, [3], logits=True)]  # no scores: the plain graph
    assert r.run_tokens(step) == dev.expected(step)
    assert dev.work()[0] == "batch2" and not dev.kinds("fill")


def test_a_lone_scored_decode_takes_the_batch_graph_not_the_one_sequence_graph(dev):
    r = dev.runner()
    s = np.zeros(11)
    step = [one(4, 10, [5], logits=True, scores=s)]
    assert r.run_tokens(step) == dev.expected(step)
    assert dev.work()[0] == "batch1-scores" and "decode1" not in dev.work()
    np.testing.assert_array_equal(s, np.full(11, _layers(dev)))


def test_a_scored_prompt_chunk_runs_one_query_row_per_id_in_replays_of_max_batch(dev):
    r = dev.runner()  # max_batch 4
    ids = np.arange(30, 39)  # nine ids at slots 10..18, RoPE positions 50..58
    s = np.zeros(19)
    entry = chunk(ids, 10, [1, 2], logits=True, position=50, scores=s)
    other = one(7, 3, [4], logits=True)
    step = [other, entry]
    assert r.run_tokens(step) == dev.expected(step)  # the chunk's pick: of its last id
    # Ids 0..7 of the chunk in two replays of four rows, then the last ids of both entries.
    assert dev.work() == ["batch4-scores", "batch4-scores", "batch2-scores"] + dev.work()[3:]
    assert not any(w.startswith("ragged") for w in dev.work())
    metas = [e[4].reshape(-1, 4) for e in dev.copy_to(r.bb.meta)]
    assert [m[:, :3].tolist() for m in metas[:2]] == [[[50 + j, 10 + j, j % 4] for j in range(k, k + 4)] for k in (0, 4)]
    assert metas[2][:2, :3].tolist() == [[3, 3, 0], [58, 18, 1]]
    assert [e[4].tolist() for e in dev.copy_to(r.bb.ids)][:2] == [list(ids[:4]), list(ids[4:8])]
    # Slot t gains one unit per layer from every id at or after it (the CPU's causal prompt rows).
    want = np.array([min(9, 19 - t) for t in range(19)], float) * _layers(dev)
    np.testing.assert_array_equal(s, want)
    assert dev.overwritten == []  # each early replay was waited for before its staging was reused


def test_two_scored_chunks_and_a_decode_share_the_replays(dev):
    r = dev.runner()
    a, b = np.zeros(8), np.zeros(5)
    step = [chunk([11, 12, 13], 5, [1], logits=True, scores=a), one(8, 2, [2], logits=True),
            chunk([21, 22], 3, [3], logits=False, scores=b)]
    out = r.run_tokens(step)
    assert out == dev.expected(step) and out[2] is None
    assert dev.work()[:2] == ["batch4-scores", "batch4-scores"]  # 2 + 1 early ids, then 3 last ids
    L = _layers(dev)
    np.testing.assert_array_equal(a, L * np.array([3, 3, 3, 3, 3, 3, 2, 1]))
    np.testing.assert_array_equal(b, L * np.array([2, 2, 2, 2, 1]))


def test_the_score_buffers_and_graphs_are_made_once_at_the_first_scored_step(dev):
    r = dev.runner()
    assert r.scores is None and not any(k[0] == "batch-scores" for k in r._graphs)  # no h2o yet: nothing held
    r.run_tokens([one(4, 10, [5], scores=np.zeros(11))])
    made, graphs = r.scores, dict(r._graphs)
    assert sorted(k[1] for k in graphs if k[0] == "batch-scores") == list(r.batch_buckets)
    r.run_tokens([one(4, 11, [5], scores=np.zeros(12))])
    assert r.scores is made and r._graphs == graphs
    assert r.scores.raw.shape == (4, dev.cfg.num_attention_heads, r.max_context)


def test_a_failed_capture_leaves_nothing_and_the_next_scored_step_tries_again(dev, monkeypatch):
    from nexusrt import scheduler

    r = dev.runner()
    real = scheduler.capture

    def broken(stages, stream="compute"):
        if stages[0].name.startswith("batch2-scores"):
            raise RuntimeError("capture failed")
        return real(stages, stream)

    monkeypatch.setattr(scheduler, "capture", broken)
    with pytest.raises(RuntimeError, match="capture failed"):
        r.run_tokens([one(4, 10, [5], scores=np.zeros(11))])
    assert r.scores is None and r.h_scores is None and not any(k[0] == "batch-scores" for k in r._graphs)
    monkeypatch.setattr(scheduler, "capture", real)
    s = np.zeros(11)
    r.run_tokens([one(4, 10, [5], scores=s)])
    assert s[0] == _layers(dev)


def test_the_engine_runs_h2o_on_the_cuda_runner(dev):
    r = dev.runner()
    assert "h2o" in r.prune_policies
    engine = Engine(r, SchedulerConfig(max_running=4, token_budget=16))
    seqs = [Sequence(list(range(10 + i, 40 + i)), SamplingParams(), 12, 256, kv=KvPolicy("h2o", budget=20, sinks=2))
            for i in range(2)]
    for s in seqs:
        engine.add(s)
    while engine.has_work:
        engine.step()
    for s in seqs:
        assert s.finish_reason == "length" and s.error is None and len(s.output_ids) == 12
    assert engine.metrics.kv_evicted > 0
    assert engine.blocks.num_used == 0


def test_on_the_cpu_a_chunks_mass_is_that_of_its_ids_as_one_row_each():
    """The rule the CUDA runner relies on, shown on the oracle: a prompt chunk's attention mass
    (and its last logits) equal those of its ids run as single-id rows of one step, row j at slot
    start + j (each row attends to slots 0 .. start + j, K/V of the rows before it included)."""
    import nexusrt as nrt
    from nexusrt.backends.base import Rows
    from nexusrt.backends.cpu.batch import CpuBatchRunner
    from nexusrt.backends.cpu.model import CpuRunner
    from nexusrt.models.loader import load_model

    nrt.firmware.shutdown()
    nrt.firmware.init(backend="cpu")
    try:
        model = load_model("nexusrt:stdlib-tiny")
        rng = np.random.default_rng(5)
        ids = rng.integers(8, 4000, 40).astype(np.int32)
        table = [3, 7, 1]
        got = []
        for as_rows in (False, True):
            runner = CpuBatchRunner(CpuRunner(model.weights, 64).decoder, 8, 64)
            s = np.zeros(40)
            runner.run([Rows(ids[:25], 0, table, scores=s)])  # the prompt's first chunk, as the engine cuts it
            if as_rows:
                step = [Rows(ids[25 + j:26 + j], 25 + j, table, logits=j == 14, scores=s) for j in range(15)]
            else:
                step = [Rows(ids[25:], 25, table, logits=True, scores=s)]
            got.append((s, [x for x in runner.run(step) if x is not None][0]))
        (chunk_mass, chunk_logits), (rows_mass, rows_logits) = got
        np.testing.assert_allclose(rows_mass, chunk_mass, rtol=1e-6)
        np.testing.assert_allclose(rows_logits, chunk_logits, rtol=1e-5, atol=1e-5)
        assert chunk_mass[0] > chunk_mass[39] > 0  # the first id was seen by every row
    finally:
        nrt.firmware.shutdown()
