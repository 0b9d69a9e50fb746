"""Tensor parallelism through worker processes (CPU ranks): the same logits and ids as the
in-process ShardedDecoder bit for bit, through both CPU runners, ``nrt.LLM`` and its serving
engine; a killed worker named by rank with nothing left behind; bad degrees refused before
any process starts."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

import numpy as np
import pytest

import nexusrt as nrt
from nexusrt.backends.base import Rows, iter_tokens
from nexusrt.backends.cpu.batch import CpuBatchRunner
from nexusrt.backends.cpu.model import CpuRunner
from nexusrt.backends.cpu.sharded import ShardedDecoder
from nexusrt.backends.cpu.tp_front import ProcessDecoder
from nexusrt.errors import ModelError
from nexusrt.models.loader import WeightsOrigin, load_model
from nexusrt.parallel.procs import WorkerDied
from nexusrt.reference.sampling import SamplingParams

from conftest import engine_is_empty
from helpers_hf import build_checkpoint
from test_tp_cpu import FAMILIES, IDS
from tp_worker_fakes import gone

PROMPTS = ["The quick brown fox", "Once upon a time, a small model", "Weights are read from"]


def assert_released(decoder: ProcessDecoder, pids: list[int]) -> None:
    assert all(gone(p) for p in pids), [p for p in pids if not gone(p)]
    assert not os.path.exists(f"/dev/shm/{decoder.segment_name}")
    assert not multiprocessing.active_children()


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp(request.param), heads=8, kv_heads=4, seed=11,
                            **FAMILIES[request.param])
    model = load_model(str(path))
    yield str(path), model.weights
    model.weights.close()


@pytest.mark.parametrize("n", [2, 4])
def test_workers_give_the_in_process_logits_and_ids_bit_for_bit(checkpoint, n):
    path, weights = checkpoint
    inproc = ShardedDecoder(weights, n)
    expect_logits = CpuRunner(weights, 64, decoder=inproc).forward_all(IDS)
    expect_ids = list(iter_tokens(CpuRunner(weights, 64, decoder=inproc), IDS, 8, SamplingParams()))
    workers = ProcessDecoder(WeightsOrigin(path), weights.config, n)
    pids = workers.pids
    try:
        assert len(set(pids)) == n and os.getpid() not in pids
        runner = CpuRunner(weights, 64, decoder=workers)
        assert np.array_equal(runner.forward_all(IDS), expect_logits)
        assert list(iter_tokens(runner, IDS, 8, SamplingParams())) == expect_ids
    finally:
        workers.close()
    assert_released(workers, pids)


def test_batch_runner_over_workers_matches_in_process_with_compaction(checkpoint):
    """Two sequences (one chunked) through CpuBatchRunner, then a KV compaction, then a decode:
    every logit equals the in-process TP=2 batch runner's."""
    path, weights = checkpoint

    def steps(decoder):
        batch = CpuBatchRunner(decoder, num_blocks=8, max_context=64)
        out = batch.run([Rows(IDS[:9], 0, [0], logits=True), Rows(IDS[5:10], 0, [2, 3])])
        out += batch.run([Rows(IDS[10:], 5, [2, 3], logits=True)])
        batch.compact([2, 3], [0, 3, 4, 7, 8, 9, 10, 11, 12, 13, 14])  # drop 4 slots
        position = None if weights.config.sliding_window else 15  # mistral refuses pruned positions
        out += batch.run([Rows([42], 11, [2, 3], logits=True, position=position)])
        return batch, out

    workers = ProcessDecoder(WeightsOrigin(path), weights.config, 2)
    try:
        batch, got = steps(workers)
        assert batch.prune_policies == {"sink-window"}  # h2o's scores are not summed across processes
        _, expect = steps(ShardedDecoder(weights, 2))
    finally:
        workers.close()
    assert got[1] is None and expect[1] is None
    for a, b in zip(got, expect):
        assert (a is None and b is None) or np.array_equal(a, b)


@pytest.fixture
def pair(cpu_rt):
    """stdlib-tiny at TP=2 in process and TP=2 through worker processes."""
    llms = [nrt.LLM("nexusrt:stdlib-tiny", backend="cpu", max_context=256, max_batch=4, tensor_parallel=2,
                    tp_processes=p) for p in (False, True)]
    yield llms
    for llm in llms:
        llm.close()


def test_llm_through_workers_generates_the_in_process_ids_alone_and_batched(pair):
    inproc, procs = pair
    decoder = procs.runner.decoder
    assert isinstance(decoder, ProcessDecoder) and decoder.size == 2
    expect = [inproc.generate(p, max_new_tokens=24, temperature=0).token_ids for p in PROMPTS]
    assert [procs.generate(p, max_new_tokens=24, temperature=0).token_ids for p in PROMPTS] == expect
    batched = procs.generate(PROMPTS, max_new_tokens=24, temperature=0)  # the serving engine, one step for all
    assert [r.token_ids for r in batched] == expect
    threaded: dict[int, list] = {}  # one call holds the one-sequence runner, the others go through the engine

    def call(i):
        threaded[i] = procs.generate(PROMPTS[i], max_new_tokens=24, temperature=0).token_ids

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [threaded.get(i) for i in range(len(PROMPTS))] == expect
    sampled = [llm.generate(PROMPTS[0], max_new_tokens=16, temperature=0.8, seed=3).token_ids for llm in pair]
    assert sampled[0] == sampled[1]
    assert engine_is_empty(procs)
    pids = decoder.pids
    procs.close()
    assert_released(decoder, pids)
    assert nrt.memory.audit() == [] and nrt.memory.stats()["live_allocations"] == 0


