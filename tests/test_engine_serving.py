"""``nrt.LLM`` through the serving engine on the CPU: lists and concurrent threads are batched
and each request gets the ids of the one-sequence path; closing cancels; blocks never leak."""

from __future__ import annotations

import threading

import pytest

import nexusrt as nrt
from nexusrt.engine.requests import Cancelled
from nexusrt.errors import NexusRTError
from nexusrt.serving import QueueFull

PROMPTS = [f"request {i}: " + "xyz" * (i % 7) for i in range(12)]
KW = dict(max_new_tokens=8, temperature=0.8, top_k=30, seed=11)


@pytest.fixture
def llm(cpu_rt):
    llm = nrt.LLM("synthetic:tiny", backend="cpu", max_context=256, max_batch=8)
    yield llm
    llm.close()


def no_leak(llm):
    blocks = llm.engine.engine.blocks
    blocks.audit()
    return blocks.num_used == 0


def test_a_list_runs_batched_and_equals_one_by_one(llm):
    alone = [llm.generate(p, **KW) for p in PROMPTS]  # the one-sequence path
    assert llm._loop is None  # nothing started the engine yet
    batched = llm.generate(PROMPTS, **KW)
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.text for r in batched] == [r.text for r in alone]
    m = llm.engine.engine.metrics
    assert m.requests["length"] == len(PROMPTS) and m.steps < len(PROMPTS) * KW["max_new_tokens"]
    assert no_leak(llm)


def test_stop_strings_and_chat_through_the_engine(llm):
    ref = llm.generate("stop here", max_new_tokens=16, temperature=0)
    stop = ref.text[3:5]
    one = llm.generate("stop here", max_new_tokens=16, temperature=0, stop=stop)
    [via] = llm.generate(["stop here"], max_new_tokens=16, temperature=0, stop=stop)
    assert (via.text, via.token_ids, via.finish_reason) == (one.text, one.token_ids, one.finish_reason)
    assert via.finish_reason == "stop" and stop not in via.text
    [c] = llm.generate(["hi"], chat=True, system="be brief", max_new_tokens=4, temperature=0)
    assert c.token_ids == llm.generate("hi", chat=True, system="be brief", max_new_tokens=4, temperature=0).token_ids


