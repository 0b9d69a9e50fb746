"""The HTTP/1.1 connection protocol ``nexusrt serve`` runs: uvicorn's h11 protocol with a time limit
on each request's head (its request line and headers).

uvicorn closes a keep-alive connection that sits idle between requests, but not one whose head
never completes: a client sending a byte every few seconds (or nothing after connecting) holds
a socket and a file descriptor for as long as it likes, and a few thousand of them exhaust the
process's descriptors (the "slowloris" pattern). Here the head of every request must arrive
within :data:`HEAD_TIMEOUT_S` of the connection opening, or of the first byte after the previous
response; otherwise the connection gets a 408 with the API's error body and is closed. A body
that stalls after its head is the app's to time out (``app.BODY_TIMEOUT_S``).

The h11 protocol is chosen explicitly (not uvicorn's "auto", which takes httptools when it is
installed) so every machine runs the same parser with this limit; the subclass uses uvicorn's
``cycle`` and ``loop`` attributes, which ``tests/test_server_connection.py`` exercises.
"""

from __future__ import annotations

import asyncio
import json
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT_S = 10.0  # seconds a request's line and headers may take to arrive
log = logging.getLogger("nexusrt.server")


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps({"error": {"message": f"the request's headers did not arrive within {seconds:g} s",
                                 "type": "invalid_request_error", "param": None, "code": None}}).encode()
    head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head is late (see the module)."""

    head_timeout_s = HEAD_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if self._between_requests():  # bytes of the next request's head: its clock starts (if not already)
            self._arm()
        super().data_received(data)
        if not self._between_requests():  # the head is complete: the app has the request
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._between_requests():
            return
        self.transport.write(_timeout_response(self.head_timeout_s))
        self.transport.close()
        self.head_timed_out()

    def head_timed_out(self) -> None:
        """Called once the 408 is written and the connection closed (a server counts it here)."""
        log.warning("closed a connection from %s: its request's headers did not arrive within %g s",
                    "%s:%d" % self.client if self.client else "a client", self.head_timeout_s)
