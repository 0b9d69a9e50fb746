"""The stage scheduler under threads and hostile arguments, on the CPU backend: every stage runs
exactly once whichever threads submit and wait; an interrupted stage leaves nothing counted
half; bad stage arguments are refused when the stage is made, naming it; the names the
scheduler remembers stay bounded."""

from __future__ import annotations

import collections
import math
import sys
import threading
import time

import pytest

import nexusrt as nrt
from nexusrt.scheduler import state as sched_state


@pytest.fixture
def fast_switches():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave between almost every bytecode: races show up
    yield
    sys.setswitchinterval(old)


def _run_threads(n, target):
    errors = []

    def guarded(k):
        try:
            target(k)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_threads_submitting_and_waiting_run_every_stage_exactly_once(cpu_rt, fast_switches):
    runs = collections.Counter()
    streams = ("compute", "h2d", "d2h")

    def worker(k):
        for i in range(150):
            name = f"s{k}_{i}"
            nrt.scheduler.submit(nrt.scheduler.stage(name, kernel=runs.update, args=([name],),
                                                     stream=streams[i % 3]))
            if i % 10 == 0:
                nrt.scheduler.wait_barrier()

    _run_threads(6, worker)
    nrt.scheduler.wait_barrier()
    assert len(runs) == 900 and set(runs.values()) == {1}
    assert nrt.scheduler.current().pending() == 0


def test_stream_order_holds_when_another_thread_runs_the_stage_ahead(cpu_rt):
    started, order = threading.Event(), []

    def slow():
        started.set()
        time.sleep(0.3)
        order.append("first")

    nrt.scheduler.submit([nrt.scheduler.stage("first", kernel=slow),
                          nrt.scheduler.stage("second", kernel=order.append, args=("second",))])
    t = threading.Thread(target=nrt.scheduler.wait_barrier, args=("first",))
    t.start()
    started.wait(5)
    nrt.scheduler.wait_barrier("second")  # must wait for "first", running in the other thread
    t.join(5)
    assert order == ["first", "second"]


def test_the_first_submissions_from_many_threads_share_one_scheduler(cpu_rt, fast_switches):
    ran = []
    assert cpu_rt.scheduler is None  # created lazily, by whichever thread comes first

    def worker(k):
        for i in range(100):
            nrt.scheduler.submit(nrt.scheduler.stage(f"s{k}_{i}", kernel=ran.append, args=(1,)))

    _run_threads(8, worker)
    nrt.scheduler.wait_barrier()
    assert len(ran) == 800


def test_an_interrupted_stage_drops_the_queue_and_leaves_nothing_pending(cpu_rt):
    def interrupted():
        raise KeyboardInterrupt

    nrt.scheduler.submit([nrt.scheduler.stage("kb", kernel=interrupted),
                          nrt.scheduler.stage("behind", kernel=print, args=("never",), depends_on="kb")])
    with pytest.raises(KeyboardInterrupt):
        nrt.scheduler.wait_barrier()
    assert nrt.scheduler.current().pending() == 0
    ran = []
    nrt.scheduler.submit(nrt.scheduler.stage("after", kernel=ran.append, args=(1,)))
    nrt.scheduler.wait_barrier("after", timeout_ms=5000)
    assert ran == [1]


@pytest.mark.parametrize("kw, error, match", [
    (dict(stream=None), ValueError, "unknown stream None"),
    (dict(stream=3), ValueError, "unknown stream 3"),
    (dict(sm_footprint_mb=math.inf), ValueError, "finite number"),
    (dict(sm_footprint_mb="1e3"), ValueError, "must be a number"),
    (dict(sm_footprint_mb=True), ValueError, "must be a number"),
    (dict(priority="high"), ValueError, "priority must be an integer"),
    (dict(priority=math.nan), ValueError, "priority must be an integer"),
    (dict(priority=1.5), ValueError, "priority must be an integer"),
    (dict(depends_on=5), TypeError, "depends_on must be a list or tuple"),
    (dict(depends_on=None), TypeError, "depends_on must be a list or tuple"),
    (dict(inputs=None), TypeError, "inputs must be a list or tuple"),
    (dict(outputs="x"), TypeError, "outputs must be a list or tuple"),
    (dict(kernel=print, args=5), TypeError, "args must be a list or tuple"),
])
def test_bad_stage_arguments_are_refused_when_the_stage_is_made(cpu_rt, kw, error, match):
    with pytest.raises(error, match=match) as e:
        nrt.scheduler.stage("s", **kw)
    assert "'s'" in str(e.value)


def test_bad_gates_and_barrier_timeouts_name_what_is_wrong(cpu_rt):
    from nexusrt.driver.doorbell import Doorbell

    bell = Doorbell("cpu", "b")
    try:
        for gate, match in (((bell,), "gate must be a Doorbell or"), ((bell, 1, 2), "gate must be a Doorbell or"),
                            ((bell, "x"), "gate value must be an integer"), ((bell, 1.5), "gate value"),
                            ((bell, True), "gate value"), ((bell, -1), "gate value")):
            with pytest.raises(ValueError, match=match):
                nrt.scheduler.stage("s", gate=gate)
        nrt.scheduler.stage("ok", gate=(bell, 3))
    finally:
        bell.close()
    for bad in ("5", True, [1]):
        with pytest.raises(TypeError, match="timeout_ms"):
            nrt.scheduler.wait_barrier(timeout_ms=bad)
    with pytest.raises(TypeError, match="stage name"):
        nrt.scheduler.wait_barrier(5)


def test_split_refuses_what_it_could_not_hold(cpu_rt):
    s = nrt.scheduler.stage("p", token_budget=1)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="1099511627776 submissions"):
        s.split(2 ** 40)
    assert time.perf_counter() - t0 < 1
    with pytest.raises(TypeError, match="integer token count"):
        s.split(True)
    assert nrt.scheduler.stage("q", token_budget=4).split(10) == [(0, 4), (4, 4), (8, 2)]


def test_the_names_it_remembers_stay_bounded(cpu_rt, monkeypatch):
    monkeypatch.setattr(sched_state, "REMEMBERED_NAMES", 64)
    for i in range(300):
        nrt.scheduler.submit(nrt.scheduler.stage(f"step{i}"))
        nrt.scheduler.wait_barrier()
    last = nrt.scheduler.current().last
    assert len(last) <= 64 and "step299" in last
    with pytest.raises(ValueError, match="forgets finished stages"):
        nrt.scheduler.wait_barrier("step0")
    nrt.scheduler.submit(nrt.scheduler.stage("late", depends_on="step299"))  # a recent name still counts
    nrt.scheduler.wait_barrier()
