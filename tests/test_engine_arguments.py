"""nrt.LLM's arguments: each bad one is refused naming it, before any work (no engine thread,
no KV pool), and the LLM gives the same tokens after a refused call as before."""

from __future__ import annotations

import threading

import pytest

import nexusrt as nrt
from conftest import engine_is_empty
from nexusrt.errors import InvalidArgument, InvalidArgumentType
from nexusrt.kvcache.tiers import mem_available
from nexusrt.serving.pruning import KvPolicy

ENGINE_THREAD = "nexusrt-engine"


def _engine_threads() -> int:
    return sum(t.name == ENGINE_THREAD for t in threading.enumerate())


@pytest.fixture
def tiny(cpu_rt):
    llm = nrt.LLM("synthetic:tiny", backend="cpu", max_context=128)
    yield llm
    llm.close()


@pytest.mark.parametrize("kv_memory, match", [
    (10**15, r"kv_memory=1000000000000000 bytes is more than this machine's available memory \(\d+ bytes\)"),
    (1, r"kv_memory=1 bytes holds no KV block \(\d+ bytes on cpu\) of this model"),
])
def test_a_kv_memory_that_cannot_work_is_refused_when_the_llm_is_made(cpu_rt, kv_memory, match):
    """It used to build, then fail at the first list/thread/pruning call, hiding that call's own errors."""
    threads = _engine_threads()
    with pytest.raises(InvalidArgument, match=match) as e:
        nrt.LLM("synthetic:tiny", backend="cpu", max_context=64, kv_memory=kv_memory)
    assert e.value.argument == "kv_memory" and _engine_threads() == threads
    fits = min(1 << 20, mem_available())  # room for blocks, and available: made as before
    with nrt.LLM("synthetic:tiny", backend="cpu", max_context=64, kv_memory=fits) as llm:
        assert len(llm.generate(["hi"], max_new_tokens=2, temperature=0)[0].token_ids) == 2


def test_check_kv_memory_on_each_backend():
    """The check nrt.LLM makes before building its runner (and make_loop as the pool is made):
    one block of the backend's KV (fp32 on the CPU, bf16 on CUDA), and on the CPU what is available."""
    from types import SimpleNamespace

    from nexusrt.engine.requests import check_kv_memory

    cfg = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=1, head_dim=8)  # 16 tokens a block
    cpu, cuda = 2 * 2 * 1 * 16 * 8 * 4, 2 * 2 * 1 * 16 * 8 * 2
    check_kv_memory(cfg, "cpu", None)  # the backend's default: checked as the pool is made
    check_kv_memory(cfg, "cpu", cpu, available=cpu)
    check_kv_memory(cfg, "cuda", cuda, available=0)  # device memory: the host's is no bound
    for backend, kv, available, match in [("cpu", cpu - 1, None, rf"holds no KV block \({cpu} bytes on cpu\)"),
                                          ("cuda", cuda - 1, None, rf"holds no KV block \({cuda} bytes on cuda\)"),
                                          ("cpu", cpu + 1, cpu, rf"available memory \({cpu} bytes\)")]:
        with pytest.raises(InvalidArgument, match=match) as e:
            check_kv_memory(cfg, backend, kv, available=available)
        assert e.value.argument == "kv_memory"


@pytest.mark.parametrize("value", ["no", 1, None, 0.0])
def test_deterministic_must_be_a_bool(cpu_rt, value):
    with pytest.raises(InvalidArgumentType, match=f"deterministic must be True or False, got {value!r}") as e:
        nrt.LLM("synthetic:tiny", backend="cpu", deterministic=value)  # "no" used to be taken as True
    assert e.value.argument == "deterministic" and isinstance(e.value, TypeError)


def test_a_refused_submit_starts_no_engine(tiny):
    ref = tiny.generate("hello", max_new_tokens=6, temperature=0)  # the one-sequence path: no engine
    threads = _engine_threads()
    with pytest.raises(InvalidArgument, match="max_new_tokens must be an integer >= 1") as e:
        tiny.submit("hi", max_new_tokens=0)
    assert e.value.argument == "max_new_tokens"
    with pytest.raises(InvalidArgument) as e:
        tiny.prepare("hi", temperature=-1)
    assert e.value.argument == "temperature"
    assert tiny._loop is None and _engine_threads() == threads  # no thread, no pool
    assert tiny.submit("hello", max_new_tokens=6, temperature=0).result(timeout=60).token_ids == ref.token_ids
    assert tiny.generate("hello", max_new_tokens=6, temperature=0).token_ids == ref.token_ids
    assert engine_is_empty(tiny)


