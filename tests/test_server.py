"""``nexusrt serve`` end to end on the CPU backend: a real server in a subprocess on 127.0.0.1,
the ``openai`` client and raw HTTP. Concurrency, streaming, batch invariance through the server,
disconnects freeing KV blocks, bad requests, a full queue, SIGTERM."""

from __future__ import annotations

import json
import random
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from server_helpers import MODEL, ServerProcess  # noqa: E402

KV_USED = "nexusrt_kv_blocks_used"
CANCELLED = 'nexusrt_requests_total{finish_reason="cancelled"}'


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--max-context", "256", "--max-batch", "16")
    yield srv
    rc, out = srv.stop()
    assert rc == 0, out
    assert "Traceback" not in out, out


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60,
                      http_client=openai.DefaultHttpxClient(trust_env=False))
    yield c
    c.close()


def test_health_and_models(server, client):
    assert server.http.get("/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_usage_finish_reason_and_stop(client):
    r = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=12, temperature=0)
    text = r.choices[0].text
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    stop = text[2:5]
    s = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=12, temperature=0, stop=[stop])
    assert s.choices[0].finish_reason == "stop" and s.choices[0].text == text[:text.find(stop)]


def test_streamed_chat_equals_the_whole_reply(client):
    kw = dict(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "What does os.path.join do?"}],
              max_tokens=20, temperature=0.7, top_p=0.9, seed=4)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and whole.choices[0].message.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it really streamed


def test_concurrent_requests_are_batched_and_each_gets_its_solo_tokens(server, client):
    prompts = [f"def f{i}(x):\n    return x" + " +1" * i for i in range(12)]
    kw = lambda i: dict(model=MODEL, prompt=prompts[i], max_tokens=16, temperature=0.8, seed=100 + i)  # noqa: E731
    solo = [client.completions.create(**kw(i)).choices[0].text for i in range(12)]
    steps0 = server.metrics()["nexusrt_engine_steps_total"]
    together, errors = [None] * 12, []

    def call(i):
        try:
            together[i] = client.completions.create(**kw(i)).choices[0].text
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and together == solo
    steps = server.metrics()["nexusrt_engine_steps_total"] - steps0
    assert steps < 12 * 16  # requests shared steps (alone they would take 16 each)
    assert server.wait_metric(KV_USED, lambda v: v == 0) == 0


def test_a_disconnected_stream_is_cancelled_and_frees_its_blocks(server):
    before = server.metrics().get(CANCELLED, 0)
    body = {"model": MODEL, "prompt": "class Parser:\n", "max_tokens": 230, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # one event, then hang up
    assert server.wait_metric(CANCELLED, lambda v: v > before) == before + 1
    assert server.wait_metric(KV_USED, lambda v: v == 0) == 0


def test_a_disconnected_plain_request_is_cancelled(server):
    before = server.metrics().get(CANCELLED, 0)
    body = {"model": MODEL, "prompt": "def main():\n", "max_tokens": 240}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.2, trust_env=False)
    assert server.wait_metric(CANCELLED, lambda v: v > before) == before + 1
    assert server.wait_metric(KV_USED, lambda v: v == 0) == 0


BAD = [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"model": "gpt-4", "prompt": "x"}, "model"),
    ({"prompt": "x"}, "model"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10 ** 12}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "temperature": -0.5}, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": "x", "top_p": 1.5}, "top_p"),
    ({"model": MODEL, "prompt": "x", "seed": -1}, "seed"),
    ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": MODEL, "prompt": "x", "n": 65}, "n"),
    ({"model": MODEL, "prompt": [17, 10 ** 9]}, "prompt"),  # a token id beyond the vocabulary
    ({"model": MODEL, "prompt": [17] * 300}, "prompt"),  # 300 ids: longer than the context
    ({"model": MODEL, "prompt": ["x", "word " * 400]}, "prompt[1]"),  # the second prompt is too long
    ({"model": MODEL, "prompt": 42}, "prompt"),
    ({"model": MODEL, "prompt": "word " * 400}, "prompt"),  # longer than the 256-token context
    ({"model": MODEL, "prompt": "x" * 200, "max_tokens": 250}, "max_tokens"),  # prompt + max_tokens > context
    ({"model": MODEL, "prompt": "word " * 254}, "prompt"),  # 256 tokens: fills the context, no room for one more
]


