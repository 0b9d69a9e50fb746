"""The OpenAI-compatible HTTP app (Starlette) over ``nrt.LLM``'s serving engine.

``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(streamed as server-sent events with ``"stream": true``), ``GET /metrics`` (Prometheus text).
Every request goes through the engine (:meth:`nexusrt.engine.llm.LLM.submit`), so concurrent
requests are batched. A bad request gets 400 with OpenAI's error body naming the field; a
full queue 429; a server shutting down 503; a body that does not arrive within
:data:`BODY_TIMEOUT_S` 408 (a head that does not arrive in time: :mod:`.connection`). A client
that disconnects has its request cancelled and its KV blocks freed. One log line per request.
Tokenizing a prompt (up to the 4 MiB body: seconds) runs on a worker thread, so one long prompt
does not hold up every other client.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..engine.context import Context
from ..engine.prompts import PromptTooLong
from ..engine.requests import Cancelled
from ..kvcache.blocks import BLOCK_SIZE
from ..errors import InvalidArgument, ModelError, NexusRTError, RequestTooLarge
from ..serving import EngineStopped, QueueFull
from ..serving.metrics import render, swap_gauges
from .bridge import END, GONE, Bridge, EventStream, sse, wait_disconnect
from .protocol import (CONTEXT_FIELD, DEFAULT_MAX_TOKENS, FINISH_REASONS, KV_FIELD, BadRequest, Completion, parse,
                       parse_json)

MAX_BODY = 4 << 20  # bytes of a request body
INLINE_PARSE = 64 << 10  # bodies below this are parsed on the event loop, larger ones on a worker thread
BODY_TIMEOUT_S = 30.0  # seconds a client may take to send its body: a stalled sender holds a handler
MAX_PATH_ECHO = 200  # characters of an unknown path an error message repeats
log = logging.getLogger("nexusrt.server")


class ServerState:
    """What the routes share: the LLM, the served model's id, whether new requests are taken."""

    def __init__(self, llm, model_id: str, kv: dict | None = None):
        self.llm, self.model_id = llm, model_id
        self.kv = dict(kv or {})  # default kv_* pruning options (nexusrt serve --kv-*)
        self.created = int(time.time())
        self.accepting = True
        self.http = Counter()  # status code -> responses

    @property
    def max_request_tokens(self) -> int:
        """Tokens one request may hold without KV pruning: the context, or the KV pool when that is
        smaller (``--kv-memory``)."""
        return min(self.llm.runner.max_context, self.llm.engine.engine.blocks.num_blocks * BLOCK_SIZE)

    def done(self, request: Request, status: int, t0: float, **fields) -> None:
        """Count the response and write its log line."""
        self.http[status] += 1
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        client = request.client.host if request.client else "-"
        log.info("%s %s %s %d %.1fms %s", client, request.method, request.url.path, status,
                 (time.perf_counter() - t0) * 1e3, extra)


    def head_timed_out(self, client: str, seconds: float) -> None:
        """Count the 408 a connection got before its request reached the app, with a log line."""
        self.http[408] += 1
        log.info("%s - - 408 %.1fms error='the request line and headers did not arrive within %g s'", client,
                 seconds * 1e3, seconds)


class ClientGone(Exception):
    """The client hung up before its request body had arrived."""


