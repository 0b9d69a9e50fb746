"""The server's app in process (no socket): where a prompt is tokenized, clients that stall or leave
while sending their body, the HTTP details of its error answers, the OpenAI fields it refuses or
takes, and the limits of a KV pool smaller than the context. ``tests/test_server.py`` runs the whole
server in a subprocess."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

pytest.importorskip("starlette")

from nexusrt.engine.llm import LLM  # noqa: E402
from nexusrt.server import app as server_app  # noqa: E402

MODEL = "nexusrt:stdlib-tiny"


@pytest.fixture(scope="module")
def llm():
    model = LLM(MODEL, backend="cpu", max_context=256, max_batch=4)
    yield model
    model.close()


@pytest.fixture()
def app(llm):
    return server_app.create_app(llm, MODEL)


def _request(app, method: str, path: str, **kw) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


async def _raw(app, parts: list[dict], length: int = 100, fail_after: int | None = None) -> list[dict]:
    """POST /v1/completions with the ASGI receive events ``parts`` (and a content-length of
    ``length``), after which the client neither sends nor leaves; what the app sent back.
    ``fail_after``: sends after that many raise OSError, as to a client that has gone."""
    sent, pending = [], list(parts)

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        if fail_after is not None and len(sent) >= fail_after:
            raise OSError("the client has gone")
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(length).encode())],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    await app(scope, receive, send)
    return sent


def _thread_spy(monkeypatch, owner, name: str) -> list:
    """The threads ``owner.name`` is called on, from now on (it still does its work)."""
    threads, real = [], getattr(owner, name)

    def spy(*args, **kw):
        threads.append(threading.current_thread())
        return real(*args, **kw)

    monkeypatch.setattr(owner, name, spy)
    return threads


def test_a_big_body_is_parsed_off_the_event_loop(app, monkeypatch):
    threads = _thread_spy(monkeypatch, server_app, "parse")
    ids = [17] * 40000  # ~200 KB of JSON
    r = _request(app, "POST", "/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # longer than the 256 context
    small = _request(app, "POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert small.status_code == 200
    assert threads[0] is not threading.main_thread() and threads[1] is threading.main_thread()


def test_prompts_are_tokenized_off_the_event_loop(app, llm, monkeypatch):
    threads = _thread_spy(monkeypatch, llm, "prepare")
    r = _request(app, "POST", "/v1/completions", json={"model": MODEL, "prompt": "def f(x):", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    # asyncio.run drives the app's event loop on this (the main) thread; the prompt went elsewhere.
    assert len(threads) == 1 and threads[0] is not threading.main_thread()


def test_a_client_that_leaves_mid_body_gets_a_quiet_499(app):
    head = {"type": "http.request", "body": b'{"model":', "more_body": True}
    sent = asyncio.run(_raw(app, [head, {"type": "http.disconnect"}]))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert app.state.server.http[499] == 1


def test_a_body_that_stalls_gets_408_in_bounded_time(app, monkeypatch):
    monkeypatch.setattr(server_app, "BODY_TIMEOUT_S", 0.2)
    head = {"type": "http.request", "body": b'{"model":', "more_body": True}
    sent = asyncio.run(asyncio.wait_for(_raw(app, [head]), 10))
    assert sent[0]["status"] == 408
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert "did not arrive within 0.2 s" in body["error"]["message"]


def test_error_answers_keep_their_http_headers_and_a_short_path(app):
    r = _request(app, "GET", "/v1/completions")
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    r = _request(app, "GET", "/" + "x" * 10_000)
    assert r.status_code == 404 and len(r.json()["error"]["message"]) < server_app.MAX_PATH_ECHO + 100


def _parse(body: dict, chat: bool = False):
    from nexusrt.server.protocol import parse

    base = {"model": MODEL, **({"messages": [{"role": "user", "content": "x"}]} if chat else {"prompt": "x"})}
    return parse({**base, **body}, chat, MODEL, 256)


def _refused(body: dict, chat: bool = False):
    from nexusrt.server.protocol import BadRequest

    with pytest.raises(BadRequest) as info:
        _parse(body, chat)
    return info.value


@pytest.mark.parametrize("name, value", [
    ("logprobs", 1), ("logprobs", 0), ("logprobs", True), ("top_logprobs", 2), ("echo", True), ("best_of", 3),
    ("suffix", "x"), ("presence_penalty", 2.0), ("frequency_penalty", -1), ("logit_bias", {"1": 100}),
    ("response_format", {"type": "json_object"}), ("tools", [{"type": "function"}]), ("tool_choice", "required"),
])
def test_openai_fields_that_would_be_ignored_are_refused_by_name(name, value):
    e = _refused({name: value}, chat=True)
    assert e.param == name and "not supported" in e.message


def test_their_no_op_values_and_null_are_taken_as_left_out():
    c = _parse({"logprobs": False, "top_logprobs": 0, "echo": False, "best_of": 1, "suffix": "",
                "presence_penalty": 0.0, "frequency_penalty": 0, "logit_bias": {}, "response_format": {"type": "text"},
                "tools": [], "tool_choice": "none", "stream": None, "stream_options": None, "n": None})
    assert not c.stream and not c.include_usage and c.max_tokens is None


def test_stream_options_n_and_both_token_limits_are_checked():
    assert _refused({"stream": False, "stream_options": {"include_usage": True}}).param == "stream_options"
    assert _parse({"stream": True, "stream_options": {"include_usage": True}}).include_usage
    assert _parse({"n": 2}).n == 2 and _parse({"n": 3, "prompt": ["a", "b"]}).choices == 6
    for n in (0, 65, 1.5, True, "2"):
        assert _refused({"n": n}).param == "n"
    e = _refused({"n": 33, "prompt": ["a", "b"]})
    assert e.param == "n" and "66 choices" in e.message and "at most 64" in e.message
    assert _refused({"max_tokens": "abc", "max_completion_tokens": 2}, chat=True).param == "max_tokens"
    assert _parse({"max_tokens": 9, "max_completion_tokens": 2}, chat=True).max_tokens == 2


def test_a_completions_prompt_is_text_token_ids_or_a_list_of_them():
    assert _parse({"prompt": "a"}).prompts == ["a"] and _parse({"prompt": ["a", "b"]}).prompts == ["a", "b"]
    assert _parse({"prompt": [1, 2, 3]}).prompts == [[1, 2, 3]]
    assert _parse({"prompt": [[1, 2], "b", [3]]}).prompts == [[1, 2], "b", [3]]
    assert _parse({"prompt": ["a"] * 64}).choices == 64
    for bad, match in (([], "non-empty list of either"), (["a", 1], "non-empty list of either"),
                       ([[1, 2], []], "non-empty list of either"), ([True, 2], "non-empty list of either"),
                       ([1.5], "non-empty list of either"), (None, "non-empty list of either"),
                       (["a"] * 65, "holds 65 prompts")):
        e = _refused({"prompt": bad})
        assert e.param == "prompt" and match in e.message, (bad, e.message)
    assert _refused({"prompt": ["a", "\udc00"]}).param == "prompt[1]"


def test_chat_content_as_text_parts_null_assistant_turns_and_the_developer_role():
    msgs = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None}, {"role": "user", "content": "c"}]
    c = _parse({"messages": msgs}, chat=True)
    assert c.prompts[0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"},
                        {"role": "assistant", "content": ""}, {"role": "user", "content": "c"}]
    image = {"type": "image_url", "image_url": {"url": "http://x"}}
    e = _refused({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, image]}]}, chat=True)
    assert e.param == "messages[0].content[1]" and "'image_url' part" in e.message
    assert _refused({"messages": [{"role": "user", "content": None}]}, chat=True).param == "messages[0].content"
    e = _refused({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}, chat=True)
    assert e.param == "messages[0].content[0].text" and "UTF-8" in e.message


def test_a_prompt_beyond_the_context_says_so_with_openais_code_and_no_server_paths(app):
    r = _request(app, "POST", "/v1/completions", json={"model": MODEL, "prompt": "word " * 400, "max_tokens": 4})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert "context is 256 tokens; the prompt is" in err["message"] and "config.json" not in err["message"]


def test_a_kv_pool_smaller_than_the_context_bounds_the_default_and_takes_the_blame():
    small = LLM(MODEL, backend="cpu", max_context=256, kv_memory=1 << 18)  # 4 blocks: 64 tokens
    try:
        app = server_app.create_app(small, MODEL)
        assert app.state.server.max_request_tokens == 64
        models = _request(app, "GET", "/v1/models").json()
        assert models["data"][0]["max_model_len"] == 64
        ok = _request(app, "POST", "/v1/chat/completions",
                      json={"model": MODEL, "messages": [{"role": "user", "content": "def f():"}]})
        assert ok.status_code == 200 and ok.json()["usage"]["total_tokens"] <= 64  # chat's 256 fitted to the pool
        long = {"role": "user", "content": "x " * 90}
        r = _request(app, "POST", "/v1/chat/completions", json={"model": MODEL, "messages": [long]})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "messages" and "KV pool holds 64" in err["message"]
        r = _request(app, "POST", "/v1/completions", json={"model": MODEL, "prompt": "def f():", "max_tokens": 100})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "max_tokens" and "KV pool holds 64" in err["message"]
    finally:
        small.close()


def test_a_requests_full_policy_turns_the_servers_pruning_defaults_off(llm):
    app = server_app.create_app(llm, MODEL, kv={"kv_policy": "sink-window", "kv_budget": 64})
    body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 2}
    for kv in ({"policy": "full"}, {"policy": "h2o", "budget": 48}, None):
        r = _request(app, "POST", "/v1/completions", json={**body, "nexusrt_kv": kv})
        assert r.status_code == 200, (kv, r.text)
    r = _request(app, "POST", "/v1/completions", json={**body, "nexusrt_kv": {"budget": 48}})  # the server's policy
    assert r.status_code == 200, r.text


def test_submit_takes_chat_messages_with_pruning_and_checks_what_it_is_given(llm):
    from nexusrt.engine.context import Context

    msgs = [{"role": "user", "content": "def f(x):"}]
    assert llm.submit(msgs, 3, kv_policy="sink-window", kv_budget=64).result(timeout=60).token_ids
    assert llm.submit(Context(working="def f(x):"), 3).result(timeout=60).token_ids
    ids = llm.tokenizer.encode("def f(x):")
    assert llm.submit(ids, 3, temperature=0).result(timeout=60).token_ids == \
        llm.submit("def f(x):", 3, temperature=0).result(timeout=60).token_ids  # token ids taken as they are
    for bad, err, match in ((None, TypeError, "prompt must be text, a list of chat messages, a list of token ids"),
                            ("\udcff", ValueError, "not valid UTF-8"), ([{"role": "user"}], TypeError, "messages must"),
                            ([1, -1], ValueError, "token id -1 is outside"), ([True], TypeError, "messages must")):
        with pytest.raises(err, match=match):
            llm.submit(bad, 2)
    for stop in (5, {"a": 1}):
        with pytest.raises(TypeError, match="stop must be a string or a list of strings"):
            llm.submit("x", 2, stop=stop)


def test_a_temperature_the_sampler_refuses_names_its_field(app):
    r = _request(app, "POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "temperature": 1e-320})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_choices_beyond_the_queue_are_refused_and_a_queue_that_fills_midway_cancels_the_rest(monkeypatch):
    from nexusrt.engine import requests as engine_requests
    from nexusrt.serving import QueueFull

    small = LLM(MODEL, backend="cpu", max_context=256, max_waiting=3)
    try:
        app = server_app.create_app(small, MODEL)
        r = _request(app, "POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 4, "max_tokens": 2})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "n" and "queue of 3 requests (--max-waiting)" in err["message"]
        r = _request(app, "POST", "/v1/completions", json={"model": MODEL, "prompt": ["x"] * 4, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"  # n=1: the prompts are too many
        real, submitted = engine_requests.Request.submit, []

        def third_finds_the_queue_full(self):
            if len(submitted) == 2:
                raise QueueFull("the queue is full (test)")
            submitted.append(real(self))
            return self

        monkeypatch.setattr(engine_requests.Request, "submit", third_finds_the_queue_full)
        r = _request(app, "POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 3, "max_tokens": 200})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        for s in submitted:  # the two queued before it are cancelled, not left to run
            s.ended.wait(10)
            assert s.seq.finish_reason == "cancelled"
        blocks = small.engine.engine.blocks
        blocks.audit()
        assert blocks.num_used == 0
    finally:
        small.close()


def test_a_declared_body_over_the_limit_is_refused_before_any_of_it_is_read(app):
    sent = asyncio.run(asyncio.wait_for(_raw(app, [], length=50 << 20), 10))  # receive() would block: not called
    assert sent[0]["status"] == 413 and app.state.server.http[413] == 1


def test_a_stream_whose_client_left_between_events_is_logged_499_not_200(app, llm):
    body = json.dumps({"model": MODEL, "prompt": "def f(x):", "max_tokens": 60, "n": 2, "stream": True,
                       "temperature": 0}).encode()
    parts = [{"type": "http.request", "body": body, "more_body": False}]
    sent = asyncio.run(asyncio.wait_for(_raw(app, parts, length=len(body), fail_after=3), 60))
    assert sent[0]["status"] == 200 and len(sent) == 3  # the head and two events, then the client was gone
    state = app.state.server
    assert state.http[499] == 1 and state.http[200] == 0
    blocks = llm.engine.engine.blocks
    for _ in range(100):  # the choices are cancelled at the engine's next step
        if blocks.num_used == 0:
            break
        time.sleep(0.05)
    assert blocks.num_used == 0


def test_a_late_request_head_is_counted_as_a_408():
    from nexusrt.server.app import ServerState

    state = ServerState(None, MODEL)
    state.head_timed_out("127.0.0.1", 10.0)
    assert state.http[408] == 1
