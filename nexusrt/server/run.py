"""``nexusrt serve``: load a model, start the engine, serve HTTP with uvicorn until a signal.

SIGTERM or SIGINT: the listening socket closes and ``/health`` turns 503 at once; requests in
flight get ``DRAIN_S`` seconds to finish, then the engine cancels what is left (their KV blocks
freed; their clients get a 503 error, or an error event on a stream) and uvicorn's own grace
(``GRACE_S``) is there only for connections that still hang; the process exits within 10 s.

A tensor-parallel worker process that dies (``--tp-processes``, or any CUDA rank) ends the engine: its requests
fail naming the rank, the workers left are stopped, and the server logs the rank and exits
with status 1 (a supervisor restarts it) rather than answering 503 forever.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import sys
import threading

from ..errors import BackendUnavailable

DRAIN_S = 4.0  # seconds in-flight requests may take to finish after SIGTERM, then they are cancelled
MAX_DRAIN_S = 7.0  # the most --drain-seconds may be: with uvicorn's grace and the teardown, exit within 10 s
GRACE_S = 6  # uvicorn's limit on open connections after the signal (the drain ends them first)
MAX_GRACE_S = 8  # ... at most: a client that stops reading its stream is cut off by then
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str, flag: str = "--kv-memory") -> int:
    """``"268435456"``, ``"256M"``, ``"1.5G"`` (binary units, optional trailing B/iB) → bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"{flag} must be a size in bytes like 268435456, 256M or 2G, got {text!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"{flag} must be positive, got {text!r}")
    return value


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 32, kv_memory: int | None = None,
          max_context: int | None = None, max_waiting: int = 256, allow_paths=(), drain_s: float = DRAIN_S,
          kv: dict | None = None, tensor_parallel: int = 1, backend: str | None = None,
          deterministic: bool = False, kv_gpu_budget: int | None = None, tp_processes: bool = False) -> int:
    """Serve ``model`` until SIGTERM/SIGINT; returns the exit status. ``drain_s``: seconds requests in
    flight may take to finish after the signal (0 to 7). ``kv``: the requests' default ``kv_*``
    pruning options (a request's ``nexusrt_kv`` overrides them). ``tensor_parallel``: ranks the
    model is split over (on the CPU in process, or with ``tp_processes`` one worker process each; on
    CUDA one worker process per GPU, the batched engine over them). ``backend``: cpu or cuda (default: the probe's);
    ``deterministic``: on CUDA, a request's ids do not depend on the batch around it.
    ``kv_gpu_budget``: bytes of KV on the GPU; the engine swaps the requests it preempts to a pinned
    host tier instead of recomputing them (``engine.requests.engine_tiers``)."""
    if not 0 <= drain_s <= MAX_DRAIN_S:  # uvicorn's grace, the teardown and the 10 s promise bound it
        raise ValueError(f"--drain-seconds must be in [0, {MAX_DRAIN_S:g}], got {drain_s}")
    from ..engine.kv import shape as kv_shape

    kv_shape("", kv or {}, None)  # bad --kv-* flags fail here, before the model loads
    try:
        import uvicorn

        from .app import create_app
        from .connection import HeadTimeoutProtocol
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("uvicorn", "starlette"):
            raise BackendUnavailable(f"nexusrt serve needs {exc.name.split('.')[0]}: install the server with "
                                     "pip install 'nexusrt[serve]'") from None
        raise
    from ..engine.llm import LLM

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llm = LLM(model, backend=backend, max_context=max_context, max_batch=max_batch, kv_memory=kv_memory,
              max_waiting=max_waiting, allow_paths=allow_paths, tensor_parallel=tensor_parallel,
              deterministic=deterministic, kv_gpu_budget=kv_gpu_budget, tp_processes=tp_processes)
    try:
        app = create_app(llm, model, kv)
        state = app.state.server
        engine = llm.engine.engine  # started now: the first request should not pay for it

        class Server(uvicorn.Server):
            failure: BaseException | None = None
            drain: threading.Timer | None = None

            async def on_tick(self, counter: int) -> bool:
                # uvicorn ticks every 0.1 s; a dead worker leaves the engine unable to run a step
                if counter % 5 == 0 and llm.failure is not None:
                    self.failure = llm.failure
                    state.accepting = False
                    logging.getLogger("nexusrt.server").error("%s; shutting down", self.failure)
                    return True
                return await super().on_tick(counter)

            async def startup(self, sockets=None):
                await super().startup(sockets)
                if not self.should_exit:  # bound and listening (a busy port fails in there)
                    logging.getLogger("nexusrt.server").info(
                        "serving %s on http://%s:%d (%s backend%s, context %d, max batch %d, %d KV blocks)", model,
                        host, port, llm.backend, ", deterministic" if deterministic else "", llm.runner.max_context,
                        max_batch, engine.blocks.num_blocks)
                    if state.max_request_tokens < llm.runner.max_context:
                        logging.getLogger("nexusrt.server").warning(
                            "the KV pool holds %d tokens, fewer than the context of %d: a request without KV "
                            "pruning may hold at most that many (raise --kv-memory)", state.max_request_tokens,
                            llm.runner.max_context)

            def handle_exit(self, sig, frame):  # stop taking requests at the signal, not after the grace
                if state.accepting:
                    state.accepting = False
                    # Cancel in the engine, so every open request ends as a response, before uvicorn
                    # would cancel the tasks themselves.
                    self.drain = threading.Timer(drain_s, llm.engine.stop)
                    self.drain.daemon = True  # an idle server exits when uvicorn is done, not after the drain
                    self.drain.start()
                super().handle_exit(sig, frame)
                # uvicorn re-raises captured signals after its shutdown, which would end the process
                # before llm.close(); a drained SIGTERM is a clean exit (status 0) instead.
                captured = getattr(self, "_captured_signals", [])
                if sig == signal.SIGTERM and sig in captured:
                    captured.remove(sig)

        class Protocol(HeadTimeoutProtocol):  # h11 with a limit on each request's head, counted
            def head_timed_out(self) -> None:
                state.head_timed_out(self.client[0] if self.client else "-", self.head_timeout_s)

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, http=Protocol,
                                timeout_graceful_shutdown=min(max(GRACE_S, math.ceil(drain_s) + 1), MAX_GRACE_S),
                                lifespan="off")
        server = Server(config)
        try:
            server.run()
        finally:
            if server.drain is not None:
                server.drain.cancel()  # every request ended before the drain did; llm.close() below
        return 0 if server.failure is None else 1
    finally:
        llm.close()  # cancels whatever is left; its blocks go back to the pool