def _error(e: BadRequest, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:  # before reading: no "100 Continue" for it either
        raise BadRequest(f"the request body exceeds {MAX_BODY} bytes", None, 413)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY:
                    raise BadRequest(f"the request body exceeds {MAX_BODY} bytes", None, 413)
                chunks.append(chunk)
    except TimeoutError:
        raise BadRequest(f"the request body did not arrive within {BODY_TIMEOUT_S:g} s", None, 408) from None
    except ClientDisconnect:
        raise ClientGone from None
    return b"".join(chunks)


def _submit(state: ServerState, c: Completion, bridge: Bridge) -> list:
    """Check, tokenize and queue every choice of ``c`` (each prompt once; its other ``n - 1``
    choices are siblings with seeds ``seed + i``); the requests in choice order. Nothing stays
    queued when any fails."""
    if not state.accepting:
        raise BadRequest("the server is shutting down", None, 503, "server_error")
    field = CONTEXT_FIELD if isinstance(c.prompts[0], Context) else "messages" if c.chat else "prompt"
    if c.choices > state.llm.engine.max_waiting:  # could never be queued at once
        raise BadRequest(f"{c.choices} choices exceed this server's queue of {state.llm.engine.max_waiting} "
                         "requests (--max-waiting)", "n" if c.n > 1 else field)
    seed, reqs = c.sampling.get("seed"), []
    fields = [f"{field}[{p}]" for p in range(len(c.prompts))] if len(c.prompts) > 1 else [field]
    where = {"n": None, "field": field}  # the prompt being worked on: its tokens and its field, for a refusal
    try:
        for p, prompt in enumerate(c.prompts):
            where["field"] = fields[p]
            first = _prepare(state, c, prompt, bridge, p * c.n, where)
            reqs.append(first)
            for i in range(1, c.n):
                index = p * c.n + i
                reqs.append(first.sibling(None if seed is None else (seed + i) % (1 << 64),
                                          bridge.emitter(index), bridge.ender(index)))
        for r in reqs:  # one request's choices, whichever prompt: one group for fair admission
            r.seq.group = reqs[0].seq.group
        for p in range(len(c.prompts)):  # every prompt fits the pool before any choice is queued
            where.update(n=len(reqs[p * c.n].seq.prompt_ids), field=fields[p])
            reqs[p * c.n].check()
        for r in reqs:
            r.submit()
        return reqs
    except BaseException as exc:
        for r in reqs:
            if r.submitted:
                r.cancel()
        refusal = _refusal(exc, state, c, where["field"], where["n"])
        if refusal is exc:
            raise
        raise refusal from None


def _prepare(state: ServerState, c: Completion, prompt, bridge: Bridge, index: int, where: dict):
    """The checked, tokenized request of one prompt, its length fitted to the context (or the pool)."""
    field = where["field"]
    limit = state.llm.runner.max_context
    wanted = c.max_tokens or min(DEFAULT_MAX_TOKENS[c.chat], limit)
    # A request's own policy "full" turns the server's pruning defaults off rather than meeting them.
    kv = dict(c.kv) if c.kv.get("kv_policy") == "full" else {**state.kv, **c.kv}
    req = state.llm.prepare(prompt, wanted, stop=c.stop, emit=bridge.emitter(index), on_end=bridge.ender(index),
                            **c.sampling, **kv)
    n = where["n"] = len(req.seq.prompt_ids)
    room = limit if req.seq.kv.prunes else state.max_request_tokens  # a pruned cache stays in its budget
    if c.max_tokens is None and n + wanted > room:  # the default: what the context (or the pool) leaves
        if n >= room:
            what = (f"this server's KV pool holds {room} tokens for one request" if room < limit
                    else f"this model's context is {limit} tokens")
            raise BadRequest(f"{what}; the prompt is {n}, which leaves no room to generate", field,
                             code="context_length_exceeded")
        req.limit_new_tokens(room - n)
    elif n + wanted > limit:  # as OpenAI: refuse rather than stop early at the context's end
        raise BadRequest(f"this model's context is {limit} tokens; the request asks for {n + wanted} "
                         f"({n} in the prompt, {wanted} to generate)", "max_tokens" if n < limit else field,
                         code="context_length_exceeded")
    return req


def _refusal(exc: BaseException, state: ServerState, c: Completion, field: str, n: int | None) -> BaseException:
    """The BadRequest answering a failed submission (``n``: the last prompt's tokens, if it got
    that far); an exception that is not a refusal is passed on as it is."""
    if isinstance(exc, BadRequest):
        return exc
    if isinstance(exc, PromptTooLong):
        return BadRequest(f"this model's context is {exc.limit} tokens; the prompt is {'at least ' * exc.at_least}"
                          f"{exc.tokens}", field, code="context_length_exceeded")
    if isinstance(exc, QueueFull):
        return BadRequest(str(exc), None, 429, "rate_limit_exceeded")
    if isinstance(exc, EngineStopped):
        return BadRequest(str(exc), None, 503, "server_error")
    if isinstance(exc, ModelError):  # e.g. no chat template
        return BadRequest(str(exc), field)
    if isinstance(exc, NexusRTError):  # the LLM closed: the server is going down
        return BadRequest(str(exc), None, 503, "server_error")
    if isinstance(exc, RequestTooLarge):  # the pool (--kv-memory) is smaller than the context
        room = state.max_request_tokens
        blame = "max_tokens" if c.max_tokens is not None and n is not None and n < room else field
        return BadRequest(f"{exc}: this server's KV pool holds {room} tokens for one request", blame)
    if isinstance(exc, InvalidArgument):
        return BadRequest(str(exc), _param(exc.argument, field))
    if isinstance(exc, (ValueError, TypeError)):  # an argument the engine does not name: no field to point at
        return BadRequest(str(exc), None)
    return exc


def _param(argument: str, prompt_field: str) -> str | None:
    """The request field an engine argument (:class:`~nexusrt.errors.InvalidArgument`) came from."""
    if argument in ("temperature", "top_p", "top_k", "seed", "stop"):
        return argument
    if argument.startswith("kv_"):
        return KV_FIELD
    return {"max_new_tokens": "max_tokens", "prompt": prompt_field, "system": prompt_field}.get(argument)


def _failure(exc: Exception) -> BadRequest:
    """The error body of a request that did not finish: 503 when shutdown cancelled it, else 500."""
    if isinstance(exc, Cancelled):
        return BadRequest("the server is shutting down; the request was cancelled", None, 503, "server_error")
    return BadRequest(f"generation failed: {exc}", None, 500, "server_error")


def _choice(c: Completion, index: int, text: str, finish) -> dict:
    if c.chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def _chunk(c: Completion, head: dict, index: int, text: str | None, finish=None, role: bool = False) -> dict:
    if c.chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "finish_reason": finish}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {**head, "object": "chat.completion.chunk" if c.chat else "text_completion", "choices": [choice]}


