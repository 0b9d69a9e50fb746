"""CUDA tensor parallelism on GPUs (issue 17). The one-GPU tests passed on an H200 (2026-12-02);
the two-GPU test waits for a machine with several GPUs.

One GPU (a sum over one rank is the identity, so the NCCL path must change nothing):
- a TP=1 rank in this process (``CudaRunner(..., tp=RankComm(NcclGroup(0, 1, uid)))``): NCCL
  captured in its decode and prefill graphs, logits and greedy ids bit for bit the plain runner's;
- the same through a worker process (``ProcessRunner``, the path ``nrt.LLM`` takes), and a
  killed worker named with nothing left behind;
- the serving engine through that worker (``ProcessRunner.batch_runner``: the rank's
  ``CudaBatchRunner`` with its RankComm, NCCL in its batch graphs and ragged passes): several
  concurrent greedy requests give the plain ``CudaBatchRunner``'s ids (passed on an H200, 2026-12-02).
Two GPUs or more: TP=2 through ``nrt.LLM(..., backend="cuda", tensor_parallel=2)`` gives TP=1's
greedy ids on the trained ``stdlib-tiny`` (peaked logits: summation order cannot flip a pick),
and its teacher-forced logits agree to fp32-summation rounding; then the serving engine over the
two ranks (``LLM.generate([...])``, the path of ``nexusrt serve --tensor-parallel 2``) gives
TP=1's greedy ids for concurrent prompts (that part not yet run).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

import nexusrt as nrt
from nexusrt.backends.cuda.collectives import RankComm
from nexusrt.backends.cuda.runner import CudaRunner
from nexusrt.backends.cuda.tp_batch import ProcessBatchRunner
from nexusrt.backends.cuda.tp_front import ProcessRunner, gpu_count
from nexusrt.engine.requests import make_loop
from nexusrt.models.loader import load_model
from nexusrt.parallel import nccl as nccl_mod
from nexusrt.parallel.procs import WorkerDied
from nexusrt.reference.sampling import SamplingParams
from nexusrt.serving import Sequence
from tp_worker_fakes import gone

pytestmark = pytest.mark.gpu

MODEL = "nexusrt:stdlib-tiny"
PROMPTS = ["def read_config(path):\n", "import re\n", "if __name__ == '__main__':\n"]
NEW = 32


def _uid_or_skip() -> bytes:
    try:
        return nccl_mod.unique_id()
    except nccl_mod.NcclError as e:
        pytest.skip(str(e))


def _greedy(runner, ids) -> list[int]:
    out: list[int] = []
    runner.generate_tokens(ids, NEW, SamplingParams(), lambda t: out.append(t) and False)
    return out


def _reference(runner, ids):
    """Teacher-forced logits, the logits after the prompt and after one decode step, greedy ids."""
    every = runner.forward_all(ids)
    runner.reset()
    runner.prefill(ids)
    after_prompt = runner.last_logits()
    runner.decode(int(np.argmax(after_prompt)))
    after_step = runner.last_logits()
    return every, after_prompt, after_step, _greedy(runner, ids)


@pytest.fixture
def model():
    m = load_model(MODEL)
    yield m
    m.weights.close()


def test_tp1_rank_in_process_equals_the_plain_runner(gpu_rt, model):
    group = nccl_mod.NcclGroup(0, 1, _uid_or_skip())
    ids = model.tokenizer.encode(PROMPTS[0])
    plain = CudaRunner(model, gpu_rt, max_context=256)
    try:
        want = _reference(plain, ids)
    finally:
        plain.close()
    rank = CudaRunner(model, gpu_rt, max_context=256, tp=RankComm(group, model.config.vocab_size))
    try:
        got = _reference(rank, ids)
    finally:
        rank.close()
        group.close()
    for w, g in zip(want[:3], got[:3]):
        assert np.array_equal(w, g)
    assert got[3] == want[3]


def test_tp1_worker_process_equals_the_plain_runner_and_its_death_is_named(gpu_rt, model):
    _uid_or_skip()
    ids = model.tokenizer.encode(PROMPTS[1])
    plain = CudaRunner(model, gpu_rt, max_context=256)
    try:
        want = _reference(plain, ids)
    finally:
        plain.close()
    ranks = ProcessRunner(model.origin, model.config, 1, 256)
    pids = ranks.pids
    try:
        assert ranks.ready[0]["device"] == 0
        got = _reference(ranks, ids)
        for w, g in zip(want[:3], got[:3]):
            assert np.array_equal(w, g)
        assert got[3] == want[3]
        os.kill(pids[0], signal.SIGKILL)
        with pytest.raises(WorkerDied, match=r"rank 0 \(pid \d+\) died .*killed by SIGKILL"):
            ranks.decode(1)
    finally:
        ranks.close()
    assert all(gone(p) for p in pids) and not multiprocessing.active_children()


def test_tp2_greedy_ids_equal_tp1(gpu_rt):
    present = gpu_count()
    if present < 2:
        pytest.skip(f"TP=2 needs 2 GPUs (NCCL refuses two ranks on one GPU); this machine shows {present}")
    _uid_or_skip()
    one = nrt.LLM(MODEL, backend="cuda", max_context=256, max_batch=4)
    two = nrt.LLM(MODEL, backend="cuda", max_context=256, max_batch=4, tensor_parallel=2)
    try:
        assert isinstance(two.runner, ProcessRunner) and [r["device"] for r in two.runner.ready] == [0, 1]
        for prompt in PROMPTS:
            want = one.generate(prompt, max_new_tokens=NEW, temperature=0).token_ids
            got = two.generate(prompt, max_new_tokens=NEW, temperature=0).token_ids
            assert got == want, f"{prompt!r}: first difference at {next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)}"
        ids = one.tokenizer.encode(PROMPTS[0])
        a, b = one.runner.forward_all(ids), two.runner.forward_all(ids)
        assert np.allclose(a, b, rtol=0, atol=2e-2 * float(np.abs(a).max())), float(np.abs(a - b).max())
        # The serving engine over the two ranks (nexusrt serve --tensor-parallel 2): concurrent prompts batched.
        want = [r.token_ids for r in one.generate(PROMPTS, max_new_tokens=NEW, temperature=0)]
        got = [r.token_ids for r in two.generate(PROMPTS, max_new_tokens=NEW, temperature=0)]
        assert isinstance(two.engine.runner, ProcessBatchRunner) and got == want
    finally:
        two.close()
        one.close()
    assert not multiprocessing.active_children()


def _serve(runner, prompts: list[list[int]]):
    """Every prompt submitted at once to the serving engine over ``runner``: each one's greedy ids and
    the engine's batch runner class."""
    loop = make_loop(runner, "cuda", 4, None, 16)
    try:
        seqs = [loop.submit(Sequence(p, SamplingParams(), NEW, 256)) for p in prompts]
        t0 = time.monotonic()
        while any(s.finish_reason is None for s in seqs) and time.monotonic() - t0 < 120:
            time.sleep(0.01)
        assert all(s.finish_reason in ("length", "context") for s in seqs), [s.error for s in seqs]
        return [list(s.output_ids) for s in seqs], type(loop.engine.runner)
    finally:
        loop.stop()
        loop.engine.runner.close()


def test_tp1_serving_through_the_worker_equals_the_plain_batch_runner(gpu_rt, model):
    _uid_or_skip()
    prompts = [model.tokenizer.encode(p) for p in PROMPTS] + [model.tokenizer.encode(PROMPTS[0] + "    ")]
    plain = CudaRunner(model, gpu_rt, max_context=256)
    try:
        want, kind = _serve(plain, prompts)
    finally:
        plain.close()
    assert kind.__name__ == "CudaBatchRunner"
    ranks = ProcessRunner(model.origin, model.config, 1, 256)
    pids = ranks.pids
    try:
        got, kind = _serve(ranks, prompts)
        assert kind is ProcessBatchRunner
        assert got == want
    finally:
        ranks.close()
    assert all(gone(p) for p in pids) and not multiprocessing.active_children()
