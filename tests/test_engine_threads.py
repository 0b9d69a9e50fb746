"""One LLM from several threads: calls are serialised, results equal the serial ones; the API edges
(close, re-entry from a stream) are clear errors."""

from __future__ import annotations

import threading

import pytest

import nexusrt as nrt
from nexusrt.errors import NexusRTError

PROMPTS = [f"prompt number {i}: {'abc' * (i % 5)}" for i in range(100)]


@pytest.fixture
def llm(cpu_rt):
    llm = nrt.LLM("synthetic:tiny", backend="cpu", max_context=128)
    yield llm
    llm.close()


def _key(r):
    return tuple(r.token_ids), r.text


def test_four_threads_get_the_serial_results(llm):
    kwargs = dict(max_new_tokens=6, temperature=0.8, top_k=20, seed=3)
    serial = [_key(llm.generate(p, **kwargs)) for p in PROMPTS]
    assert len(set(serial)) > 10  # the prompts really give different outputs
    got: dict[int, tuple] = {}
    errors = []

    def work(indices):
        try:
            for i in indices:
                if i % 3 == 0:  # streams interleave with generate calls from other threads
                    pieces = list(llm.stream(PROMPTS[i], **kwargs))
                    got[i] = (tuple(llm.last_result.token_ids), "".join(pieces))
                else:
                    got[i] = _key(llm.generate(PROMPTS[i], **kwargs))
        except BaseException as exc:  # reported below: a thread must not swallow a failure
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(range(t, 100, 4),)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    mismatched = [i for i in range(100) if got[i] != serial[i]]
    assert not mismatched, f"{len(mismatched)} of 100 differ from the serial results"


def test_last_result_is_per_thread(llm):
    mine = list(llm.stream("mine", max_new_tokens=3, temperature=0))
    other = threading.Thread(target=lambda: list(llm.stream("another prompt", max_new_tokens=5, temperature=0)))
    other.start()
    other.join(timeout=60)
    assert llm.last_result.prompt_tokens == 1 + len("mine") and llm.last_result.text == "".join(mine)


def test_stream_not_iterated_holds_nothing_and_abandoned_stream_releases(llm):
    llm.stream("never started")  # must not take the lock
    gen = llm.stream("abandoned", max_new_tokens=50)
    next(gen)
    with pytest.raises(NexusRTError, match="thread that holds an open stream"):
        llm.generate("inside my own stream", max_new_tokens=2)
    with pytest.raises(NexusRTError, match=r"LLM\.close\(\) was called from the thread that holds an open stream"):
        llm.close()  # refused before it stops anything: the LLM stays whole
    gen.close()
    assert llm.generate("after", max_new_tokens=2).token_ids
    assert [r.token_ids for r in llm.generate(["a list", "goes through the engine"], max_new_tokens=2)]


def test_calls_after_close_are_clear_errors(cpu_rt):
    llm = nrt.LLM("synthetic:tiny", backend="cpu", max_context=64)
    llm.close()
    llm.close()  # twice is fine
    for call in (lambda: llm.generate("x"), lambda: list(llm.stream("x")),
                 lambda: llm.chat([{"role": "user", "content": "x"}])):
        with pytest.raises(NexusRTError, match=r"LLM\.\w+\(\) after close\(\)"):
            call()


def test_close_waits_for_a_running_generation(cpu_rt):
    llm = nrt.LLM("synthetic:tiny", backend="cpu", max_context=300)
    gen = llm.stream("x", max_new_tokens=200)
    next(gen)
    closer = threading.Thread(target=llm.close)
    closer.start()
    closer.join(timeout=0.3)
    assert closer.is_alive()  # blocked behind the open stream, not pulling the runner from under it
    rest = list(gen)
    closer.join(timeout=30)
    assert not closer.is_alive() and llm.last_result is not None and rest is not None
    with pytest.raises(NexusRTError, match="after close"):
        llm.generate("x")


def test_chat_and_system(llm):
    r = llm.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                  {"role": "user", "content": "again"}], system="brief", max_new_tokens=3, temperature=0)
    prompt = llm.tokenizer.apply_chat_template([{"role": "system", "content": "brief"},
                                                {"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "yo"},
                                                {"role": "user", "content": "again"}])
    assert r.prompt_tokens == len(llm.tokenizer.encode(prompt, add_special_tokens=False))
    same = llm.generate("hi", system="brief", max_new_tokens=3, temperature=0)
    assert same.token_ids == llm.chat([{"role": "user", "content": "hi"}], system="brief", max_new_tokens=3,
                                      temperature=0).token_ids
    with pytest.raises(TypeError, match="messages must be a list"):
        llm.chat([{"role": "user"}])


def test_invalid_utf8_prompt(llm):
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # what argv gives for invalid bytes
    with pytest.raises(ValueError, match="the prompt is not valid UTF-8 text"):
        llm.generate(bad)