@pytest.mark.parametrize("body,param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_400_naming_the_field(server, body, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = server.http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_the_layered_context_extension(server):
    ctx = {"system": "You answer in Python.", "working": "def parse(text):"}
    chat = {"model": MODEL, "nexusrt_context": ctx, "max_tokens": 4, "temperature": 0}
    r = server.http.post("/v1/chat/completions", json=chat)
    ref = server.http.post("/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "system", "content": ctx["system"]}, {"role": "user", "content": ctx["working"]}]})
    assert r.status_code == 200 and ref.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == ref.json()["choices"][0]["message"]
    assert r.json()["usage"] == ref.json()["usage"]
    r = server.http.post("/v1/completions", json={"model": MODEL, "max_tokens": 2, "nexusrt_context": ctx})
    assert r.status_code == 200, r.text
    for bad, words in [({"working": "import os, sys", "budgets": {"working": 1}}, "over its budget of 1"),
                       ({"working": "x", "budgets": {"L9": 1}}, "unknown context layer"),
                       ({"working": "x", "scratch": "y"}, "unknown context field"),
                       ("just text", "must be an object")]:
        body = {"model": MODEL, "max_tokens": 2, "nexusrt_context": bad}
        r = server.http.post("/v1/completions", json=body)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "nexusrt_context"
    both = dict(chat, messages=[{"role": "user", "content": "x"}])
    r = server.http.post("/v1/chat/completions", json=both)
    assert r.status_code == 400 and "not both" in r.json()["error"]["message"]


def test_the_kv_pruning_extension(server):
    body = {"model": MODEL, "prompt": "import os\n", "max_tokens": 40, "temperature": 0}
    full = server.http.post("/v1/completions", json=body)
    wide = server.http.post("/v1/completions", json=dict(body, nexusrt_kv={"policy": "h2o", "budget": 200}))
    assert full.status_code == 200 and wide.status_code == 200, wide.text
    assert wide.json()["choices"][0]["text"] == full.json()["choices"][0]["text"]  # within budget: exact
    tight = server.http.post("/v1/completions", json=dict(body, nexusrt_kv={"policy": "sink-window", "budget": 20}))
    assert tight.status_code == 200, tight.text
    for bad, words in [({"policy": "lru", "budget": 8}, "kv_policy must be one of"),
                       ({"policy": "h2o", "budget": 2}, "must exceed kv_sinks"),
                       ({"policy": "h2o", "budget": "many"}, "kv_budget must be an integer"),
                       ({"policy": "h2o", "slots": 8}, "keys among")]:
        r = server.http.post("/v1/completions", json=dict(body, nexusrt_kv=bad))
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "nexusrt_kv"
    assert server.wait_metric(KV_USED, lambda v: v == 0) == 0


def test_bad_chat_requests_and_routes(server):
    r = server.http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    r = server.http.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert server.http.get("/v1/completions").status_code == 405
    assert server.http.get("/v2/anything").status_code == 404
    # and the server still serves, with nothing left in the pool
    ok = server.http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200 and server.metrics()[KV_USED] == 0


def test_the_default_max_tokens_fits_what_the_context_leaves(server, client):
    prompt = "x" * 250  # the stdlib tokenizer: some 250 / k tokens; without max_tokens chat asks for 256
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}])
    assert r.usage.total_tokens <= 256 and r.choices[0].finish_reason in ("length", "stop")


def test_n_choices_and_lists_of_prompts_through_the_openai_client(server, client):
    """Choice p * n + i is prompt p sampled with seed + i: what a lone request with that seed gives;
    usage counts each prompt once; streamed choices carry their index and join to the same texts."""
    prompts, kw = ["def f(x):", "import os"], dict(model=MODEL, max_tokens=6, temperature=0.9)
    r = client.completions.create(prompt=prompts, n=3, seed=7, **kw)
    assert [c.index for c in r.choices] == list(range(6))
    alone = [client.completions.create(prompt=p, seed=7 + i, **kw) for p in prompts for i in range(3)]
    assert [c.text for c in r.choices] == [a.choices[0].text for a in alone]
    assert len({c.text for c in r.choices[:3]}) > 1  # the seeds differ, and so do the samples
    assert r.usage.prompt_tokens == alone[0].usage.prompt_tokens + alone[3].usage.prompt_tokens
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    messages = [{"role": "user", "content": "What does os.path.join do?"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, n=2, seed=3, max_tokens=8,
                                           temperature=0.9)
    texts, finishes, usage = ["", ""], [None, None], None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, n=2, seed=3, max_tokens=8,
                                                temperature=0.9, stream=True, stream_options={"include_usage": True}):
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            finishes[ch.index] = ch.finish_reason or finishes[ch.index]
        usage = chunk.usage or usage
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [c.finish_reason for c in whole.choices] and usage.total_tokens == whole.usage.total_tokens
    assert server.wait_metric(KV_USED, lambda v: v == 0) == 0


