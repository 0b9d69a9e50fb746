"""The serving engine's scheduling (decodes first, chunked prefill under a budget, the cap on
running sequences), preemption by recompute, and the block audit after finish, cancel, errors."""

from __future__ import annotations

import pytest

from nexusrt.kvcache.blocks import BLOCK_SIZE
from nexusrt.reference.sampling import SamplingParams
from nexusrt.serving import Engine, SchedulerConfig, Sequence, State
from serving_fakes import FakeRunner

GREEDY = SamplingParams()


def make(num_blocks=64, max_running=8, budget=64, caching=True, **kw):
    return Engine(FakeRunner(num_blocks, **kw), SchedulerConfig(max_running, budget), prefix_caching=caching)


def seq(n, max_new=4, first=1, **kw):
    return Sequence(list(range(first, first + n)), GREEDY, max_new, 4096, **kw)


def clean(engine):
    engine.blocks.audit()
    return engine.blocks.num_used == 0 and not engine.has_work


def alone(n, max_new, first=1):
    e = make()
    s = seq(n, max_new, first)
    e.add(s)
    e.run_until_done()
    return s.output_ids


def test_decodes_go_first_then_prefill_chunks_fill_the_budget():
    e = make(budget=40)
    olds = [seq(5, max_new=10, first=10 * i + 1) for i in range(3)]
    for s in olds:
        e.add(s)
    e.step()  # three 5-id prompts in one step, each samples
    assert e.runner.steps[-1] == [(0, 5, True)] * 3
    late = seq(100, max_new=2, first=500)
    e.add(late)
    e.step()
    assert e.runner.steps[-1] == [(5, 1, True)] * 3 + [(0, 37, False)]  # decodes, then 40 - 3
    e.step()
    assert e.runner.steps[-1] == [(6, 1, True)] * 3 + [(37, 37, False)]
    e.run_until_done()
    assert clean(e) and [len(s.output_ids) for s in olds + [late]] == [10, 10, 10, 2]


def test_a_chunked_prompt_gives_the_ids_of_an_unchunked_one():
    e = make(budget=32, max_running=4)
    s = seq(100, max_new=5)
    e.add(s)
    e.run_until_done()
    assert [st[0][:2] for st in e.runner.steps[:4]] == [(0, 32), (32, 32), (64, 32), (96, 4)]
    assert s.output_ids == alone(100, 5) and s.finish_reason == "length" and clean(e)


def test_the_running_cap_holds():
    e = make(max_running=2)
    seqs = [seq(3, max_new=3, first=10 * i + 1) for i in range(5)]
    for s in seqs:
        e.add(s)
    peak = 0
    while e.has_work:
        e.step()
        peak = max(peak, len(e.runner.steps[-1]))
        assert len(e.scheduler.running) <= 2
    assert peak == 2 and clean(e)
    assert [s.output_ids for s in seqs] == [alone(3, 3, 10 * i + 1) for i in range(5)]


def test_prefix_hits_skip_computing_the_shared_blocks():
    e = make()
    a = seq(50, max_new=2)
    e.add(a)
    e.run_until_done()
    b = Sequence(list(range(1, 51)) + [7, 8], GREEDY, 3, 4096)
    e.add(b)
    e.step()
    assert e.runner.steps[-1] == [(48, 4, True)]  # 3 cached blocks (48 ids) were not recomputed
    assert b.num_cached == 48 and e.blocks.hits == 3
    e.run_until_done()
    ref = make(caching=False)
    b2 = Sequence(list(range(1, 51)) + [7, 8], GREEDY, 3, 4096)
    ref.add(b2)
    ref.run_until_done()
    assert b.output_ids == b2.output_ids and clean(e)