def test_threads_that_find_the_runner_busy_share_the_engine(llm):
    serial = {p: llm.generate(p, **KW).token_ids for p in PROMPTS}
    got, errors = {}, []
    gate = threading.Barrier(6)

    def work(ps):
        try:
            gate.wait(timeout=30)
            for i, p in enumerate(ps):
                if i % 2:  # streams and generate calls mix
                    list(llm.stream(p, **KW))
                    got[p] = llm.last_result.token_ids
                else:
                    got[p] = llm.generate(p, **KW).token_ids
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(PROMPTS[i::6],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and got == serial
    assert llm._loop is not None and sum(llm.engine.engine.metrics.requests.values()) > 0  # some went through it
    assert no_leak(llm)


def test_a_closed_stream_cancels_its_request_and_frees_its_blocks(llm):
    req = llm.submit("a long one", max_new_tokens=200, temperature=0)
    first = threading.Event()
    req2 = llm.submit("watched", max_new_tokens=200, temperature=0, emit=lambda piece: first.set())
    assert first.wait(30)
    req.cancel()
    req2.cancel()
    for r in (req, req2):
        with pytest.raises(Cancelled):
            r.result(timeout=30)
    assert no_leak(llm) and llm.engine.engine.metrics.requests["cancelled"] == 2


def test_bad_requests_leave_nothing_behind(llm):
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm.generate(["ok", "fine"], max_new_tokens=0)
    with pytest.raises(ValueError, match="context holds 256"):
        llm.generate(["ok", "x" * 400], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        llm.submit("x", top_p=1.5)
    assert no_leak(llm) and not llm.engine.engine.has_work


def test_a_full_queue_refuses(cpu_rt):
    llm = nrt.LLM("synthetic:tiny", backend="cpu", max_context=128, max_batch=1, max_waiting=2)
    try:
        reqs = []
        with pytest.raises(QueueFull, match="waiting"):
            for _ in range(20):
                reqs.append(llm.submit("fill the queue", max_new_tokens=100))
        for r in reqs:
            r.cancel()
        for r in reqs:
            with pytest.raises(Cancelled):
                r.result(timeout=30)
        assert no_leak(llm)
    finally:
        llm.close()


def test_a_list_longer_than_the_queue_goes_in_as_earlier_requests_end(cpu_rt):
    llm = nrt.LLM("synthetic:tiny", backend="cpu", max_context=128, max_batch=1, max_waiting=2)
    try:
        out = llm.generate([f"prompt {i}" for i in range(7)], max_new_tokens=3, temperature=0)
        assert [r.prompt_tokens for r in out] == [1 + len(f"prompt {i}") for i in range(7)]
        assert all(len(r.token_ids) == 3 for r in out) and no_leak(llm)
    finally:
        llm.close()


def test_a_prepared_request_takes_a_lower_length_before_it_is_submitted(cpu_rt):
    llm = nrt.LLM("synthetic:tiny", backend="cpu", max_context=128)
    try:
        req = llm.prepare("fit me", max_new_tokens=50, temperature=0).limit_new_tokens(3)
        assert len(req.submit().result(timeout=30).token_ids) == 3  # not tokenized again to get there
        for bad in (0, 51, True):
            with pytest.raises(ValueError, match="limit_new_tokens takes 1..50"):
                llm.prepare("x", max_new_tokens=50).limit_new_tokens(bad)
        with pytest.raises(NexusRTError, match="after the request was submitted"):
            req.limit_new_tokens(2)
        assert no_leak(llm)
    finally:
        llm.close()


def test_close_cancels_what_runs(cpu_rt):
    llm = nrt.LLM("synthetic:tiny", backend="cpu", max_context=128)
    req = llm.submit("still running", max_new_tokens=120)
    llm.close()
    with pytest.raises(Cancelled):
        req.result(timeout=30)
    with pytest.raises(NexusRTError, match="after close"):
        llm.generate(["x"])


@pytest.mark.parametrize("kw,match", [(dict(max_batch=0), "max_batch"), (dict(kv_memory=-5), "kv_memory"),
                                      (dict(max_waiting=True), "max_waiting"), (dict(kv_memory=100), "no KV block"),
                                      (dict(kv_memory=1 << 50), "more than this machine's available memory")])
def test_bad_serving_arguments_are_clear_errors(cpu_rt, kw, match):
    # Every one is refused as the LLM is made, the pool's size too (not at the first call that
    # starts the engine, where it hid the other errors of that call).
    with pytest.raises(ValueError, match=match):
        nrt.LLM("synthetic:tiny", backend="cpu", max_context=64, **kw)


@pytest.mark.parametrize("kw,argument", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(seed=-1), "seed"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(stop=[3]), "stop"),
    (dict(stop="\ud800"), "stop"), (dict(kv_policy="lru"), "kv_policy"), (dict(kv_budget=8), "kv_budget"),
    (dict(kv_policy="sink-window", kv_budget=4, kv_sinks=4), "kv_budget"),
    (dict(kv_policy="sink-window", kv_budget=16, kv_window=True), "kv_window"),
    (dict(kv_policy="sink-window", kv_budget=16, kv_protect="system"), "kv_protect"),
    (dict(prompt="\udfff"), "prompt"), (dict(prompt=[{"role": "user"}]), "prompt")])
def test_a_bad_argument_is_named_by_the_error(llm, kw, argument):
    """What a front end needs to point at the field: the error's ``argument``, not its message;
    the same through submit (the serving engine) and generate (either path)."""
    kw = {"prompt": "hello", **kw}
    for call in (llm.submit, llm.generate):
        with pytest.raises(nrt.errors.InvalidArgument) as e:
            call(**kw)
        assert e.value.argument == argument and str(e.value) and isinstance(e.value, ValueError)
    assert no_leak(llm)


def test_a_request_larger_than_the_pool_says_by_how_much(cpu_rt):
    with nrt.LLM("synthetic:tiny", backend="cpu", max_context=256, kv_memory=1 << 16) as llm:
        pool = llm.engine.engine.blocks.num_blocks * 16
        with pytest.raises(nrt.errors.RequestTooLarge) as e:
            llm.submit("hello", max_new_tokens=pool + 8)
        assert e.value.argument == "max_new_tokens" and e.value.pool_tokens == pool
        assert e.value.tokens > pool and f"the pool has {pool // 16}" in str(e.value)
        assert no_leak(llm)