def test_token_id_prompts_are_taken_as_they_are(server, client):
    from nexusrt.models import load_model

    text = "def main():"
    ids = server.http.post("/v1/completions", json={"model": MODEL, "prompt": text, "max_tokens": 1}).json()
    tok_ids = load_model(MODEL).tokenizer.encode(text)  # the ids the server tokenizes the text to
    by_ids = client.completions.create(model=MODEL, prompt=tok_ids, max_tokens=8, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt=text, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text and ids["usage"]["prompt_tokens"] == len(tok_ids)
    both = client.completions.create(model=MODEL, prompt=[tok_ids, text], max_tokens=8, temperature=0)
    assert [c.text for c in both.choices] == [by_text.choices[0].text] * 2


def test_nothing_a_client_sends_crashes_the_server(server):
    rng = random.Random(14)
    values = [None, True, -1, 0, 1, 3, 2.5, 1e308, -1e308, "x", "", [], ["a"], [1, 2], {}, {"a": 1},
              [[[[[]]]]], "\ud800", 2 ** 70]
    fields = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
              "stream", "n", "stream_options", "max_completion_tokens"]
    codes = set()
    for i in range(60):
        body = {"model": MODEL, "prompt": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        for f in rng.sample(fields, 3):
            body[f] = rng.choice(values)
        if body.get("max_tokens") is None:  # a few tokens at most: the answer is under test, not generation
            body["max_tokens"] = 2
        if body.get("max_completion_tokens") not in (None, 1, 3):
            body.pop("max_completion_tokens")
        path = "/v1/chat/completions" if i % 2 else "/v1/completions"
        r = server.http.post(path, content=json.dumps(body, allow_nan=True).encode(),
                             headers={"content-type": "application/json"})
        codes.add(r.status_code)
        assert r.status_code in (200, 400), (body, r.status_code, r.text)
        if r.status_code == 400:
            assert set(r.json()["error"]) >= {"message", "type", "param"}
    assert codes == {200, 400}
    assert server.http.get("/health").status_code == 200
    assert server.wait_metric(KV_USED, lambda v: v == 0) == 0


def test_metrics_are_prometheus_text(server):
    text = server.http.get("/metrics").text
    for name in ("nexusrt_requests_total", "nexusrt_generation_tokens_total", "nexusrt_queue_length",
                 "nexusrt_kv_blocks_used", "nexusrt_time_to_first_token_seconds_bucket",
                 "nexusrt_time_per_output_token_seconds_count", "nexusrt_prefix_cache_hits_total"):
        assert f"\n{name}" in text, name
    assert '# TYPE nexusrt_time_to_first_token_seconds histogram' in text


def test_a_full_queue_gets_429_and_sigterm_drains_within_10_s():
    srv = ServerProcess("--max-context", "2048", "--max-batch", "1", "--max-waiting", "1", "--drain-seconds", "1")
    try:
        body = {"model": MODEL, "prompt": "import sys\n", "max_tokens": 200}
        statuses, lock = [], threading.Lock()

        def call():
            with httpx.Client(base_url=srv.url, timeout=60, trust_env=False) as c:
                r = c.post("/v1/completions", json=body)
            with lock:
                statuses.append((r.status_code, r.json()))
                if r.status_code == 429:
                    assert r.headers["retry-after"] == "1"

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        full = [b for s, b in statuses if s == 429]
        assert full and "waiting" in full[0]["error"]["message"]
        assert any(s == 200 for s, _ in statuses)
        # SIGTERM with a stream in flight that needs longer than the 1 s drain: it is cancelled in the
        # engine, its client gets an error event, and the server exits in time.
        got_first, events = threading.Event(), []

        def stream():
            with httpx.Client(base_url=srv.url, timeout=30, trust_env=False) as c:
                with c.stream("POST", "/v1/completions", json={**body, "max_tokens": 2000, "stream": True}) as r:
                    for line in r.iter_lines():
                        events.append(line)
                        got_first.set()

        t = threading.Thread(target=stream)
        t.start()
        assert got_first.wait(30)
        t0 = time.monotonic()
        rc, out = srv.stop(timeout=15)
        assert time.monotonic() - t0 < 10 and rc == 0, out
        t.join(timeout=10)
        assert "Traceback" not in out, out
        last = json.loads([e for e in events if e.startswith("data: ")][-1][6:])
        assert "shutting down" in last["error"]["message"]
        assert out.count("POST /v1/completions") == 7  # one log line per request
    finally:
        if srv.proc.poll() is None:
            srv.stop()


def test_an_idle_server_stops_at_once_not_after_the_drain():
    srv = ServerProcess("--drain-seconds", "7")
    t0 = time.monotonic()
    rc, out = srv.stop()
    assert rc == 0 and "Traceback" not in out, out
    assert time.monotonic() - t0 < 5, out  # it waited for the 7 s drain timer before


def test_serve_without_the_server_packages_says_what_to_install(monkeypatch):
    import sys

    from nexusrt.errors import BackendUnavailable
    from nexusrt.server.run import serve

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn raises ModuleNotFoundError
    with pytest.raises(BackendUnavailable, match=r"pip install 'nexusrt\[serve\]'"):
        serve("nexusrt:stdlib-tiny", port=1)
