"""From the engine's thread to the event loop: the text of a request's choices, their ends, the
client's departure.

The engine calls a choice's ``emitter`` / ``ender`` on its own thread; they hand ``(index,
piece)`` or ``(index, END)`` to the event loop with ``call_soon_threadsafe``, one queue for all
of a request's choices, in the order each choice produced them. If the loop is gone (the
server is shutting down) the item is dropped: the request is cancelled by then, and the engine
must not fail for it.
"""

from __future__ import annotations

import asyncio
import json

END = object()  # the request ended (its result is ready)
GONE = object()  # the client disconnected


class Bridge:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop closed
            pass

    def emitter(self, index: int):
        """The ``emit`` callback of choice ``index``."""
        return lambda piece: self._put((index, piece))

    def ender(self, index: int):
        """The ``on_end`` callback of choice ``index``."""
        return lambda request: self._put((index, END))

    async def next(self, watcher: asyncio.Future):
        """The next ``(index, text piece or END)``, or GONE when ``watcher`` (the disconnect watch)
        finishes first (or already has: a client gone while text was queued is not sent the rest)."""
        if watcher.done():
            return GONE
        if not self.queue.empty():
            return self.queue.get_nowait()
        get = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        return GONE


async def wait_disconnect(receive) -> None:
    """Return when the ASGI server reports ``http.disconnect`` (the request body is read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def sse(obj) -> bytes:
    """One server-sent event carrying ``obj`` as JSON (or the literal ``[DONE]``)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


class EventStream:
    """A raw ASGI response that sends ``events`` (an async iterator of bytes) as ``text/event-stream``.

    Starlette's StreamingResponse notices a departed client only on the next write (ASGI 2.4);
    the events here watch the disconnect themselves (:meth:`Bridge.next`) and the iterator is
    always closed, so its ``finally`` cancels the request and frees its KV blocks.
    """

    def __init__(self, events, headers: dict | None = None):
        self.events = events
        self.headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
        self.headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away between two events
            pass
        finally:
            await self.events.aclose()