def test_siblings_share_the_prompt_and_sample_with_their_own_seeds(llm):
    """Request.sibling: a server's n choices. Seed s+i gives what a request with that seed gives;
    greedy siblings all give the greedy ids; the shared prompt blocks are computed once."""
    prompt = "a prompt long enough to fill a few whole KV blocks " * 4
    alone = [llm.submit(prompt, **{**KW, "seed": 11 + i}).result() for i in range(3)]
    first = llm.prepare(prompt, **KW)
    sibs = [first] + [first.sibling(seed=11 + i) for i in (1, 2)]
    lookups, hits = llm.engine.engine.blocks.lookups, llm.engine.engine.blocks.hits
    got = [r.result() for r in [s.submit() for s in sibs]]
    assert [g.token_ids for g in got] == [a.token_ids for a in alone]
    assert [g.seed for g in got] == [11, 12, 13] and [g.text for g in got] == [a.text for a in alone]
    assert llm.engine.engine.blocks.hits - hits == llm.engine.engine.blocks.lookups - lookups > 0  # cached prompt
    greedy = llm.prepare(prompt, max_new_tokens=6, temperature=0)
    ids = {tuple(r.submit().result().token_ids) for r in [greedy, greedy.sibling(), greedy.sibling(seed=5)]}
    assert len(ids) == 1
    random = llm.prepare(prompt, **{**KW, "seed": None})
    assert len({random.seq.params.seed, random.sibling().seq.params.seed, random.sibling().seq.params.seed}) == 3
    with pytest.raises(nrt.errors.InvalidArgument, match="seed"):
        first.sibling(seed=-1)
    assert no_leak(llm)


def test_a_request_is_submitted_once_and_a_second_submit_leaves_the_engine_alone(llm):
    r = llm.prepare("hello", max_new_tokens=5, temperature=0)
    with pytest.raises(NexusRTError, match="never submitted"):
        r.result(1)
    r.submit()
    with pytest.raises(NexusRTError, match="submitted already"):
        r.submit()
    with pytest.raises(NexusRTError, match="submitted already"):
        llm.engine.submit(r.seq)  # the engine loop refuses it too
    first = r.result(30)
    assert len(first.token_ids) == 5
    with pytest.raises(NexusRTError, match="has ended"):
        r.submit()
    assert r.result().token_ids == first.token_ids and llm.failure is None
    before = dict(llm.engine.engine.metrics.requests)
    idle = llm.prepare("hello", max_new_tokens=5)
    idle.cancel()  # never reached the engine: it just ends
    with pytest.raises(Cancelled):
        idle.result(1)
    with pytest.raises(NexusRTError, match="has ended"):
        idle.submit()
    assert dict(llm.engine.engine.metrics.requests) == before
    assert llm.generate(["x", "y"], max_new_tokens=2)[1].token_ids and no_leak(llm)


def test_a_callback_raising_a_base_exception_ends_only_its_request(llm):
    class Stop(BaseException):
        pass

    def emit(piece):
        raise Stop("from the caller's emit")

    other = llm.submit("class A:", max_new_tokens=20, temperature=0)
    bad = llm.submit("def f():", max_new_tokens=20, emit=emit)
    with pytest.raises(Stop):
        bad.result(30)
    assert len(other.result(30).token_ids) == 20 and llm.failure is None
    assert llm.generate(["x"], max_new_tokens=2)[0].token_ids and no_leak(llm)


def test_numpy_scalars_are_taken_and_kv_window_without_h2o_is_refused(llm):
    import numpy as np

    r = llm.generate("hello", max_new_tokens=np.int64(3), temperature=np.float32(0.5), top_k=np.int32(5),
                     top_p=np.float32(0.9), seed=np.uint64(3))
    assert len(r.token_ids) == 3 and r.seed == 3 and type(r.seed) is int
    same = llm.generate("hello", max_new_tokens=3, temperature=0.5, top_k=5, top_p=float(np.float32(0.9)), seed=3)
    assert same.token_ids == r.token_ids
    assert llm.generate("hello", max_new_tokens=2, kv_policy="sink-window", kv_budget=np.int64(16)).token_ids
    with pytest.raises(nrt.errors.InvalidArgument, match="kv_window applies to kv_policy 'h2o'") as e:
        llm.generate("hello", max_new_tokens=2, kv_policy="sink-window", kv_budget=16, kv_window=2)
    assert e.value.argument == "kv_window"