@pytest.mark.parametrize("path", ["one-sequence", "engine"])
def test_a_killed_worker_is_named_and_nothing_is_left_behind(cpu_rt, path):
    llm = nrt.LLM("synthetic:tiny", backend="cpu", max_context=512, tensor_parallel=2, tp_processes=True)
    decoder = llm.runner.decoder
    pids = decoder.pids
    try:
        if path == "one-sequence":  # kill rank 1 once the stream is under way
            stream = llm.stream("x" * 8, max_new_tokens=400, temperature=0)
            next(stream)
            os.kill(pids[1], signal.SIGKILL)
            with pytest.raises(WorkerDied, match=r"rank 1 \(pid \d+\) died during the step: killed by SIGKILL"):
                for _ in stream:
                    pass
        else:  # several requests through the engine; kill while they run
            timer = threading.Timer(0.3, os.kill, (pids[1], signal.SIGKILL))
            timer.start()
            # a slow start may put the kill before the engine's first step, while it makes its pools
            with pytest.raises(WorkerDied, match=r"rank 1 \(pid \d+\) died during the (step|pool allocation): "
                                                 r"killed by SIGKILL"):
                llm.generate(["a", "bb", "ccc"], max_new_tokens=400, temperature=0)
            timer.join()
        assert all(gone(p) for p in pids)  # rank 0 too, before close()
        assert "rank 1" in str(llm.failure)
        with pytest.raises(WorkerDied, match="rank 1"):  # every later call says why, not just "closed"
            llm.generate("again", max_new_tokens=2)
        assert not os.path.exists(f"/dev/shm/{decoder.segment_name}")
    finally:
        llm.close()
    assert_released(decoder, pids)


def test_indivisible_degree_fails_before_any_process_starts(cpu_rt):
    with pytest.raises(ModelError, match=r"num_key_value_heads \(2\) is not divisible by tensor_parallel=4"):
        nrt.LLM("nexusrt:stdlib-tiny", backend="cpu", tensor_parallel=4, tp_processes=True)
    assert not multiprocessing.active_children()


def test_bad_switch_is_refused_and_cuda_takes_it(cpu_rt):
    with pytest.raises(ValueError, match="tp_processes must be True or False"):
        nrt.LLM("synthetic:tiny", backend="cpu", tensor_parallel=2, tp_processes=1)
    from nexusrt.engine.runners import check_tensor_parallel

    check_tensor_parallel(2, "cuda", tp_processes=True)  # CUDA ranks are processes anyway
    assert not multiprocessing.active_children()


def test_serve_exits_naming_the_dead_rank():
    """``nexusrt serve --tp-processes``: a worker killed mid-request fails the request with the
    rank's name, and the server exits with status 1 leaving no worker behind."""
    from server_helpers import ServerProcess

    server = ServerProcess("--model", "synthetic:tiny", "--tensor-parallel", "2", "--tp-processes")
    try:
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_worker_of(int(p), server.proc.pid)]
        assert len(workers) == 2
        timer = threading.Timer(0.3, os.kill, (workers[1], signal.SIGKILL))
        timer.start()
        reply = server.http.post("/v1/completions", json={"model": "synthetic:tiny", "prompt": "x", "max_tokens": 400})
        timer.join()
        assert reply.status_code == 500 and "died during the step: killed by SIGKILL" in reply.text
        server.proc.wait(15)
    finally:
        status, out = server.stop()
    assert status == 1 and "tensor-parallel worker rank" in out and "shutting down" in out
    assert all(gone(p) for p in workers)


def _is_worker_of(pid: int, parent: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return False
    return int(stat[1]) == parent and b"spawn_main" in cmdline


def test_a_front_dropped_without_close_stops_its_workers_and_unlinks_its_segment(checkpoint):
    import gc

    path, weights = checkpoint
    workers = ProcessDecoder(WeightsOrigin(path), weights.config, 2)
    pids, name = workers.pids, workers.segment_name
    assert os.path.exists(f"/dev/shm/{name}")
    del workers
    gc.collect()
    assert all(gone(p) for p in pids) and not os.path.exists(f"/dev/shm/{name}")


def test_a_script_left_open_at_exit_cleans_up_without_a_leak_warning(tmp_path, checkpoint):
    import subprocess
    import sys

    path, _ = checkpoint
    script = tmp_path / "open_at_exit.py"
    script.write_text("import nexusrt as nrt\n"
                      "if __name__ == '__main__':\n"
                      f"    llm = nrt.LLM({path!r}, backend='cpu', tensor_parallel=2, tp_processes=True)\n"
                      "    print(llm.runner.decoder.segment_name, flush=True)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr
    assert "leaked shared_memory" not in out.stderr, out.stderr
    assert not os.path.exists(f"/dev/shm/{out.stdout.split()[-1]}")


def test_ctrl_c_during_a_generation_on_workers_stays_ctrl_c_and_keeps_the_model(cpu_rt, ctrl_c):
    import _thread

    with nrt.LLM("synthetic:tiny", backend="cpu", max_context=8192, tensor_parallel=2,
                 tp_processes=True) as llm:
        expect = llm.generate("x" * 8, max_new_tokens=6, temperature=0).token_ids
        timer = threading.Timer(0.5, _thread.interrupt_main)
        timer.start()
        with pytest.raises(KeyboardInterrupt):  # not WorkerDied: a CLI exits 130 on it
            llm.generate("x" * 8, max_new_tokens=8000, temperature=0)  # seconds of steps: interrupted
        timer.join()
        assert llm.failure is None
        assert llm.generate("x" * 8, max_new_tokens=6, temperature=0).token_ids == expect