def _usage(c: Completion, results: list) -> dict:
    """Each prompt's tokens counted once (its n choices share it), every choice's new tokens."""
    prompt = sum(results[p * c.n].prompt_tokens for p in range(len(c.prompts)))
    new = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}


def _log_fields(c: Completion, results: list) -> dict:
    usage = _usage(c, results)
    finishes = sorted({FINISH_REASONS[r.finish_reason] for r in results})
    fields = {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
              "finish": ",".join(finishes), "ttft_ms": f"{min(r.ttft_s for r in results) * 1e3:.1f}"}
    return {**fields, "choices": len(results)} if len(results) > 1 else fields


async def _generate(state: ServerState, request: Request, chat: bool) -> Response:
    t0 = time.perf_counter()
    try:
        raw = await _read_body(request)
        args = (chat, state.model_id, state.llm.runner.max_context)
        # A big body (a long prompt, a million token ids: ~0.2 s) is parsed on a worker thread, like
        # the tokenizing, so it does not stall every other client; a small one is not worth the hop.
        c = parse(parse_json(raw), *args) if len(raw) < INLINE_PARSE else \
            await asyncio.to_thread(lambda: parse(parse_json(raw), *args))
        bridge = Bridge(asyncio.get_running_loop())
        reqs = await asyncio.to_thread(_submit, state, c, bridge)  # tokenizing: off the event loop
    except ClientGone:
        state.done(request, 499, t0, error="'the client left before its body arrived'")
        return Response(status_code=499)  # nobody reads it
    except BadRequest as e:
        state.done(request, e.status, t0, error=repr(e.message[:120]))
        return _error(e, {"retry-after": "1"} if e.status == 429 else None)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": state.model_id}
    watcher = asyncio.ensure_future(wait_disconnect(request.receive))
    if c.stream:
        return EventStream(_events(state, request, c, reqs, bridge, watcher, head, t0))
    status, fields = 200, {}
    try:
        left = len(reqs)
        while left:
            item = await bridge.next(watcher)
            if item is GONE:
                status = 499  # nginx's "client closed request": nobody reads it
                return Response(status_code=status)
            left -= item[1] is END
        results = [r.result() for r in reqs]  # Cancelled: the server cancelled it while shutting down
        fields = _log_fields(c, results)
        choices = [_choice(c, i, r.text, FINISH_REASONS[r.finish_reason]) for i, r in enumerate(results)]
        return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                             "usage": _usage(c, results)})
    except asyncio.CancelledError:  # the server is shutting down and gave up waiting for it
        status = 503
        raise
    except Exception as exc:  # cancelled at shutdown, or the engine failed it; the server goes on
        e = _failure(exc)
        status = e.status
        return _error(e)
    finally:
        watcher.cancel()
        _cancel_open(reqs)  # client gone, or the handler cancelled at shutdown
        state.done(request, status, t0, **fields)


def _cancel_open(reqs: list) -> None:
    for r in reqs:
        if not r.ended.is_set():
            r.cancel()


