"""``nrt.LLM``'s requests through the serving engine: submit, wait, stream, cancel.

The LLM builds a :class:`~nexusrt.engine.session.Session` per prompt as for its one-sequence
path; here the session's ``on_token`` runs on the engine's thread as the batch produces ids,
and :meth:`Request.result` finishes it on the caller's thread. Because the CPU decoder is
batch invariant, a request's ids are the ones the one-sequence path gives.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import replace
from typing import Callable, Iterator

from ..backends.cpu.batch import CpuBatchRunner, blocks_for_bytes, cpu_block_bytes
from ..errors import BackendUnavailable, InvalidArgument, InvalidArgumentType, NexusRTError
from ..kvcache.blocks import blocks_for
from ..kvcache.tiers import KvBudgetError, block_bytes, mem_available
from ..reference.sampling import SamplingParams
from ..serving import Engine, EngineLoop, KvPolicy, QueueFull, SchedulerConfig, Sequence, State
from .fit import cpu_available
from .kv import report
from .session import GenerationResult, Session

DEFAULT_KV_MEMORY = 256 << 20  # bytes of fp32 KV blocks on the CPU (np.zeros: committed as written)


class Cancelled(NexusRTError):
    """The request was cancelled (by its caller, or because the LLM closed)."""


CUDA_TOKEN_BUDGET = 2048  # ids per step on the GPU: prompt chunks big enough for tensor cores
FIXED_CHUNK = 512  # deterministic mode: prompt chunks end at multiples of this


def serving_config(max_batch, kv_memory, max_waiting) -> tuple[int, int | None, int]:
    """Check the LLM's serving arguments: (max_batch, KV bytes or None for the backend's
    default, the queue bound)."""
    if kv_memory is not None and (isinstance(kv_memory, bool) or not isinstance(kv_memory, int) or kv_memory <= 0):
        raise InvalidArgument("kv_memory", f"kv_memory must be a positive number of bytes, got {kv_memory!r}")
    if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 1:
        raise InvalidArgument("max_waiting", f"max_waiting must be an integer >= 1, got {max_waiting!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise InvalidArgument("max_batch", f"max_batch must be an integer >= 1, got {max_batch!r}")
    return max_batch, kv_memory, max_waiting


def check_kv_memory(config, backend: str, kv_memory: int | None, available: int | None = None) -> None:
    """Refuse a ``kv_memory`` (bytes of the serving engine's KV pool, checked by
    :func:`serving_config`) that cannot work for this model: below one KV block of the backend
    (fp32 on the CPU, bf16 on CUDA) or, on the CPU, more than ``available`` bytes (default
    :func:`~nexusrt.engine.fit.cpu_available`, the bound the model's fit check uses: NumPy would
    take the pool lazily and the machine would swap or kill the process mid-request). ``nrt.LLM`` calls it before it builds its runner, so a bad value fails
    there, not at the first call that starts the engine. None (the backend's default) passes."""
    if kv_memory is None:
        return
    unit = (cpu_block_bytes(config) if backend == "cpu"
            else block_bytes(config.num_hidden_layers, config.num_key_value_heads, config.head_dim))
    if kv_memory // unit < 1:
        raise InvalidArgument("kv_memory", f"kv_memory={kv_memory} bytes holds no KV block ({unit} bytes on "
                                           f"{backend}) of this model")
    if backend != "cpu":
        return
    if available is None:
        available = cpu_available()[0]
    if kv_memory > available:
        raise InvalidArgument("kv_memory", f"kv_memory={kv_memory} bytes is more than this machine's available "
                                           f"memory ({available} bytes)")


def check_callback(fn, argument: str) -> None:
    """A callback argument (``emit``, ``on_end``) must be callable or None."""
    if fn is not None and not callable(fn):
        raise InvalidArgumentType(argument, f"{argument} must be a callable or None, got {type(fn).__name__}")


def engine_tiers(config, max_batch: int, max_context: int, kv_memory: int | None, kv_gpu_budget: int | None,
                 available: int | None = None) -> tuple[int, int]:
    """The CUDA engine's KV blocks: ``(on the device, on the host tier)``.

    The device pool is ``kv_memory`` bytes, by default room for ``max_batch`` sequences at full
    context; ``kv_gpu_budget`` caps it. With a budget, the host tier (pinned; preempted
    sequences are swapped there instead of recomputed, :mod:`nexusrt.serving.swap`) holds what
    those sequences could need beyond the device pool, at most half of ``available`` bytes
    (default ``MemAvailable``) so that pinning it never starves the machine (the runner pins it
    as swaps first reach it, :mod:`nexusrt.backends.cuda.host_swap`). A budget below one block
    is refused, as is a ``kv_memory`` below one block."""
    unit = block_bytes(config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
    demand = max_batch * blocks_for(max_context)
    device = demand if kv_memory is None else int(kv_memory) // unit
    if device < 1:
        raise ValueError(f"kv_memory={kv_memory} bytes holds no KV block ({unit} bytes) of this model")
    if kv_gpu_budget is None:
        return device, 0
    if kv_gpu_budget // unit < 1:
        raise KvBudgetError(f"kv_gpu_budget {kv_gpu_budget} bytes holds no KV block ({unit} bytes) of this model")
    device = min(device, kv_gpu_budget // unit)
    avail = mem_available() if available is None else int(available)
    return device, min(max(demand - device, 0), avail // 2 // unit)


def cpu_pool_bytes(config, max_context: int) -> int:
    """The CPU engine's default KV pool: 256 MiB, or one whole context where that is more (so a
    request the one-sequence path takes alone also fits the engine, whatever runs beside it), at
    most half the available memory then (the pool is committed only as blocks are written)."""
    one = blocks_for(max_context) * cpu_block_bytes(config)
    if one <= DEFAULT_KV_MEMORY:
        return DEFAULT_KV_MEMORY
    try:
        avail = mem_available()
    except OSError:  # not Linux: no figure to bound it by
        return one
    return max(DEFAULT_KV_MEMORY, min(one, avail // 2))


def make_loop(runner, backend: str, max_batch: int, kv_memory: int | None, max_waiting: int,
              deterministic: bool = False, kv_gpu_budget: int | None = None) -> EngineLoop:
    """An :class:`EngineLoop` over the batch runner of ``runner``'s backend, sharing its weights
    (arguments as :func:`serving_config` returns them). On CUDA, ``deterministic`` makes a
    request's ids independent of the batch around it (the CPU engine always is); a runner that
    makes its own batch runner (``batch_runner``: the tensor-parallel workers' ``ProcessRunner``)
    gives it, else it is a ``CudaBatchRunner`` over the runner's weights, with the host tier
    :func:`engine_tiers` plans from ``kv_gpu_budget``."""
    if backend == "cpu":  # the CpuRunner's NumPy decoder, fp32 KV
        # An explicit kv_memory was checked when the LLM was made; the default (and memory
        # taken since) is checked here, as the pool is made.
        kv = cpu_pool_bytes(runner.config, runner.max_context) if kv_memory is None else kv_memory
        check_kv_memory(runner.config, backend, kv)
        num_blocks = blocks_for_bytes(runner.config, kv)
        config = SchedulerConfig(max_running=max_batch, token_budget=max(512, max_batch))
        return EngineLoop(Engine(CpuBatchRunner(runner.decoder, num_blocks, runner.max_context), config),
                          max_waiting=max_waiting)
    from ..backends.cuda.batch import CudaBatchRunner

    num_blocks, host_blocks = engine_tiers(runner.config, max_batch, runner.max_context, kv_memory, kv_gpu_budget)
    budget = max(CUDA_TOKEN_BUDGET, max_batch + (FIXED_CHUNK if deterministic else 0))
    config = SchedulerConfig(max_running=max_batch, token_budget=budget,
                             fixed_chunks=FIXED_CHUNK if deterministic else 0)
    # Tensor-parallel workers make their own (one CudaBatchRunner per rank, ProcessRunner.batch_runner);
    # each rank's pool then holds its own KV heads of every block, so kv_memory is the whole model's.
    make = getattr(runner, "batch_runner", None)
    if make is not None:
        if host_blocks:
            raise BackendUnavailable("kv_gpu_budget with tensor_parallel > 1: the host tier is not wired through the ranks")
        batch = make(num_blocks, max_batch, max_chunk=budget, deterministic=deterministic)
    else:
        batch = CudaBatchRunner(runner, num_blocks, max_batch, max_chunk=budget, deterministic=deterministic,
                                host_blocks=host_blocks)
    try:  # prefix caching reuses KV computed in another request's chunking: off when deterministic
        return EngineLoop(Engine(batch, config, prefix_caching=not deterministic), max_waiting=max_waiting)
    except BaseException:
        batch.close()
        raise


class Request:
    """One prompt in the engine. ``on_end`` (engine thread) is called once when it ends."""

    def __init__(self, loop: EngineLoop, session: Session, ids, params: SamplingParams, max_new_tokens: int,
                 max_context: int, finish: Callable[[Session, SamplingParams], GenerationResult],
                 on_end: Callable[["Request"], None] | None = None, kv: KvPolicy | None = None):
        self.loop, self.session, self._finish, self._on_end = loop, session, finish, on_end
        self.ended = threading.Event()
        self.seq = Sequence(ids, params, max_new_tokens, max_context,
                            on_token=lambda seq, token: session.on_token(token), on_finish=self._ended, kv=kv)
        self._result: GenerationResult | None = None

    @property
    def submitted(self) -> bool:
        """Whether the engine loop has taken it (:attr:`Sequence.queued`, set by ``EngineLoop.submit``)."""
        return self.seq.queued

    def _ended(self, seq) -> None:
        self.ended.set()
        if self._on_end is not None:
            self._on_end(self)

    def limit_new_tokens(self, n: int) -> "Request":
        """Generate at most ``n`` tokens (before :meth:`submit`): a caller that fits the length to the
        prompt once it is tokenized (a server's default max_tokens) need not tokenize it again."""
        if self.submitted:
            raise NexusRTError("limit_new_tokens() after the request was submitted")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.seq.max_new_tokens:
            raise ValueError(f"limit_new_tokens takes 1..{self.seq.max_new_tokens}, got {n!r}")
        self.seq.max_new_tokens = self.session.max_new_tokens = n
        return self

    def sibling(self, seed: int | None = None, emit: Callable[[str], None] | None = None,
                on_end: Callable[["Request"], None] | None = None) -> "Request":
        """Another request for the same prompt, not tokenized again: the same ids, limits, stop rules,
        sampling and KV policy, with ``seed`` (None: a random one) and callbacks of its own. A
        server's ``n`` choices; the engine's prefix cache computes their shared prompt blocks once."""
        check_callback(emit, "emit")
        check_callback(on_end, "on_end")
        params = replace(self.seq.params, seed=seed).resolved()  # seed checked here
        seq = self.seq
        other = Request(self.loop, self.session.fresh(emit or (lambda piece: None)), seq.prompt_ids, params,
                        seq.max_new_tokens, seq.max_context, self._finish, on_end, seq.kv)
        other.seq.group = seq.group  # one request's choices: admitted fairly against other requests
        return other

    def check(self) -> "Request":
        """Raise what :meth:`submit` would for a request the engine can never hold (its pool,
        its policy), without queueing it: a caller with several requests checks all first."""
        self.loop.engine.check(self.seq)
        return self

    def submit(self) -> "Request":
        """Queue it in the engine (once; a request cancelled before it was submitted is refused)."""
        if self.ended.is_set():
            raise NexusRTError(f"this request has ended ({self.seq.finish_reason}); prepare a new one")
        if self.submitted:
            raise NexusRTError("this request was submitted already; prepare a new one (or sibling() it)")
        self.loop.submit(self.seq)
        return self

    def cancel(self) -> None:
        """Stop generating and free the request's KV blocks (at the engine's next step). A request
        not yet submitted just ends, cancelled, without reaching the engine."""
        if not self.submitted:
            if not self.ended.is_set():
                self.seq.state, self.seq.finish_reason = State.CANCELLED, "cancelled"
                self._ended(self.seq)
            return
        self.loop.cancel(self.seq)

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the end; the :class:`GenerationResult`, or the error that ended it."""
        if not self.submitted and not self.ended.is_set():
            raise NexusRTError("result() of a request that was never submitted: call submit() first")
        if not self.ended.wait(timeout):
            raise TimeoutError(f"the request did not finish within {timeout} s")
        if self.seq.finish_reason == "error":
            raise self.seq.error
        if self.seq.finish_reason == "cancelled":
            raise Cancelled("the request was cancelled")
        if self._result is None:
            self._result = self._finish(self.session, self.seq.params)
            seq = self.seq
            self._result.kv = report(seq.kv, seq.kv_kept, seq.evicted_total, seq.peak_blocks,
                                     preemptions=seq.preemptions, swaps=seq.swaps)
        return self._result


def run_all(requests: list[Request]) -> list[GenerationResult]:
    """Submit every request and wait for their results; a failure while queueing cancels the rest.
    More requests than the engine's queue holds go in as the earlier ones end (a list longer than
    ``max_waiting`` failed every time with "retry later"); only a queue full of other callers'
    requests, with none of these left in it, is :class:`~nexusrt.serving.QueueFull`."""
    queued = []
    try:
        for r in requests:
            while True:
                try:
                    queued.append(r.submit())
                    break
                except QueueFull:
                    pending = [q for q in queued if not q.ended.is_set()]
                    if not pending:
                        raise
                    pending[0].ended.wait(timeout=1.0)
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
