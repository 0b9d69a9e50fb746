"""The server's connection protocol on a real socket (127.0.0.1): a request head that does not
arrive in time gets a 408 and the connection closes; heads that arrive in parts within the limit,
and keep-alive connections idle between requests, are served as before."""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

import uvicorn  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from nexusrt.server.connection import HeadTimeoutProtocol  # noqa: E402

LIMIT_S = 0.6


TIMED_OUT: list[str] = []


class ShortHeadTimeout(HeadTimeoutProtocol):
    head_timeout_s = LIMIT_S

    def head_timed_out(self) -> None:  # the hook a server counts its 408s in
        TIMED_OUT.append(self.client[0] if self.client else "-")


@pytest.fixture(scope="module")
def port():
    async def hello(request):
        return PlainTextResponse("hello")

    app = Starlette(routes=[Route("/", hello)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free, http=ShortHeadTimeout,
                                           log_level="error", lifespan="off", timeout_keep_alive=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    yield free
    server.should_exit = True
    thread.join(10)


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and the seconds that took."""
    sock.settimeout(timeout)
    t0, out = time.monotonic(), b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return out, time.monotonic() - t0
        out += chunk


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_a_silent_connection_gets_408_and_is_closed(port):
    before = len(TIMED_OUT)
    with _connect(port) as s:
        out, took = _read_until_closed(s, 5)
    assert out.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 0.6 s" in out
    assert LIMIT_S * 0.8 < took < LIMIT_S + 2
    assert TIMED_OUT[before:] == ["127.0.0.1"]


def test_a_head_trickling_in_is_cut_off_in_bounded_time(port):
    with _connect(port) as s:
        t0 = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        try:
            while time.monotonic() - t0 < LIMIT_S + 1.5:  # a header byte every 0.1 s: it would never finish
                s.sendall(b"X")
                time.sleep(0.1)
            out, _ = _read_until_closed(s, 5)
        except OSError:  # reset: the server closed while bytes were still coming
            out = b"reset"
    assert out.startswith(b"HTTP/1.1 408 ") or out == b"reset"
    assert time.monotonic() - t0 < LIMIT_S + 3


def _response(sock: socket.socket) -> bytes:
    """One whole response to GET / (its head and body may come in separate segments)."""
    sock.settimeout(5)
    out = b""
    while not out.endswith(b"hello"):
        chunk = sock.recv(4096)
        assert chunk, f"closed after {out!r}"
        out += chunk
    return out


def test_heads_in_parts_within_the_limit_and_idle_keep_alive_are_served(port):
    with _connect(port) as s:
        s.sendall(b"GET / HTTP/1.1\r\n")
        time.sleep(LIMIT_S / 3)
        s.sendall(b"Host: x\r\n\r\n")
        assert _response(s).startswith(b"HTTP/1.1 200 ")
        time.sleep(LIMIT_S * 2)  # idle between requests: keep-alive's limit (5 s), not the head's
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(s).startswith(b"HTTP/1.1 200 ")