def test_close_waits_for_a_step_that_outlasts_its_warning(cpu_rt, monkeypatch, caplog):
    import time

    from nexusrt.engine import llm as llm_mod

    monkeypatch.setattr(llm_mod, "CLOSE_WARN_S", 0.2)
    model = nrt.LLM("synthetic:tiny", backend="cpu", max_context=256)
    forward, calls = model.runner.decoder.forward, []

    def slow(batch, pools):
        calls.append(1)
        if len(calls) == 3:
            time.sleep(1.0)  # a step longer than close()'s warning
        return forward(batch, pools)

    model.runner.decoder.forward = slow
    r = model.submit("def f():", max_new_tokens=100, temperature=0)
    while len(calls) < 3:
        time.sleep(0.01)
    with caplog.at_level("WARNING", logger="nexusrt"):
        model.close()  # must not tear the pools down under the running step
    assert "waiting for it" in caplog.text
    with pytest.raises(Cancelled):
        r.result(10)


def test_a_stream_left_open_by_a_thread_that_exited_does_not_block_close_or_others(cpu_rt):
    model = nrt.LLM("synthetic:tiny", backend="cpu", max_context=256)
    kept = []

    def consumer():
        g = model.stream("def f():", max_new_tokens=50, temperature=0)
        next(g)  # holds the one-sequence runner from here
        kept.append(g)

    t = threading.Thread(target=consumer)
    t.start()
    t.join()
    out = []
    other = threading.Thread(target=lambda: out.append(model.generate("x", max_new_tokens=2)))
    other.start()
    other.join(30)
    assert out and out[0].token_ids  # not "called from the thread that holds an open stream"
    done = threading.Event()
    threading.Thread(target=lambda: (model.close(), done.set())).start()
    assert done.wait(20), "close() hung on the abandoned stream"
    assert model.runner is None


@pytest.mark.parametrize("kw", [dict(temperature=0, kv_policy="sink-window", kv_budget=24),
                                dict(temperature=0.8, seed=5, kv_policy="h2o", kv_budget=24)])
def test_a_pruned_request_returns_what_it_returns_alone_beside_a_long_prompt(cpu_rt, kw):
    """It is pruned after every step, so where its prompt is cut decides what it keeps: the cuts
    must not depend on the budget another request took (they did: the ids diverged)."""
    import argparse

    src = open(argparse.__file__).read()
    big, small = src[:1500], src[20500:21200]
    with nrt.LLM("nexusrt:stdlib-tiny", backend="cpu") as model:
        alone = model.generate(small, max_new_tokens=20, **kw).token_ids
        beside = model.generate([big, small], max_new_tokens=20, **kw)[1].token_ids
    assert beside == alone


def test_the_cpu_pool_by_default_holds_a_whole_context_where_256_mib_does_not():
    """Else a request the one-sequence path takes alone is refused when another thread is busy."""
    from types import SimpleNamespace

    from nexusrt.engine.requests import DEFAULT_KV_MEMORY, cpu_pool_bytes
    from nexusrt.kvcache.tiers import mem_available

    cfg = SimpleNamespace(num_hidden_layers=32, num_key_value_heads=8, head_dim=128)  # 4 MiB a block in fp32
    assert cpu_pool_bytes(cfg, 256) == DEFAULT_KV_MEMORY
    assert cpu_pool_bytes(cfg, 2048) == max(DEFAULT_KV_MEMORY, min(128 << 22, mem_available() // 2))
    assert cpu_pool_bytes(cfg, 131072) == max(DEFAULT_KV_MEMORY, min(8192 << 22, mem_available() // 2))


def test_a_request_behind_anothers_many_choices_gets_the_next_free_place(cpu_rt):
    """Admission is round-robin across requests (a request's siblings are one group): a lone request
    behind one with six choices runs beside the third choice, not after the sixth."""
    with nrt.LLM("synthetic:tiny", backend="cpu", max_context=256, max_batch=2) as model:
        first = model.prepare("many", max_new_tokens=30, temperature=0)
        many = [first] + [first.sibling() for _ in range(5)]
        for r in many:
            r.submit()
        lone = model.submit("lone", max_new_tokens=30, temperature=0)
        for r in many + [lone]:
            r.result(60)
        assert lone.seq.t_first < many[3].seq.t_first  # in arrival order it came after all six
        assert [r.result().token_ids for r in many[1:]] == [many[0].result().token_ids] * 5
        assert no_leak(model)
