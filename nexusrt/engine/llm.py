"""``nrt.LLM``: load a model, generate or stream text.

>>> import nexusrt as nrt
>>> llm = nrt.LLM("synthetic:tiny")                  # or an HF checkpoint directory
>>> r = llm.generate("Hello", max_new_tokens=16, temperature=0)
>>> r.text, r.token_ids, r.ttft_s, r.tokens_per_s
>>> for piece in llm.stream("Hello", max_new_tokens=16):
...     print(piece, end="")
"""

from __future__ import annotations

import queue
import threading
import time
from functools import partial
from typing import Iterator

from .. import runtime as runtime_mod
from ..backends.base import generate_tokens, iter_tokens
from ..errors import BackendUnavailable
from ..models.loader import LoadedModel, load_model
from .fit import check_fit
from .sampling import SamplingParams
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
    try:
        from ..backends.cuda.runner import CudaRunner
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("nexusrt.backends.cuda"):
            raise BackendUnavailable("the CUDA model runner (nexusrt.backends.cuda.runner) is not in this "
                                     "build yet; use backend='cpu'") from None
        raise
    check_fit(model.config, backend, max_context, name)
    return CudaRunner(model, rt, max_context=max_context)


class LLM:
    """A loaded model and its runner.

    Parameters
    ----------
    path_or_name : checkpoint directory or ``synthetic:<preset>`` (tiny, llama-3.2-1b, llama-3.1-8b).
    backend : ``"cpu"`` or ``"cuda"``; default: the running runtime's (booted here if needed).
    max_context : cap on the KV cache, below the model's ``max_position_embeddings``.
    weights_seed : seed of synthetic weights (ignored for checkpoints).
    """

    def __init__(self, path_or_name, backend: str | None = None, *, max_context: int | None = None,
                 weights_seed: int = 0):
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None, got {backend!r}")
        t0 = time.perf_counter()
        if not runtime_mod.is_initialized():
            from .. import firmware

            firmware.init(backend=backend)
        self.backend = backend or runtime_mod.current("nrt.LLM").backend
        self.model = load_model(path_or_name, seed=weights_seed)
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

    def generate(self, prompt, max_new_tokens: int = 128, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, stop=None, seed: int | None = None,
                 chat: bool = False):
        """Generate for one prompt (returns a :class:`GenerationResult`) or a list (returns a list).

        ``temperature``/``top_k``/``top_p`` default to generation_config.json (greedy when
        it does not sample); ``stop`` is a string or list of strings; ``chat`` renders the
        prompt as one user message with the tokenizer's chat template.
        """
        if isinstance(prompt, (list, tuple)):
            return [self.generate(p, max_new_tokens, temperature, top_k, top_p, stop, seed, chat) for p in prompt]
        pieces: list[str] = []
        session, ids, params, extra = self._start(prompt, max_new_tokens, temperature, top_k, top_p, stop,
                                                  seed, chat, pieces.append)
        fast = getattr(self.runner, "generate_tokens", None)
        run = fast if fast is not None else partial(generate_tokens, self.runner)
        run(ids, max_new_tokens, params, session.on_token)
        return self._finish(session, params, extra)

    def stream(self, prompt: str, max_new_tokens: int = 128, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, stop=None, seed: int | None = None,
               chat: bool = False) -> Iterator[str]:
        """Yield text pieces as tokens are produced; afterwards ``self.last_result`` holds the
        :class:`GenerationResult` (same arguments as :meth:`generate`, one prompt)."""
        self.last_result = None
        pieces: list[str] = []
        session, ids, params, extra = self._start(prompt, max_new_tokens, temperature, top_k, top_p, stop,
                                                  seed, chat, pieces.append)
        fast = getattr(self.runner, "generate_tokens", None)
        if fast is None:
            tokens = iter_tokens(self.runner, ids, max_new_tokens, params)
            try:
                for token in tokens:
                    done = session.on_token(token)
                    yield from pieces
                    pieces.clear()
                    if done:
                        break
            finally:
                tokens.close()
        else:
            yield from self._stream_fast(fast, session, ids, max_new_tokens, params, pieces)
        self.last_result = self._finish(session, params, extra)
        yield from pieces

    @staticmethod
    def _stream_fast(fast, session, ids, max_new_tokens, params, pieces):
        """Run a runner's callback-style fast path in a worker thread, yielding as ids arrive."""
        q: queue.Queue = queue.Queue()
        cancelled = threading.Event()

        def on_token(token):
            done = session.on_token(token) or cancelled.is_set()
            q.put(("text", list(pieces)))
            pieces.clear()
            return done

        def work():
            try:
                fast(ids, max_new_tokens, params, on_token)
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

    def _start(self, prompt, max_new_tokens, temperature, top_k, top_p, stop, seed, chat, emit):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) for s in stops):
            raise TypeError("stop must be a string or a list of strings")
        gen = self.model.generation
        params = SamplingParams(
            temperature=gen.temperature if temperature is None else temperature,
            top_k=gen.top_k if top_k is None else top_k,
            top_p=gen.top_p if top_p is None else top_p,
            seed=seed).resolved()
        t0 = time.perf_counter()
        if chat:
            ids = self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
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
        """Release the runner and the weights (the runtime stays up)."""
        runner, self.runner = getattr(self, "runner", None), None
        if runner is not None:
            runner.close()
            self.model.weights.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