def test_preemption_recomputes_and_gives_the_same_ids():
    # 10 blocks; four sequences that each grow from 1 block to 3: they cannot all keep running.
    e = make(num_blocks=10, max_running=4, budget=64, caching=False)
    seqs = [seq(14, max_new=30, first=100 * i + 1) for i in range(4)]
    for s in seqs:
        e.add(s)
    e.run_until_done()
    assert e.scheduler.preemptions > 0 and any(s.preemptions for s in seqs)
    assert seqs[0].preemptions == 0  # the oldest is never the victim
    assert [s.output_ids for s in seqs] == [alone(14, 30, 100 * i + 1) for i in range(4)]
    assert clean(e) and e.blocks.pool.num_free == 10


def test_cancel_frees_the_blocks_of_running_and_waiting_sequences():
    ended = []
    e = make(max_running=1)
    a = seq(40, max_new=50, on_finish=ended.append)
    b = seq(40, max_new=50, first=300, on_finish=ended.append)
    e.add(a)
    e.add(b)
    e.step()
    e.step()
    assert a.state is State.RUNNING and b.state is State.WAITING and e.blocks.num_used == 3
    e.cancel(a)
    e.cancel(b)
    e.cancel(a)  # twice is harmless
    assert ended == [a, b] and a.finish_reason == "cancelled" and a.state is State.CANCELLED
    assert clean(e) and e.metrics.requests["cancelled"] == 2


def test_a_runner_error_ends_that_steps_sequences_and_the_engine_goes_on():
    e = make(fail_on_step=2)
    a, b = seq(10, max_new=5), seq(10, max_new=5, first=50)
    e.add(a)
    e.add(b)
    e.step()
    e.step()  # fails
    assert a.finish_reason == b.finish_reason == "error" and isinstance(a.error, RuntimeError)
    assert clean(e)
    c = seq(10, max_new=3)
    e.add(c)
    e.run_until_done()
    assert c.finish_reason == "length" and clean(e)


def test_a_fatal_runner_error_stops_the_loop_and_fails_every_sequence():
    """A FatalError (a dead tensor-parallel worker) is no one-step error: Engine.step re-raises
    it, the loop stops with it as its error, every sequence ends with it, no request is taken."""
    from nexusrt.errors import FatalError
    from nexusrt.serving import EngineLoop, EngineStopped

    e = make(fail_on_step=1, fail_with=FatalError)
    a = seq(10, max_new=5)
    e.add(a)
    with pytest.raises(FatalError):
        e.step()
    engine = make(fail_on_step=1, fail_with=FatalError)
    b, c = seq(10, max_new=5), seq(10, max_new=5, first=50)
    engine.add(b)  # both in the engine before its thread starts: no submit races the failure
    engine.add(c)
    loop = EngineLoop(engine)
    loop._thread.join(10)
    assert not loop._thread.is_alive() and isinstance(loop.error, FatalError)
    assert b.finish_reason == c.finish_reason == "error" and b.error is c.error is loop.error
    with pytest.raises(EngineStopped, match="injected runner failure"):
        loop.submit(seq(3))


def test_a_failing_callback_ends_only_its_sequence():
    def boom(s, t):
        raise KeyError("client gone")

    e = make()
    bad, good = seq(10, max_new=5, on_token=boom), seq(10, max_new=5, first=50)
    e.add(bad)
    e.add(good)
    e.run_until_done()
    assert bad.finish_reason == "error" and isinstance(bad.error, KeyError)
    assert good.finish_reason == "length" and len(good.output_ids) == 5 and clean(e)


def test_stop_rules_and_limits():
    e = make()
    stop_at_3 = seq(5, max_new=10, on_token=lambda s, t: len(s.output_ids) == 3)
    ctx = Sequence(list(range(1, 31)), GREEDY, 50, 32)
    for s in (stop_at_3, ctx):
        e.add(s)
    e.run_until_done()
    assert (stop_at_3.finish_reason, len(stop_at_3.output_ids)) == ("stop", 3)
    assert (ctx.finish_reason, len(ctx.output_ids)) == ("context", 3)  # 30 + 3 ids > 32: the last is never fed
    assert clean(e)


