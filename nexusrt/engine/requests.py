"""``nrt.LLM``'s requests through the serving engine (CPU backend): submit, wait, stream, cancel.

The LLM builds a :class:`~nexusrt.engine.session.Session` per prompt as for its one-sequence
path; here the session's ``on_token`` runs on the engine's thread as the batch produces ids,
and :meth:`Request.result` finishes it on the caller's thread. Because the CPU decoder is
batch invariant, a request's ids are the ones the one-sequence path gives.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

from ..backends.cpu.batch import CpuBatchRunner, blocks_for_bytes
from ..errors import NexusRTError
from ..serving import Engine, EngineLoop, KvPolicy, SchedulerConfig, Sequence
from .kv import report
from .session import GenerationResult, Session

DEFAULT_KV_MEMORY = 256 << 20  # bytes of fp32 KV blocks on the CPU (np.zeros: committed as written)


class Cancelled(NexusRTError):
    """The request was cancelled (by its caller, or because the LLM closed)."""


def serving_config(max_batch, kv_memory, max_waiting) -> tuple[SchedulerConfig, int, int]:
    """Check the LLM's serving arguments: the scheduler's config, the KV bytes, the queue bound."""
    kv = DEFAULT_KV_MEMORY if kv_memory is None else kv_memory
    if isinstance(kv, bool) or not isinstance(kv, int) or kv <= 0:
        raise ValueError(f"kv_memory must be a positive number of bytes, got {kv_memory!r}")
    if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 1:
        raise ValueError(f"max_waiting must be an integer >= 1, got {max_waiting!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    return SchedulerConfig(max_running=max_batch, token_budget=max(512, max_batch)), kv, max_waiting


def make_loop(cpu_runner, config: SchedulerConfig, kv_memory: int, max_waiting: int) -> EngineLoop:
    """An :class:`EngineLoop` over a :class:`CpuBatchRunner` sharing ``cpu_runner``'s weights
    (arguments as :func:`serving_config` returns them)."""
    num_blocks = blocks_for_bytes(cpu_runner.config, kv_memory)
    if num_blocks < 1:
        raise ValueError(f"kv_memory={kv_memory} bytes holds no KV block of this model")
    runner = CpuBatchRunner(cpu_runner.decoder, num_blocks, cpu_runner.max_context)
    return EngineLoop(Engine(runner, config), max_waiting=max_waiting)


class Request:
    """One prompt in the engine. ``on_end`` (engine thread) is called once when it ends."""

    def __init__(self, loop: EngineLoop, session: Session, ids, params, max_new_tokens: int, max_context: int,
                 finish: Callable[[Session], GenerationResult], on_end: Callable[["Request"], None] | None = None,
                 kv: KvPolicy | None = None):
        self.loop, self.session, self._finish, self._on_end = loop, session, finish, on_end
        self.ended = threading.Event()
        self.seq = Sequence(ids, params, max_new_tokens, max_context,
                            on_token=lambda seq, token: session.on_token(token), on_finish=self._ended, kv=kv)
        self._result: GenerationResult | None = None

    def _ended(self, seq) -> None:
        self.ended.set()
        if self._on_end is not None:
            self._on_end(self)

    def submit(self) -> "Request":
        self.loop.submit(self.seq)
        return self

    def cancel(self) -> None:
        """Stop generating and free the request's KV blocks (at the engine's next step)."""
        self.loop.cancel(self.seq)

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the end; the :class:`GenerationResult`, or the error that ended it."""
        if not self.ended.wait(timeout):
            raise TimeoutError(f"the request did not finish within {timeout} s")
        if self.seq.finish_reason == "error":
            raise self.seq.error
        if self.seq.finish_reason == "cancelled":
            raise Cancelled("the request was cancelled")
        if self._result is None:
            self._result = self._finish(self.session)
            seq = self.seq
            self._result.kv = report(seq.kv, seq.kv_kept, seq.evicted_total, seq.peak_blocks)
        return self._result


def run_all(requests: list[Request]) -> list[GenerationResult]:
    """Submit every request and wait for their results; a failure while queueing cancels the rest."""
    queued = []
    try:
        for r in requests:
            queued.append(r.submit())
        return [r.result() for r in requests]
    finally:
        for r in queued:
            if not r.ended.is_set():
                r.cancel()


def stream(request_factory: Callable[[Callable[[str], None], Callable], Request]) -> Iterator[str]:
    """Yield a request's text as the engine produces it; closing the iterator cancels it.

    ``request_factory(emit, on_end)`` builds the request with the given session emitter and end
    callback; the generator's return value is its :class:`GenerationResult`.
    """
    q: queue.Queue = queue.Queue()
    end = object()
    request = request_factory(q.put, lambda r: q.put(end))
    request.submit()
    try:
        while (item := q.get()) is not end:
            yield item
        result = request.result()  # flushes the held-back text into q
        while not q.empty():
            yield q.get()
        return result
    finally:
        if not request.ended.is_set():
            request.cancel()
