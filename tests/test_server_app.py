"""The server's app in process (no socket): where a prompt is tokenized, clients that stall or leave
while sending their body, and the HTTP details of its error answers. ``tests/test_server.py`` runs
the whole server in a subprocess."""

from __future__ import annotations

import asyncio
import json
import threading

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


async def _raw(app, parts: list[dict]) -> list[dict]:
    """POST /v1/completions with the ASGI receive events ``parts``, after which the client neither
    sends nor leaves; what the app sent back."""
    sent, pending = [], list(parts)

    async def receive():
        if pending:
            return pending.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    await app(scope, receive, send)
    return sent


def test_prompts_are_tokenized_off_the_event_loop(app, llm, monkeypatch):
    threads = []
    real = llm.prepare

    def spy(*args, **kw):
        threads.append(threading.current_thread())
        return real(*args, **kw)

    monkeypatch.setattr(llm, "prepare", spy)
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