def test_requests_that_can_never_fit_are_refused():
    e = make(num_blocks=4)
    with pytest.raises(ValueError, match="KV blocks; the pool has 4"):
        e.add(seq(60, max_new=10))
    e.add(seq(60, max_new=4))  # 64 ids: exactly the pool
    e.run_until_done()
    assert clean(e)
    with pytest.raises(ValueError, match="max_running"):
        SchedulerConfig(max_running=8, token_budget=4)
    assert BLOCK_SIZE == 16


def test_a_shared_prompt_arriving_together_is_computed_once():
    system = list(range(200, 264))  # 64 ids: 4 full blocks

    def run(caching):
        e = make(caching=caching, budget=512)
        seqs = [Sequence(system + [10 + i] * (3 + i), GREEDY, 4, 4096) for i in range(6)]
        for s in seqs:
            e.add(s)
        e.run_until_done()
        assert clean(e) and not e.blocks.pending
        return e, [s.output_ids for s in seqs]

    cached, ids = run(True)
    cold, ref = run(False)
    assert ids == ref
    assert cached.blocks.hits == 5 * 4  # the five later requests share the first one's four blocks
    own = sum(3 + i for i in range(6))
    assert cached.metrics.computed_tokens == 64 + own + 6 * 3  # the system prompt once, then decodes
    assert cold.metrics.computed_tokens == 6 * 64 + own + 6 * 3


def test_a_cancelled_owner_unblocks_those_waiting_for_its_prefix():
    e = make(budget=16)
    system = list(range(300, 348))  # 3 blocks: the owner needs three steps at a budget of 16
    owner = Sequence(system + [1], GREEDY, 3, 4096)
    follower = Sequence(system + [2], GREEDY, 3, 4096)
    e.add(owner)
    e.add(follower)
    e.step()
    assert follower.state is State.WAITING and e.blocks.blocked(follower)
    e.cancel(owner)
    assert not e.blocks.pending and not e.blocks.blocked(follower)
    e.run_until_done()
    assert follower.finish_reason == "length" and follower.num_cached == 16  # the one block owner finished
    assert clean(e)


def test_fixed_chunks_cut_a_prompt_at_the_same_places_whatever_runs_beside_it():
    """Deterministic mode: chunks end at multiples of fixed_chunks (or the prompt's end), and a
    chunk that does not fit the budget left this step waits whole for the next one."""
    def cuts(others: int):
        e = Engine(FakeRunner(128), SchedulerConfig(max_running=8, token_budget=40, fixed_chunks=24))
        busy = [seq(3, max_new=30, first=300 + 10 * i) for i in range(others)]
        for s in busy:
            e.add(s)
        e.step()
        target = seq(70, max_new=3, first=1)
        e.add(target)
        e.run_until_done()
        spans = [(start, n) for step in e.runner.steps for start, n, _ in step if n > 1 or start < 70]
        return [s for s in spans if s[1] > 3 or s[0] >= 24], target.output_ids, clean(e)

    alone_spans, alone_ids, ok = cuts(0)
    busy_spans, busy_ids, ok2 = cuts(7)
    assert ok and ok2 and alone_ids == busy_ids
    assert [n for s, n in alone_spans if n > 3][:3] == [24, 24, 22]
    assert [n for s, n in busy_spans if n > 3][:3] == [24, 24, 22]
    with pytest.raises(ValueError, match="fixed_chunks"):
        SchedulerConfig(max_running=8, token_budget=30, fixed_chunks=24)


def test_sequence_ids_slices_prompt_and_output_without_building_both():
    s = seq(5, first=10)
    s.output_ids.extend([90, 91, 92])
    full = s.all_ids
    for start in range(8):
        for count in range(1, 9 - start):
            assert s.ids(start, count) == full[start:start + count]


def test_a_pruning_request_is_refused_by_a_runner_that_cannot_prune():
    from nexusrt.serving import KvPolicy

    e = make()
    with pytest.raises(ValueError, match="kv_policy='sink-window'.*kv_policy='full'"):
        e.add(seq(20, kv=KvPolicy("sink-window", budget=12, sinks=4)))
    e.add(seq(20))  # a full-cache request still runs
    e.run_until_done()
    assert clean(e)
