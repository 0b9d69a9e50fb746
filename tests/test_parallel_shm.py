"""The shared-memory communicator (ShmGroup) against LocalGroup, and the SPMD RankDecoder over it,
with ranks as threads of this process; the worker process group (WorkerGroup) over a light fake
target. The model's worker processes are tests/test_tp_workers.py's."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest

from nexusrt.backends.base import Rows
from nexusrt.backends.cpu.model import CpuRunner
from nexusrt.backends.cpu.sharded import RankDecoder, ShardedDecoder, join_logits
from nexusrt.models.synthetic import SyntheticWeights
from nexusrt.parallel import LocalGroup, ShardPlan, WorkerDied, WorkerGroup, procs, shard
from nexusrt.parallel.shm import CollectiveTimeout, ShmGroup, create_segment

from tp_worker_fakes import fake_rank, gone


def spmd(size: int, body, slot_bytes: int = 1 << 12, timeout: float = 10.0) -> list:
    """Run ``body(comm)`` on ``size`` threads, one ShmGroup rank each; their results, rank order."""
    segment = create_segment(size, slot_bytes)
    results, errors = [None] * size, []

    def rank(r):
        comm = ShmGroup(segment.name, r, size, slot_bytes, timeout)
        try:
            results[r] = body(comm)
        except BaseException as exc:
            errors.append(exc)
        finally:
            comm.close()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        segment.close()
        segment.unlink()
    assert not os.path.exists(f"/dev/shm/{segment.name}")
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("size", [1, 2, 3])
def test_collectives_equal_local_group_bit_for_bit_across_chunks(size):
    rng = np.random.default_rng(0)
    # 2,500 floats through 1,024-float slots: three chunks, the last partial
    bufs = [rng.standard_normal((50, 50)).astype(np.float32) * 10 ** r for r in range(size)]
    local = LocalGroup(size)
    for reduced in spmd(size, lambda c: c.all_reduce(bufs[c.rank])):
        assert np.array_equal(reduced, local.all_reduce(bufs)) and not reduced.flags.writeable


def test_buffers_of_different_sizes_fail_on_every_rank():
    with pytest.raises(ValueError, match=r"all_reduce buffers differ in size across ranks: \{0: 4, 1: 6\}"):
        spmd(2, lambda c: c.all_reduce(np.zeros(4 + 2 * c.rank, np.float32)))


def test_only_fp32_travels():
    with pytest.raises(TypeError, match="collectives move fp32 arrays, got float64"):
        spmd(1, lambda c: c.all_reduce(np.zeros(3)))


def test_a_missing_rank_times_out_by_name_and_breaks_the_group():
    segment = create_segment(3, 64)
    try:
        comm = ShmGroup(segment.name, 0, 3, 64, timeout=0.2)
        t0 = time.monotonic()
        with pytest.raises(CollectiveTimeout, match=r"rank 0: all_reduce timed out after 0.2 s waiting for rank\(s\) \[1, 2\]"):
            comm.all_reduce(np.ones(4, np.float32))
        assert time.monotonic() - t0 < 2
        with pytest.raises(CollectiveTimeout, match="the group is broken"):
            comm.all_reduce(np.ones(4, np.float32))
        comm.close()
    finally:
        segment.close()
        segment.unlink()


def test_rank_decoders_over_shm_equal_the_lockstep_decoder():
    """The SPMD RankDecoder, two ranks calling their own collectives, gives the in-process
    ShardedDecoder's logits bit for bit (the same per-layer coroutine, the same sums)."""
    weights = SyntheticWeights.from_preset("tiny", seed=5)
    ids = np.array([5, 9, 200, 31, 7, 7, 400, 12], np.int32)
    expect = CpuRunner(weights, 32, decoder=ShardedDecoder(weights, 2)).forward_all(ids)
    plan = ShardPlan(weights.config, 2)

    def rank(comm):
        decoder = RankDecoder(shard(weights, plan, comm.rank), comm, weights.config)
        pools = decoder.new_pools(2)
        return decoder.forward_logits([Rows(ids, 0, [1, 0])], pools, np.arange(len(ids)))

    slices = spmd(2, rank, slot_bytes=1 << 16)
    assert [s.shape[1] for s in slices] == [weights.config.vocab_size // 2] * 2  # each rank its own slice
    assert np.array_equal(join_logits(slices), expect)


# -- WorkerGroup, over a light fake target (tests/tp_worker_fakes.py) ---------------------------

def test_worker_group_answers_in_rank_order_and_reraises_a_shared_error():
    group = WorkerGroup(fake_rank, 3, name="fake")
    pids = group.pids
    try:
        assert group.ready == [0, 1, 2]
        assert group.request(("echo", "x")) == [(0, "x"), (1, "x"), (2, "x")]
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):  # every rank alike
            group.request(("fail_all",))
        assert group.request(("echo", 1)) == [(0, 1), (1, 1), (2, 1)]  # still in step
    finally:
        group.close(("close",))
    assert all(gone(p) for p in pids)


