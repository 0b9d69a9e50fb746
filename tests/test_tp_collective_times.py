"""A decode step's collectives timed alone on CPU ranks (``nexusrt-bench --tensor-parallel``'s
all-reduce line): in process (every rank's sums in one clock) and through worker processes
(the ``collective_times`` message, each rank its own clock), positive times for the number of
collectives a step runs; bad counts refused before any rank runs one."""

from __future__ import annotations

import multiprocessing

import pytest

from nexusrt.backends.cpu.sharded import ShardedDecoder, time_steps
from nexusrt.backends.cpu.tp_front import ProcessDecoder
from nexusrt.models.loader import load_model

from tp_worker_fakes import gone


@pytest.fixture(scope="module")
def tiny():
    model = load_model("synthetic:tiny")  # 4 heads, 2 KV heads, 2 layers: TP=2 divides it
    yield model
    model.weights.close()


def _check(entry: dict, layers: int, repeats: int, gathers: int) -> None:
    assert entry["all_reduces"] == 2 * layers and entry["all_gathers"] == gathers
    assert len(entry["step_s"]) == repeats and all(t > 0 for t in entry["step_s"])
    assert entry["clock"].startswith("perf_counter")


def test_in_process_ranks_time_their_sums_and_gather_in_one_clock(tiny):
    decoder = ShardedDecoder(tiny.weights, 2)
    calls = {"all_reduce": 0, "all_gather": 0}
    for name in calls:
        real = getattr(decoder.group, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        setattr(decoder.group, name, counted)
    (entry,) = decoder.collective_times(5)
    layers = tiny.config.num_hidden_layers
    _check(entry, layers, 5, gathers=1)
    assert entry["rank"] is None
    assert calls == {"all_reduce": 6 * 2 * layers, "all_gather": 6}  # an untimed step, then 5


def test_worker_ranks_answer_the_message_each_with_its_own_times(tiny):
    workers = ProcessDecoder(tiny.origin, tiny.config, 2)
    pids = workers.pids
    try:
        times = workers.collective_times(4)
        with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
            workers.collective_times(0)
        assert len(workers.collective_times(1)) == 2  # still in step after the refusal
    finally:
        workers.close()
    assert [t["rank"] for t in times] == [0, 1]
    for t in times:  # the front joins the logits slices: no gather between the ranks
        _check(t, tiny.config.num_hidden_layers, 4, gathers=0)
    assert all(gone(p) for p in pids) and not multiprocessing.active_children()


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_repeats_are_refused_before_the_first_step(bad):
    ran = []
    with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
        time_steps(lambda: ran.append(1), bad)
    assert ran == []