async def _events(state, request, c: Completion, reqs: list, bridge: Bridge, watcher, head: dict, t0: float):
    """The server-sent events of a streamed request: each choice's text as it comes (chunks name
    their choice's index), its finish chunk when it ends, then the usage (if asked) and [DONE]."""
    status, fields = 200, {"stream": "yes"}
    sent: list[list[str]] = [[] for _ in reqs]
    results: list = [None] * len(reqs)
    try:
        if c.chat:
            for i in range(len(reqs)):
                yield sse(_chunk(c, head, i, None, role=True))
        left = len(reqs)
        while left:
            item = await bridge.next(watcher)
            if item is GONE:
                status = 499
                return
            i, piece = item
            if results[i] is not None:  # the text result() flushed: sent below as the tail
                continue
            if piece is not END:
                sent[i].append(piece)
                yield sse(_chunk(c, head, i, piece))
                continue
            left -= 1
            try:
                result = results[i] = reqs[i].result()
            except Exception as exc:  # cancelled at shutdown, or the engine failed it
                e = _failure(exc)
                status = e.status
                yield sse(e.body())
                return
            tail = result.text[len("".join(sent[i])):]  # text held back for stop strings, flushed at the end
            if tail:
                yield sse(_chunk(c, head, i, tail))
            yield sse(_chunk(c, head, i, None, FINISH_REASONS[result.finish_reason]))
        if c.include_usage:
            yield sse({**head, "object": "chat.completion.chunk" if c.chat else "text_completion",
                       "choices": [], "usage": _usage(c, results)})
        yield sse("[DONE]")
        fields.update(_log_fields(c, results))
    except asyncio.CancelledError:  # the server is shutting down and gave up waiting for it
        status = 503
        raise
    except GeneratorExit:  # closed mid-stream: the client left between events, or the shutdown cut it off
        status = 503 if not state.accepting else 499
        raise
    finally:
        watcher.cancel()
        _cancel_open(reqs)
        state.done(request, status, t0, **fields)


def create_app(llm, model_id: str, kv: dict | None = None) -> Starlette:
    """The app serving ``llm`` (its engine must run: the CPU backend) under the name ``model_id``."""
    state = ServerState(llm, model_id, kv)

    async def health(request: Request) -> Response:
        ok = state.accepting and state.llm.runner is not None
        state.done(request, 200 if ok else 503, time.perf_counter())
        return JSONResponse({"status": "ok" if ok else "shutting down"}, status_code=200 if ok else 503)

    async def models(request: Request) -> Response:
        state.done(request, 200, time.perf_counter())
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "nexusrt",
             "max_model_len": state.max_request_tokens}]})

    async def metrics(request: Request) -> Response:
        loop = state.llm.engine
        eng = loop.engine
        gauges = {
            "queue_length": ("Requests waiting for the engine.", loop.num_waiting),
            "running_requests": ("Requests holding KV blocks.", loop.num_running),
            "kv_blocks_used": ("KV blocks referenced by requests.", eng.blocks.num_used),
            "kv_blocks_total": ("KV blocks in the pool.", eng.blocks.num_blocks),
            "kv_blocks_cached": ("Unreferenced KV blocks kept for the prefix cache.", len(eng.blocks.lru)),
            "prefix_cache_hits_total": ("Full KV blocks found in the prefix cache.", eng.blocks.hits),
            "prefix_cache_lookups_total": ("Full KV blocks looked up in the prefix cache.", eng.blocks.lookups),
            "preemptions_total": ("Requests preempted (recomputed, or swapped to the host tier) when KV "
                                  "blocks ran out.", eng.scheduler.preemptions)}
        gauges.update(swap_gauges(eng.swap))
        text = render(eng.metrics, gauges)
        text += "# HELP nexusrt_http_responses_total HTTP responses, by status.\n"
        text += "# TYPE nexusrt_http_responses_total counter\n"
        text += "".join(f'nexusrt_http_responses_total{{code="{k}"}} {v}\n' for k, v in sorted(state.http.items()))
        state.done(request, 200, time.perf_counter())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def completions(request: Request) -> Response:
        return await _generate(state, request, chat=False)

    async def chat(request: Request) -> Response:
        return await _generate(state, request, chat=True)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        path = request.url.path
        path = path if len(path) <= MAX_PATH_ECHO else path[:MAX_PATH_ECHO] + "..."
        e = BadRequest(f"{request.method} {path}: {exc.detail}", None, exc.status_code)
        state.done(request, exc.status_code, time.perf_counter())
        return _error(e, exc.headers)  # a 405's Allow

    app = Starlette(routes=[
        Route("/health", health), Route("/v1/models", models), Route("/metrics", metrics),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ], exception_handlers={HTTPException: http_error})
    app.state.server = state
    return app