@pytest.mark.parametrize("kw, argument", [(dict(emit=5), "emit"), (dict(emit=0), "emit"), (dict(emit="x"), "emit"),
                                          (dict(on_end="x"), "on_end"), (dict(on_end=1), "on_end")])
def test_callbacks_must_be_callable(tiny, kw, argument):
    """``emit=5`` failed on the engine's thread with "'int' object is not callable"; ``on_end="x"``
    and ``emit=0`` were dropped without a word."""
    for call in (tiny.submit, tiny.prepare):
        with pytest.raises(InvalidArgumentType, match=f"^{argument} must be a callable or None, got ") as e:
            call("hi", max_new_tokens=2, **kw)
        assert e.value.argument == argument and isinstance(e.value, TypeError)
    assert tiny._loop is None
    req = tiny.prepare("hi", max_new_tokens=2)
    with pytest.raises(InvalidArgumentType) as e:
        req.sibling(seed=1, **kw)
    assert e.value.argument == argument
    pieces, ended = [], []
    r = tiny.submit("hi", max_new_tokens=4, temperature=0, emit=pieces.append, on_end=ended.append).result(timeout=60)
    assert "".join(pieces) == r.text and len(ended) == 1
    assert engine_is_empty(tiny)


def test_an_empty_conversation_is_refused(tiny):
    ref = tiny.chat([{"role": "user", "content": "hi"}], max_new_tokens=4, temperature=0)
    threads = _engine_threads()
    with pytest.raises(InvalidArgument, match="the prompt is an empty list") as e:
        tiny.submit([])
    assert e.value.argument == "prompt"
    with pytest.raises(InvalidArgument) as e:
        tiny.prepare([], max_new_tokens=2)
    assert e.value.argument == "prompt"
    for call in (tiny.chat, tiny.stream_chat):  # stream_chat refuses when called, not at the first piece
        for system in (None, "Be brief."):  # a system prompt alone is no conversation either
            with pytest.raises(InvalidArgument, match="messages is empty: a chat needs at least one message") as e:
                call([], system=system)
            assert e.value.argument == "messages"
    with pytest.raises(InvalidArgumentType) as e:
        tiny.chat("hi")
    assert e.value.argument == "messages"
    assert tiny._loop is None and _engine_threads() == threads
    assert tiny.chat([{"role": "user", "content": "hi"}], max_new_tokens=4, temperature=0).token_ids == ref.token_ids


def test_an_empty_batch_gives_an_empty_list_and_still_checks_its_arguments(tiny):
    """``generate([...])`` is a batch of prompts (documented: a list in, a list out), so ``[]``
    gives ``[]``, with ``chat=True`` too; but a bad argument is refused as it is with prompts."""
    assert tiny.generate([]) == [] and tiny.generate([], chat=True) == [] and tiny.generate(()) == []
    for kw, argument in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(top_p=0), "top_p"),
                         (dict(stop=[3]), "stop"), (dict(system=3), "system"), (dict(kv_policy="lru"), "kv_policy")]:
        with pytest.raises(InvalidArgument) as e:
            tiny.generate([], **kw)
        assert e.value.argument == argument
    with pytest.raises(TypeError, match="unexpected keyword argument 'kv_budget_tokens'"):
        tiny.generate([], kv_budget_tokens=4)
    assert tiny._loop is None


def test_the_documented_h2o_window_is_the_codes():
    """The default h2o ``kv_window`` was documented three ways; the code's is
    ``kv_budget // 2 - kv_sinks // 2`` (``kv_budget // 2 - 2`` with the default 4 sinks)."""
    for budget, sinks in [(64, 4), (64, 6), (101, 7), (10, 0)]:
        assert KvPolicy("h2o", budget, sinks).recent == budget // 2 - sinks // 2
    assert KvPolicy("sink-window", 64, 6).recent == 64 - 6
    assert "default ``kv_budget // 2 - kv_sinks // 2``" in " ".join(nrt.LLM.generate.__doc__.split())


def test_the_h2o_window_reported_is_the_documented_default(tiny):
    r = tiny.generate("hello there", max_new_tokens=3, temperature=0, kv_policy="h2o", kv_budget=40, kv_sinks=6)
    assert r.kv["window"] == 40 // 2 - 6 // 2 and r.kv["sinks"] == 6
    assert engine_is_empty(tiny)
