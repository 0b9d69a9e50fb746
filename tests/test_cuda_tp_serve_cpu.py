"""The serving engine over CUDA tensor-parallel workers, checked on the CPU (issue 17, serving).

The real CUDA rank loop runs in spawned processes over the fakes of ``cuda_tp_fakes`` (a fake
``CudaRunner`` and ``CudaBatchRunner`` per rank, NCCL recorded):

- the workers answer the batch messages: each rank makes its batch runner over its own runner
  with its RankComm, every rank runs every step (SPMD), rank 0's picks come back and equal the
  batch rule's; compaction reaches every rank; a second open and a bad entry are refused by
  every rank alike (the group stays usable); a bad ``max_batch`` never reaches a rank;
- the engine over them: ``make_loop`` takes the ``ProcessRunner``'s batch runner, and several
  concurrent greedy and sampled requests end with the one-sequence path's ids; closing releases
  every rank's batch runner and then the workers;
- a worker that dies mid-step is named (``WorkerDied``), the others are stopped, nothing is left,
  and the batch runner's close is silent after it;
- h2o is refused by the engine over the ranks (no summed scores), naming ``kv_policy``.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from types import SimpleNamespace

import numpy as np
import pytest

from cuda_tp_fakes import FakeRankRunner, FakeRankTarget, logits_table
from nexusrt.backends.base import Rows, generate_tokens, sample_rows
from nexusrt.backends.cuda.tp_batch import ProcessBatchRunner
from nexusrt.backends.cuda.tp_front import ProcessRunner
from nexusrt.engine.requests import make_loop
from nexusrt.models.loader import WeightsOrigin
from nexusrt.models.synthetic import SyntheticWeights
from nexusrt.parallel import ShardPlan, shard
from nexusrt.parallel.procs import WorkerDied
from nexusrt.reference.sampling import SamplingParams
from nexusrt.serving import KvPolicy, Sequence
from tests.test_cuda_step_cpu import _config
from tp_worker_fakes import gone


@pytest.fixture
def uid_stub(monkeypatch):
    from nexusrt.backends.cuda import tp_front

    monkeypatch.setattr(tp_front, "unique_id", lambda: bytes(range(7, 135)))


def _ranks(tmp_path, **crash) -> ProcessRunner:
    return ProcessRunner(WeightsOrigin("synthetic:tiny"), _config("llama_tiny"), 2, 48,
                         target=FakeRankTarget(tmp_path, **crash), gpus=2)


def _records(tmp_path):
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def _rows(ids, start, table, **kw) -> Rows:
    return Rows(np.asarray(ids, np.int32), start, list(table), **kw)


def test_the_workers_answer_the_batch_messages(tmp_path, uid_stub):
    ranks = _ranks(tmp_path)
    pids = ranks.pids
    sampled = SamplingParams(temperature=0.8, top_k=20, seed=3)
    try:
        with pytest.raises(ValueError, match="max_batch"):  # refused in the front: no rank saw it
            ranks.batch_runner(40, 0)
        batch = ranks.batch_runner(40, 4, max_chunk=128)
        assert isinstance(batch, ProcessBatchRunner) and batch.config is ranks.config
        assert (batch.max_context, batch.num_blocks, batch.prune_policies) == (48, 40, frozenset({"sink-window"}))
        with pytest.raises(ValueError, match="open already"):  # every rank refuses alike: still usable
            ranks.batch_runner(40, 4)
        step = [_rows([3, 17, 99], 0, [0], logits=True), _rows([5], 9, [1], logits=True, params=sampled, step=4),
                _rows([8, 9], 0, [2])]
        table = logits_table(ranks.config.vocab_size)
        want = sample_rows(step, [table[99], table[5], None])
        assert batch.run_tokens(step) == want and want[2] is None
        got = batch.run(step)
        assert np.array_equal(got[0], table[99]) and got[2] is None
        with pytest.raises(ValueError, match="exceed the context of 48"):
            batch.run_tokens([_rows([1] * 10, 40, [3, 4, 5])])
        batch.compact([0, 1], [0, 2, 5])
        batch.close()
        batch.close()  # safe twice
        again = ranks.batch_runner(8, 2)  # closed: a new one may be opened
        again.close()
    finally:
        ranks.close()
    assert all(gone(p) for p in pids) and not multiprocessing.active_children()
    records = _records(tmp_path)
    assert records[0]["messages"] == records[1]["messages"]  # SPMD: every rank got every message
    assert records[0]["messages"] == ["batch_open", "batch_open", "batch_step", "batch_logits", "batch_step",
                                      "batch_compact", "batch_close", "batch_open", "batch_close"]
    for rec in records:
        assert rec["batch"]["num_blocks"] == 8 and rec["batch"]["closed"]  # the last one opened


def test_the_engine_serves_concurrent_requests_over_the_workers(tmp_path, uid_stub):
    ranks = _ranks(tmp_path)
    pids = ranks.pids
    cfg = ranks.config
    alone = FakeRankRunner(SimpleNamespace(config=cfg, weights=shard(SyntheticWeights(cfg), ShardPlan(cfg, 2), 0)),
                           None, 48, SimpleNamespace(rank=0, size=2, vocab_part=cfg.vocab_size // 2), record={})
    prompts = [[3, 17, 99, 4], [5], [250, 1, 1, 7, 9, 200], [42, 43]]
    params = [SamplingParams(), SamplingParams(temperature=0.9, top_k=5, seed=1), SamplingParams(),
              SamplingParams(temperature=0.7, seed=8)]
    try:
        loop = make_loop(ranks, "cuda", 4, None, 16)
        try:
            assert isinstance(loop.engine.runner, ProcessBatchRunner)
            assert loop.engine.runner.num_blocks == 4 * 3  # max_batch sequences at full context (48 = 3 blocks)
            with pytest.raises(ValueError, match="kv_policy='h2o' is not available"):
                loop.engine.check(Sequence([1, 2], SamplingParams(), 4, 48, kv=KvPolicy("h2o", budget=8, sinks=2,
                                                                                        window=2)))
            seqs = [loop.submit(Sequence(p, q, 10, 48)) for p, q in zip(prompts, params)]
            t0 = time.monotonic()
            while any(s.finish_reason is None for s in seqs) and time.monotonic() - t0 < 60:
                time.sleep(0.02)
            for s, p, q in zip(seqs, prompts, params):
                want: list[int] = []
                generate_tokens(alone, p, 10, q, lambda t: want.append(t) and False)
                assert s.finish_reason == "length" and s.output_ids == want
        finally:
            loop.stop()
            loop.engine.runner.close()
    finally:
        ranks.close()
    assert all(gone(p) for p in pids) and not multiprocessing.active_children()
    for rec in _records(tmp_path):
        assert rec["batch"]["closed"] and len(rec["batch"]["steps"]) >= 10
        assert rec["batch"]["max_chunk"] >= 2048  # the engine's token budget


def test_a_worker_that_dies_mid_step_is_named_and_nothing_is_left(tmp_path, uid_stub):
    ranks = _ranks(tmp_path, die_at_batch=(1, 2))
    pids = ranks.pids
    try:
        batch = ranks.batch_runner(16, 2)
        step = [_rows([1, 2, 3], 0, [0], logits=True)]
        batch.run_tokens(step)
        batch.run_tokens([_rows([4], 3, [0], logits=True)])
        with pytest.raises(WorkerDied, match=r"rank 1 \(pid \d+\) died during the serving step: exit code 9"):
            batch.run_tokens([_rows([5], 4, [0], logits=True)])
        assert all(gone(p) for p in pids)  # the others were stopped with it
        with pytest.raises(WorkerDied, match="rank 1"):  # fatal: the next step names it again
            batch.run_tokens(step)
        batch.close()  # nothing left to release: silent
    finally:
        ranks.close()
    assert all(gone(p) for p in pids) and not multiprocessing.active_children()