def test_a_rank_failing_alone_stops_the_group_within_the_grace(monkeypatch):
    monkeypatch.setattr(procs, "STOP_GRACE", 0.5)
    group = WorkerGroup(fake_rank, 2, name="fake")
    pids = group.pids
    t0 = time.monotonic()
    with pytest.raises(WorkerDied, match=r"fake rank 1 failed during the request \(RuntimeError: out of step\)"):
        group.request(("fail_alone", 1))
    assert time.monotonic() - t0 < 5 and all(gone(p) for p in pids)  # rank 0 hung: it was stopped
    with pytest.raises(WorkerDied, match="fake rank 1 failed"):  # later calls say why
        group.request(("echo", 0))


def test_an_exiting_rank_is_named_with_its_exit_code():
    group = WorkerGroup(fake_rank, 2, name="fake")
    pids = group.pids
    with pytest.raises(WorkerDied, match=r"fake rank 0 \(pid \d+\) died during the request: exit code 3"):
        group.request(("exit", 0))
    assert all(gone(p) for p in pids)


def test_a_failed_boot_raises_and_leaves_no_process():
    with pytest.raises(ValueError, match="cannot load its shard"):
        WorkerGroup(fake_rank, 2, (True,), name="fake")
    assert not multiprocessing.active_children()



def test_an_interrupt_while_the_ranks_work_waits_for_their_answers_and_keeps_the_group(ctrl_c):
    import _thread

    group = WorkerGroup(fake_rank, 2, name="fake")
    try:
        threading.Timer(0.2, _thread.interrupt_main).start()
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C stays Ctrl-C (a CLI exits 130 on it)
            group.request(("slow", 1.0))
        assert group.failure is None
        assert group.request(("echo", "after")) == [(0, "after"), (1, "after")]  # in step: the answers were drained
    finally:
        group.close(("close",))


class _CtrlCAfter:
    """A pipe end that presses Ctrl-C (as the terminal would) right after one ``send_bytes`` or
    ``recv`` of it: the interrupt lands inside the request at an exact place, not on a timer."""

    def __init__(self, conn, on: str):
        self._conn, self._on = conn, on

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def _interrupted(self, value):
        import _thread

        _thread.interrupt_main()
        return value

    def send_bytes(self, payload):
        result = self._conn.send_bytes(payload)
        return self._interrupted(result) if self._on == "send" else result

    def recv(self):
        answer = self._conn.recv()
        return self._interrupted(answer) if self._on == "recv" else answer


@pytest.mark.parametrize("on", ["send", "recv"])
def test_a_ctrl_c_mid_message_waits_for_it_and_the_group_stays_in_step(monkeypatch, on, ctrl_c):
    # Rank 0 is the first written to and (answering at once) the first read: the Ctrl-C lands
    # with rank 1's message unsent, or with rank 0's answer read and rank 1's still to come.
    monkeypatch.setattr(procs, "DRAIN_S", 30.0)
    group = WorkerGroup(fake_rank, 2, name="fake")
    try:
        group._conns[0] = _CtrlCAfter(group._conns[0], on)
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            group.request(("echo", "cut"))
        assert time.monotonic() - t0 < 10  # the drain found every answer: no wait for DRAIN_S
        assert group.failure is None
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
        group._conns[0] = group._conns[0]._conn
        assert group.request(("echo", "after")) == [(0, "after"), (1, "after")]
    finally:
        group.close(("close",))


def test_a_programs_own_sigint_handler_stays_in_place_through_requests():
    seen = []
    mine = lambda signum, frame: seen.append(signum)  # noqa: E731
    previous = signal.signal(signal.SIGINT, mine)
    group = WorkerGroup(fake_rank, 2, name="fake")
    try:
        assert group.request(("echo", 1)) == [(0, 1), (1, 1)]
        assert signal.getsignal(signal.SIGINT) is mine
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert seen == [signal.SIGINT]
    finally:
        group.close(("close",))
        signal.signal(signal.SIGINT, previous)


def test_a_rank_that_stays_silent_after_the_others_answered_is_named(monkeypatch):
    monkeypatch.setattr(procs, "ANSWER_GRACE", 0.5)
    group = WorkerGroup(fake_rank, 2, name="fake")
    pids = group.pids
    t0 = time.monotonic()
    with pytest.raises(WorkerDied, match=r"fake rank 1 \(pid \d+\) did not answer the request within 0.5 s of rank 0"):
        group.request(("stall", 1))
    assert time.monotonic() - t0 < 10 and all(gone(p) for p in pids)


def test_threads_waiting_on_a_group_whose_rank_died_all_name_that_rank():
    group = WorkerGroup(fake_rank, 2, name="fake")
    errors = []

    def ask(message):
        try:
            group.request(message)
        except WorkerDied as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=ask, args=(("slow", 2.0),))] + \
        [threading.Thread(target=ask, args=(("echo", i),)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    os.kill(group.pids[1], signal.SIGKILL)
    for t in threads:
        t.join(30)
    assert len(errors) == 4 and all("rank 1" in e and "SIGKILL" in e for e in errors), errors
    assert "rank 1" in str(group.failure) and "SIGKILL" in str(group.failure)


def test_a_rank_dying_at_the_start_points_at_the_main_guard():
    with pytest.raises(WorkerDied, match=r"died during the start: exit code 1.*__name__ == \"__main__\""):
        WorkerGroup(fake_rank, 2, (False, True), name="fake")
    assert not multiprocessing.active_children()
