"""``nrt.LLM``: load a model, generate or stream text.

>>> import nexusrt as nrt
>>> llm = nrt.LLM("synthetic:tiny")                  # or an HF checkpoint directory
>>> r = llm.generate("Hello", max_new_tokens=16, temperature=0)
>>> r.text, r.token_ids, r.ttft_s, r.tokens_per_s
>>> for piece in llm.stream("Hello", max_new_tokens=16):
...     print(piece, end="")
>>> llm.chat([{"role": "user", "content": "Hi"}], system="Be brief.").text

Threads: one ``LLM`` runs one sequence at a time. Calls from several threads are
serialised by a lock (each gets exactly the result it would get alone); a ``stream`` holds
the lock until it is exhausted or closed.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterator

from .. import runtime as runtime_mod
from ..errors import BackendUnavailable, NexusRTError
from ..models.loader import LoadedModel, load_model
from ..reference.sampling import SamplingParams
from .fit import check_fit
from .session import GenerationResult, Session

BACKENDS = ("cpu", "cuda")


def _make_runner(model: LoadedModel, backend: str, max_context: int | None):
    # Each branch checks the fit before reading a byte of weights, not when the machine runs out.
    name = str(model.path or model.name)
    if backend == "cpu":
        from ..backends.cpu.model import CpuRunner

        check_fit(model.config, backend, max_context, name)
        return CpuRunner(model.weights, max_context)
    rt = runtime_mod.current("the CUDA runner")
    if not rt.is_cuda:
        raise BackendUnavailable(f"backend='cuda' needs the runtime booted on CUDA, but it runs on {rt.backend} "
                                 f"({rt.probe_reason or 'no reason given'}); use backend='cpu'")
    from ..backends.cuda.runner import CudaRunner

    check_fit(model.config, backend, max_context, name)
    return CudaRunner(model, rt, max_context=max_context)


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

    Thread safety: the runner holds one sequence, so calls are serialised by a lock: from
    several threads, each call waits for the one before and gets the result it would get
    alone. A :meth:`stream` holds the lock from its first piece until it is exhausted or
    closed; calling the LLM again from the thread that holds an open stream is an error
    (it would wait for itself). After :meth:`close`, every call raises NexusRTError.
    """

    def __init__(self, path_or_name, backend: str | None = None, *, max_context: int | None = None,
                 weights_seed: int = 0, allow_paths=()):
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None, got {backend!r}")
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread that holds the lock
        self._local = threading.local()  # last_result is per thread: another thread's stream must not replace it
        self.runner = None
        t0 = time.perf_counter()
        if not runtime_mod.is_initialized():
            from .. import firmware

            firmware.init(backend=backend)
        self.backend = backend or runtime_mod.current("nrt.LLM").backend
        self.model = load_model(path_or_name, seed=weights_seed, allow_paths=allow_paths)
        try:
            self.runner = _make_runner(self.model, self.backend, max_context)
        except BaseException:
            self.model.weights.close()  # nothing half-loaded stays behind
            raise
        self.tokenizer = self.model.tokenizer
        self.load_s = time.perf_counter() - t0

    @property
    def config(self):
        return self.model.config

    @property
    def last_result(self) -> GenerationResult | None:
        """The result of the last stream this thread finished (None while one runs)."""
        return getattr(self._local, "result", None)

    # -- the lock -------------------------------------------------------------------------
    def _enter(self, what: str, need_open: bool = True) -> None:
        if self._owner == threading.get_ident():
            raise NexusRTError(f"LLM.{what}() was called from the thread that holds an open stream of this LLM; "
                               "finish or close() that stream first")
        self._lock.acquire()
        self._owner = threading.get_ident()
        if need_open and self.runner is None:
            self._leave()
            raise NexusRTError(f"LLM.{what}() after close(): this LLM released its model; create a new nrt.LLM")

    def _leave(self) -> None:
        self._owner = None
        self._lock.release()

    # -- generation -----------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 128, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, stop=None, seed: int | None = None,
                 chat: bool = False, system: str | None = None):
        """Generate for one prompt (returns a :class:`GenerationResult`) or a list (returns a list).

        ``temperature``/``top_k``/``top_p`` default to generation_config.json (greedy when
        it does not sample); ``stop`` is a string or list of strings; ``chat`` renders the
        prompt as one user message with the tokenizer's chat template, after a system
        message ``system`` when given (``system`` implies ``chat``).
        """
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
        self._enter("generate")
        try:
            out = [self._generate_one(_messages(p, chat, system), max_new_tokens, temperature, top_k, top_p,
                                      stop, seed) for p in prompts]
        finally:
            self._leave()
        return out if isinstance(prompt, (list, tuple)) else out[0]

    def chat(self, messages: list[dict], max_new_tokens: int = 128, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, stop=None, seed: int | None = None,
             system: str | None = None) -> GenerationResult:
        """The assistant's reply to ``messages`` (``[{"role": ..., "content": ...}]``), rendered with
        the chat template; ``system`` is put first when given."""
        self._enter("chat")
        try:
            return self._generate_one(_chat_messages(messages, system), max_new_tokens, temperature, top_k,
                                      top_p, stop, seed)
        finally:
            self._leave()

    def _generate_one(self, prompt, max_new_tokens, temperature, top_k, top_p, stop, seed) -> GenerationResult:
        pieces: list[str] = []
        session, ids, params, extra = self._start(prompt, max_new_tokens, temperature, top_k, top_p, stop,
                                                  seed, pieces.append)
        self.runner.generate_tokens(ids, max_new_tokens, params, session.on_token)
        return self._finish(session, params, extra)

    def stream(self, prompt: str, max_new_tokens: int = 128, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, stop=None, seed: int | None = None,
               chat: bool = False, system: str | None = None) -> Iterator[str]:
        """Yield text pieces as tokens are produced; afterwards ``self.last_result`` holds the
        :class:`GenerationResult` for this thread (same arguments as :meth:`generate`, one prompt)."""
        return self._stream("stream", _messages(prompt, chat, system), max_new_tokens, temperature, top_k,
                            top_p, stop, seed)

    def stream_chat(self, messages: list[dict], max_new_tokens: int = 128, temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None, stop=None, seed: int | None = None,
                    system: str | None = None) -> Iterator[str]:
        """:meth:`chat`, streamed as :meth:`stream` does."""
        return self._stream("stream_chat", _chat_messages(messages, system), max_new_tokens, temperature,
                            top_k, top_p, stop, seed)

    def _stream(self, what, prompt, max_new_tokens, temperature, top_k, top_p, stop, seed) -> Iterator[str]:
        # The lock is taken at the first next(), inside the generator: a stream that is never
        # iterated holds nothing, and one that is started releases in its finally (exhausted,
        # closed or collected).
        self._enter(what)
        try:
            self._local.result = None
            pieces: list[str] = []
            started = self._start(prompt, max_new_tokens, temperature, top_k, top_p, stop, seed, pieces.append)
        except BaseException:
            self._leave()
            raise
        yield from self._stream_body(started, max_new_tokens, pieces)

    def _stream_body(self, started, max_new_tokens, pieces) -> Iterator[str]:
        session, ids, params, extra = started
        try:
            yield from self._stream_tokens(self.runner, session, ids, max_new_tokens, params, pieces)
            self._local.result = self._finish(session, params, extra)
            yield from pieces
        finally:
            self._leave()

    @staticmethod
    def _stream_tokens(runner, session, ids, max_new_tokens, params, pieces):
        """Run the runner's callback-style ``generate_tokens`` in a worker thread, yielding as ids arrive."""
        q: queue.Queue = queue.Queue()
        cancelled = threading.Event()

        def on_token(token):
            done = session.on_token(token) or cancelled.is_set()
            q.put(("text", list(pieces)))
            pieces.clear()
            return done

        def work():
            try:
                runner.generate_tokens(ids, max_new_tokens, params, on_token)
                q.put(("end", None))
            except BaseException as exc:  # re-raised in the consumer
                q.put(("error", exc))

        worker = threading.Thread(target=work, name="nexusrt-generate", daemon=True)
        worker.start()
        try:
            while True:
                kind, value = q.get()
                if kind == "error":
                    raise value
                if kind == "end":
                    break
                yield from value
        finally:
            cancelled.set()
            worker.join()

    def _start(self, prompt, max_new_tokens, temperature, top_k, top_p, stop, seed, emit):
        """Check the arguments, tokenize; ``prompt`` is text or a list of chat messages."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) for s in stops):
            raise TypeError("stop must be a string or a list of strings")
        for s in stops:
            _check_text(s, "a stop string")
        gen = self.model.generation
        params = SamplingParams(
            temperature=gen.temperature if temperature is None else temperature,
            top_k=gen.top_k if top_k is None else top_k,
            top_p=gen.top_p if top_p is None else top_p,
            seed=seed).resolved()
        t0 = time.perf_counter()
        if isinstance(prompt, list):
            ids = self.tokenizer.encode_chat(prompt)
        else:
            ids = self.tokenizer.encode(prompt)
        tokenize_s = time.perf_counter() - t0
        if not ids:
            raise ValueError("the prompt encodes to no tokens (empty prompt and no BOS token)")
        limit = self.runner.max_context
        if len(ids) > limit:
            raise ValueError(f"the prompt is {len(ids)} tokens but the context holds {limit} "
                             f"(max_position_embeddings in {self.config.source}, or max_context)")
        session = Session(self.tokenizer, self.model.eos_token_ids, stops, len(ids), emit, max_new_tokens)
        return session, ids, params, {"tokenize_s": tokenize_s}

    def _finish(self, session: Session, params: SamplingParams, extra: dict) -> GenerationResult:
        full = session.prompt_tokens + len(session.token_ids) > self.runner.max_context
        return session.finish(full, params.seed, extra)

    def close(self) -> None:
        """Release the runner and the weights (the runtime stays up); waits for a running call.

        Safe to call twice; any later call on this LLM raises NexusRTError.
        """
        if getattr(self, "runner", None) is None:
            return
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


def _check_text(text: str, what: str) -> None:
    """Text from outside (argv, a file) may carry lone surrogates for invalid UTF-8 bytes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid UTF-8 text (position {exc.start}: {text[exc.start:exc.end]!r})") from None


def _messages(prompt, chat: bool, system: str | None):
    """The text prompt, or with ``chat``/``system`` the messages to render."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    _check_text(prompt, "the prompt")
    if not chat and system is None:
        return prompt
    return _chat_messages([{"role": "user", "content": prompt}], system)


def _chat_messages(messages, system: str | None) -> list[dict]:
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise TypeError("messages must be a list of {'role': str, 'content': str} dicts")
    for i, m in enumerate(messages):
        _check_text(m["content"], f"message {i}")
    if system is not None:
        if not isinstance(system, str):
            raise TypeError(f"system must be a string, got {type(system).__name__}")
        _check_text(system, "the system prompt")
        messages = [{"role": "system", "content": system}] + list(messages)
    return messages
