"""``nrt.LLM``: load a model, generate or stream text.

>>> import nexusrt as nrt
>>> llm = nrt.LLM("synthetic:tiny")                  # or an HF checkpoint directory
>>> r = llm.generate("Hello", max_new_tokens=16, temperature=0)
>>> r.text, r.token_ids, r.ttft_s, r.tokens_per_s
>>> for piece in llm.stream("Hello", max_new_tokens=16):
...     print(piece, end="")
>>> llm.chat([{"role": "user", "content": "Hi"}], system="Be brief.").text

Threads and lists: ``generate([...])`` with a list, and a call from a thread while another
call runs, go through the serving engine (:mod:`nexusrt.serving`); a lone call takes the
one-sequence path (``runner.generate_tokens``). On CUDA the two round differently (both within
bf16 error); ``deterministic=True`` sends every call through the engine's batch-invariant mode.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from typing import Iterator

from .. import runtime as runtime_mod
from ..errors import FatalError, InvalidArgument, InvalidArgumentType, NexusRTError
from ..models.loader import load_model
from ..reference.sampling import SamplingParams
from .context import Context
from .kv import Pruned, one_sequence_report
from .prompts import chat_messages, check_generation, prompt_for, request_prompt, start_session
from .requests import Request, check_callback, check_kv_memory, make_loop, run_all, serving_config
from .requests import stream as engine_stream
from .runners import check_tensor_parallel, make_runner, stream_tokens
from .session import GenerationResult, Session

log = logging.getLogger("nexusrt")
CLOSE_WARN_S = 10.0  # close() says so when the engine's step outlasts this (then waits for it anyway)
BACKENDS = ("cpu", "cuda")


def _closed(what: str) -> NexusRTError:
    return NexusRTError(f"LLM.{what}() after close(): this LLM released its model; create a new nrt.LLM")


class LLM:
    """A loaded model and its runner.

    Parameters
    ----------
    path_or_name : checkpoint directory, ``nexusrt:stdlib-tiny`` (shipped, trained),
        ``synthetic:<preset>`` (tiny, llama-3.2-1b, llama-3.1-8b), or a Hugging Face repo id
        ``org/name`` already in the local HF cache.
    backend : ``"cpu"`` or ``"cuda"``; default: the running runtime's (booted here if needed).
    max_context : cap on the KV cache, below the model's ``max_position_embeddings``.
    weights_seed : seed of synthetic weights (ignored for checkpoints).
    allow_paths : folders outside the checkpoint directory its symlinks may lead into.
    max_batch, kv_memory, max_waiting : the serving engine's cap on running sequences, the
        bytes of its KV block pool (CPU default 256 MiB, or one sequence at full context where
        that is more; CUDA default: ``max_batch`` sequences at full context) and its queue bound.
        A ``kv_memory`` below one KV block of the model, or on the CPU above the machine's
        available memory, is refused here (an InvalidArgument naming it), before the model's
        runner is built. A request the pool cannot hold is refused by the engine; a lone call
        that takes the one-sequence path uses that runner's own cache of ``max_context`` tokens
        instead.
    deterministic : ``True`` or ``False`` (anything else is refused). CUDA: every call goes
        through the serving engine in its batch-invariant mode (a request's ids do not depend on
        what runs beside it; prefix caching off). The CPU engine is batch invariant anyway.
    tensor_parallel : ranks the model is split over (CPU: in process; CUDA: one worker process
        per GPU, NCCL collectives; the serving engine batches over them too, each rank running
        its own batch runner, h2o pruning not offered). A script that uses CUDA ranks must guard its top level with
        ``if __name__ == "__main__":`` (workers are spawned).
    tp_processes : CPU: run each rank in its own worker process (loading only its shard,
        collectives through shared memory) instead of all in this one; the same guard applies.
        On CUDA the ranks are always processes.
    kv_gpu_budget : CUDA: bytes of KV cache on the GPU. The one-sequence runner keeps a
        sequence's oldest blocks past it in pinned host memory, read zero-copy; the serving
        engine's device pool is capped by it and the sequences it preempts are swapped to a
        pinned host tier instead of recomputed (``engine.requests.engine_tiers`` sizes it; in
        the engine one sequence must still fit the device pool).
    kv_fault_reserve : CUDA, with ``kv_gpu_budget``: bytes of extra device KV the one-sequence
        runner's fault ring moves host blocks into.

    Thread safety: the runner holds one sequence; a call takes it when it is free. A call
    that finds it busy (another thread's call) and every list ``generate`` go through the
    serving engine instead, batched with the others. A
    :meth:`stream` holds the runner from its first piece until it is exhausted or closed;
    calling the LLM again from the thread that holds an open stream is an error. After
    :meth:`close`, every call raises NexusRTError.
    """

    def __init__(self, path_or_name, backend: str | None = None, *, max_context: int | None = None,
                 weights_seed: int = 0, allow_paths=(), max_batch: int = 32, kv_memory: int | None = None,
                 max_waiting: int = 1024, tensor_parallel: int = 1, deterministic: bool = False,
                 kv_gpu_budget: int | None = None, tp_processes: bool = False,
                 kv_fault_reserve: int | None = None):
        if backend is not None and backend not in BACKENDS:
            raise InvalidArgument("backend", f"backend must be one of {', '.join(BACKENDS)} or None, got {backend!r}")
        if not isinstance(deterministic, bool):  # "no" would be taken as True
            raise InvalidArgumentType("deterministic", f"deterministic must be True or False, got {deterministic!r}")
        self._lock, self._loop_lock = threading.Lock(), threading.Lock()
        # The thread object (not its id: ids are reused once a thread exits) that holds the lock.
        self._owner: threading.Thread | None = None
        self._streams = weakref.WeakSet()  # one-sequence streams made here: close() ends one a dead thread left
        self._local = threading.local()  # last_result is per thread: another thread's stream must not replace it
        self.runner = None
        self._loop = None  # the serving engine's loop, started at first use
        self._fatal: FatalError | None = None  # what broke the runner outside the engine loop
        self._closing = False  # set by close(): no engine loop starts after it
        self._serving_args = serving_config(max_batch, kv_memory, max_waiting)  # bad values fail here, not later
        self._kv_gpu_budget = kv_gpu_budget  # the serving engine's too: its host tier (engine.requests.engine_tiers)
        self.deterministic = deterministic
        t0 = time.perf_counter()
        if not runtime_mod.is_initialized():
            from .. import firmware

            firmware.init(backend=backend)
        self.backend = backend or runtime_mod.current("nrt.LLM").backend
        check_tensor_parallel(tensor_parallel, self.backend, tp_processes)  # before a byte of the model is read
        self.tensor_parallel = tensor_parallel  # ranks the runner's decoder is split over
        self.model = load_model(path_or_name, seed=weights_seed, allow_paths=allow_paths)
        try:
            check_kv_memory(self.model.config, self.backend, kv_memory)  # not at the first call that needs the pool
            self.runner = make_runner(self.model, self.backend, max_context, tensor_parallel, kv_gpu_budget,
                                      tp_processes, kv_fault_reserve=kv_fault_reserve)
        except BaseException:
            self.model.weights.close()  # nothing half-loaded stays behind
            raise
        self.tokenizer, self.load_s = self.model.tokenizer, time.perf_counter() - t0

    @property
    def config(self):
        return self.model.config

    @property
    def failure(self) -> BaseException | None:
        """The error that left this LLM unable to serve, or None: the one that stopped the serving
        engine's loop (a :class:`~nexusrt.errors.FatalError` such as a dead tensor-parallel
        worker, or a bug), else a FatalError met outside it (a one-sequence call, making the
        engine's pools). A server polls this to know it must exit."""
        loop = self._loop
        if loop is not None and loop.error is not None:
            return loop.error
        return self._fatal

    @contextlib.contextmanager
    def _watch(self):
        """Keep a FatalError raised inside for :attr:`failure`."""
        try:
            yield
        except FatalError as exc:
            self._fatal = exc
            raise

    @property
    def last_result(self) -> GenerationResult | None:
        """The result of the last stream this thread finished (None while one runs)."""
        return getattr(self._local, "result", None)

    # -- the lock -------------------------------------------------------------------------
    def _enter(self, what: str, need_open: bool = True, wait: bool = True) -> bool:
        """Take the runner; False (nothing taken) when ``wait`` is False and another call holds it."""
        if self._owner is threading.current_thread():
            raise NexusRTError(f"LLM.{what}() was called from the thread that holds an open stream of this LLM; "
                               "finish or close() that stream first")
        if not self._acquire(wait):
            return False
        self._owner = threading.current_thread()
        if need_open and self.runner is None:
            self._leave()
            raise _closed(what)
        return True

    @property
    def _engine_only(self) -> bool:
        """Every call goes through the engine (CUDA, deterministic)."""
        return self.deterministic and self.backend == "cuda"

    def _engine_loop(self, what: str):
        with self._loop_lock:
            if self._closing or self.runner is None:
                raise _closed(what)
            if self._loop is None:
                with self._watch():
                    self._loop = make_loop(self.runner, self.backend, *self._serving_args,
                                           deterministic=self._engine_only, kv_gpu_budget=self._kv_gpu_budget)
            return self._loop

    def submit(self, prompt, max_new_tokens: int = 128, temperature: float | None = None, top_k: int | None = None,
               top_p: float | None = None, stop=None, seed: int | None = None, *, emit=None, on_end=None,
               **kv) -> Request:
        """Queue one prompt (text, a list of chat messages, a list of token ids taken as they are, or
        an :class:`~nexusrt.engine.context.Context`) in the serving engine and return its
        :class:`~nexusrt.engine.requests.Request` (``result()``, ``cancel()``).

        ``emit(text)`` gets the text as it is produced (on the engine's thread, except the
        last piece, which ``result()`` flushes); ``on_end(request)`` is called once when it ends;
        either must be a callable or None. An empty list is refused (no message, no id).
        Raises ValueError for bad arguments (TypeError as well for one of the wrong type), all
        checked before the serving engine is started, ``serving.QueueFull`` when the queue is full.
        """
        return self.prepare(prompt, max_new_tokens, temperature, top_k, top_p, stop, seed, emit=emit,
                            on_end=on_end, **kv).submit()

    def prepare(self, prompt, max_new_tokens: int = 128, temperature: float | None = None, top_k: int | None = None,
                top_p: float | None = None, stop=None, seed: int | None = None, *, emit=None, on_end=None,
                **kv) -> Request:
        """:meth:`submit` without the queueing: the checked, tokenized request (``request.seq``), for
        a caller with rules of its own (a server refusing prompt + max_tokens beyond the context)."""
        check_callback(emit, "emit")
        check_callback(on_end, "on_end")
        shaped = request_prompt(prompt, self.tokenizer, kv)
        return self._request("prepare", shaped, max_new_tokens, temperature, top_k, top_p, stop, seed, emit, on_end)

    def _request(self, what, prompt, max_new_tokens, temperature, top_k, top_p, stop, seed, emit, on_end) -> Request:
        runner = self.runner
        if self._closing or runner is None:
            raise _closed(what)
        prompt, policy = (prompt.prompt, prompt.policy) if isinstance(prompt, Pruned) else (prompt, None)
        # The arguments are checked (and the prompt tokenized) before the engine's loop, its
        # thread and its pool are made: a refused call starts nothing.
        session, ids, params, extra = start_session(self.model, runner.max_context, prompt, max_new_tokens,
                                                    temperature, top_k, top_p, stop, seed,
                                                    emit or (lambda piece: None))
        loop = self._engine_loop(what)
        return Request(loop, session, ids, params, session.max_new_tokens, runner.max_context,
                       lambda s, p: self._finish(s, p, extra), on_end, policy)

    @property
    def engine(self):
        """The serving engine's :class:`~nexusrt.serving.EngineLoop` (started here if needed)."""
        return self._engine_loop("engine")

    def _acquire(self, wait: bool) -> bool:
        """The runner's lock. While waiting, a lock held by a thread that has exited (a stream it
        left suspended, never finished or closed) is taken back by closing that stream."""
        if not wait:
            return self._lock.acquire(blocking=False)
        while not self._lock.acquire(timeout=0.5):
            owner = self._owner
            if owner is not None and not owner.is_alive():
                for gen in list(self._streams):
                    if gen.gi_frame is not None and not gen.gi_running:
                        gen.close()  # its finally releases the lock
        return True

    def _leave(self) -> None:
        self._owner = None
        self._lock.release()

    # -- generation -----------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 128, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, stop=None, seed: int | None = None,
                 chat: bool = False, system: str | None = None, **kv):
        """Generate for one prompt (returns a :class:`GenerationResult`) or a list (returns a list).

        ``temperature``/``top_k``/``top_p`` default to generation_config.json (greedy when
        it does not sample); ``stop`` is a string or list of strings; ``chat`` renders the
        prompt as one user message with the tokenizer's chat template, after a system
        message ``system`` when given (``system`` implies ``chat``). A prompt may be an
        :class:`~nexusrt.engine.context.Context` (budget-checked; its report: ``result.context``).
        KV pruning (through the serving engine; on CUDA ``sink-window`` only): ``kv_policy`` (``full``,
        ``sink-window``, ``h2o``), ``kv_budget`` (tokens kept), ``kv_sinks`` (leading tokens always kept, default 4),
        ``kv_window`` (h2o: the newest tokens always kept, default ``kv_budget // 2 - kv_sinks // 2``;
        sink-window's is ``kv_budget - kv_sinks``), ``kv_protect`` (context layers never evicted);
        see :mod:`nexusrt.serving.pruning`. ``result.kv`` reports it.

        A list is a batch of prompts: an empty one gives an empty list (its arguments are
        still checked). A chat needs a message: use :meth:`chat` for a list of messages.
        """
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
        shaped = [prompt_for(p, chat, system, self.tokenizer, kv) for p in prompts]  # all checked before any runs
        args = (max_new_tokens, temperature, top_k, top_p, stop, seed)
        if not prompts:  # nothing to run, but a bad argument is refused as it is with prompts
            check_generation(self.model, *args)
            prompt_for("", chat, system, self.tokenizer, {k: v for k, v in kv.items() if k != "kv_protect"})
            return []
        if (isinstance(prompt, (list, tuple)) or self._engine_only
                or any(isinstance(p, Pruned) for p in shaped)):
            out = self._generate_batched("generate", shaped, *args)  # pruning needs the engine
            return out if isinstance(prompt, (list, tuple)) else out[0]
        if not self._enter("generate", wait=False):
            return self._generate_batched("generate", shaped[:1], *args)[0]
        try:
            out = [self._generate_one(p, *args) for p in shaped]
        finally:
            self._leave()
        return out if isinstance(prompt, (list, tuple)) else out[0]

    def chat(self, messages: list[dict], max_new_tokens: int = 128, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, stop=None, seed: int | None = None,
             system: str | None = None) -> GenerationResult:
        """The assistant's reply to ``messages`` (``[{"role": ..., "content": ...}]``), rendered with
        the chat template; ``system`` is put first when given. An empty ``messages`` is refused."""
        messages = chat_messages(messages, system, "messages")  # checked before the runner is taken
        if self._engine_only or not self._enter("chat", wait=False):
            return self._generate_batched("chat", [messages], max_new_tokens, temperature,
                                          top_k, top_p, stop, seed)[0]
        try:
            return self._generate_one(messages, max_new_tokens, temperature, top_k, top_p, stop, seed)
        finally:
            self._leave()

    def _generate_batched(self, what, prompts, max_new_tokens, temperature, top_k, top_p, stop, seed):
        # Every prompt is checked before any is queued; a failure while queueing cancels the rest.
        return run_all([self._request(what, p, max_new_tokens, temperature, top_k, top_p, stop, seed, None, None)
                        for p in prompts])

    def _generate_one(self, prompt, max_new_tokens, temperature, top_k, top_p, stop, seed) -> GenerationResult:
        pieces: list[str] = []
        session, ids, params, extra = self._start(prompt, max_new_tokens, temperature, top_k, top_p, stop,
                                                  seed, pieces.append)
        with self._watch():
            self.runner.generate_tokens(ids, session.max_new_tokens, params, session.on_token)
        return self._finish(session, params, extra)

    def stream(self, prompt, max_new_tokens: int = 128, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, stop=None, seed: int | None = None,
               chat: bool = False, system: str | None = None, **kv) -> Iterator[str]:
        """Yield text pieces as tokens are produced; afterwards ``self.last_result`` holds the
        :class:`GenerationResult` for this thread (same arguments as :meth:`generate`, one prompt)."""
        shaped = prompt_for(prompt, chat, system, self.tokenizer, kv)
        return self._tracked(self._stream("stream", shaped, max_new_tokens, temperature, top_k, top_p, stop, seed))

    def stream_chat(self, messages: list[dict], max_new_tokens: int = 128, temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None, stop=None, seed: int | None = None,
                    system: str | None = None) -> Iterator[str]:
        """:meth:`chat`, streamed as :meth:`stream` does."""
        messages = chat_messages(messages, system, "messages")
        return self._tracked(self._stream("stream_chat", messages, max_new_tokens, temperature, top_k, top_p, stop,
                                          seed))

    def _tracked(self, gen):
        self._streams.add(gen)
        return gen

    def _stream(self, what, prompt, max_new_tokens, temperature, top_k, top_p, stop, seed) -> Iterator[str]:
        # The lock is taken at the first next(), inside the generator: a stream that is never
        # iterated holds nothing, and one that is started releases in its finally (exhausted,
        # closed or collected). A stream that finds the runner busy runs in the serving engine.
        if isinstance(prompt, Pruned) or self._engine_only or not self._enter(what, wait=False):
            self._local.result = None
            self._local.result = yield from engine_stream(
                lambda emit, on_end: self._request(what, prompt, max_new_tokens, temperature, top_k, top_p, stop,
                                                   seed, emit, on_end))
            return
        try:
            self._local.result = None
            pieces: list[str] = []
            started = self._start(prompt, max_new_tokens, temperature, top_k, top_p, stop, seed, pieces.append)
        except BaseException:
            self._leave()
            raise
        yield from self._stream_body(started, pieces)

    def _stream_body(self, started, pieces) -> Iterator[str]:
        session, ids, params, extra = started
        try:
            with self._watch():
                yield from stream_tokens(self.runner, session, ids, session.max_new_tokens, params, pieces)
            self._local.result = self._finish(session, params, extra)
            yield from pieces
        finally:
            self._leave()

    def _start(self, prompt, max_new_tokens, temperature, top_k, top_p, stop, seed, emit):
        return start_session(self.model, self.runner.max_context, prompt, max_new_tokens, temperature, top_k,
                             top_p, stop, seed, emit)

    def _finish(self, session: Session, params: SamplingParams, extra: dict) -> GenerationResult:
        full = session.prompt_tokens + len(session.token_ids) > self.runner.max_context
        result = session.finish(full, params.seed, extra)
        tiers = self.runner.kv_tiers() if hasattr(self.runner, "kv_tiers") else None
        result.kv = one_sequence_report(result.prompt_tokens, len(result.token_ids), tiers)  # Request: the engine's
        return result

    def close(self) -> None:
        """Release the runner and the weights (the runtime stays up); waits for a running call.

        Safe to call twice; any later call on this LLM raises NexusRTError.
        """
        if getattr(self, "runner", None) is None:
            return
        if self._owner is threading.current_thread():  # refused before anything is stopped: nothing half closed
            raise NexusRTError("LLM.close() was called from the thread that holds an open stream of this LLM; "
                               "finish or close() that stream first")
        with self._loop_lock:  # no new engine loop may start once close() has taken this one
            self._closing = True
            loop, self._loop = self._loop, None
        if loop is not None:  # its requests end as cancelled; their callers get Cancelled
            if not loop.stop(timeout=CLOSE_WARN_S):  # the pools must outlive the step that runs on them
                log.warning("closing the LLM: the serving engine's step has run for over %g s; waiting for it",
                            CLOSE_WARN_S)
                loop.stop(timeout=None)
            loop.engine.runner.close()  # the batch runner's pools and graphs (before the weights)
        self._enter("close", need_open=False)  # a generation in another thread finishes first
        try:
            runner, self.runner = self.runner, None
            if runner is not None:  # another thread's close() may have come first
                runner.close()
                self.model.weights.close()
        finally:
            self._leave()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

