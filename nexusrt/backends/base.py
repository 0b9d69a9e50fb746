"""The interface the engine drives: one model, one sequence, a KV cache, logits and sampling.

Two implementations: ``backends.cpu.model.CpuRunner`` (NumPy, the oracle) and the CUDA
runner (``backends.cuda.runner.CudaRunner``, constructed as
``CudaRunner(model: LoadedModel, runtime, max_context=None)``).

State: the cache holds ``position`` tokens (positions ``0..position-1``); ``prefill``
and ``decode`` append to it and leave the logits of the last appended token for
``last_logits`` / ``sample``. ``reset`` empties it.

Sampling is the runner's so a GPU can sample without copying logits to the host; the
algorithm is fixed by :mod:`nexusrt.reference.sampling` (both backends give the same ids).

Generation is the runner's too: the engine drives every runner through
:meth:`ModelRunner.generate_tokens` alone. The CPU runner implements it with the reference
loop (:func:`generate_tokens` below, built on the step methods); the CUDA runner with the
whole decode loop on the device. Both must report the ids the reference loop would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import numpy as np

OnToken = Callable[[int], bool]
"""Called with each generated id in order; returns True to stop. After it returns True,
or after ``max_new_tokens`` ids, the runner calls it no more."""


@runtime_checkable
class ModelRunner(Protocol):
    config: object  # nexusrt.models.ModelConfig
    position: int  # tokens in the KV cache
    max_context: int  # most tokens the cache can hold

    def reset(self) -> None:
        """Forget the sequence (the cache becomes empty; its memory is kept)."""

    def prefill(self, token_ids: np.ndarray) -> None:
        """Append ``token_ids`` (int32 ``[T]``, T >= 1) in one pass."""

    def decode(self, token_id: int) -> None:
        """Append one token."""

    def last_logits(self) -> np.ndarray:
        """fp32 ``[vocab]`` logits after the last appended token (a host copy)."""

    def forward_all(self, token_ids: np.ndarray) -> np.ndarray:
        """Reset, run ``token_ids`` teacher-forced, return fp32 ``[T, vocab]`` (for tests)."""

    def sample(self, params, step: int) -> int:
        """Sample the next id from the last logits (``params``: SamplingParams, ``step``: 0-based)."""

    def generate_tokens(self, prompt_ids, max_new_tokens: int, params, on_token: OnToken) -> int:
        """Reset, prefill ``prompt_ids`` and generate, reporting each id to ``on_token``; returns
        the ids reported. The meaning is :func:`generate_tokens`; it may be called from a worker
        thread (the engine streams that way), so it makes its device context current itself."""

    def close(self) -> None:
        """Release weights and cache; the runner is unusable afterwards."""


def iter_tokens(runner: ModelRunner, prompt_ids, max_new_tokens: int, params):
    """The reference generation loop as a generator: reset, prefill, then sample / yield / decode.

    Yields at most ``max_new_tokens`` ids; stops early when the cache is full (the last
    id sampled is yielded but never fed). Closing the generator stops the loop.
    """
    runner.reset()
    runner.prefill(np.asarray(prompt_ids, dtype=np.int32))
    for step in range(max_new_tokens):
        token = runner.sample(params, step)
        yield token
        if step + 1 == max_new_tokens or runner.position >= runner.max_context:
            return
        runner.decode(token)


def generate_tokens(runner: ModelRunner, prompt_ids, max_new_tokens: int, params, on_token: OnToken) -> int:
    """:func:`iter_tokens` driven by a callback: the meaning of :meth:`ModelRunner.generate_tokens`.

    Reports each id to ``on_token`` and stops when it returns True. Returns the ids reported.
    """
    n = 0
    for token in iter_tokens(runner, prompt_ids, max_new_tokens, params):
        n += 1
        if on_token(token):
            break
    return n


@dataclass
class Rows:
    """One sequence's share of a batched step: ``token_ids`` at positions ``start ..`` through
    its KV block ``table`` (the physical block of each logical block, :mod:`nexusrt.kvcache`)."""

    token_ids: np.ndarray  # int32 [T], T >= 1
    start: int  # cache slots 0 .. start-1 are filled already; the rows go to slots start ..
    table: list[int]
    logits: bool = False  # whether the step returns the logits of the last row
    position: int | None = None  # RoPE position of the first row (None: start; differs once KV is pruned)
    scores: np.ndarray | None = None  # float64 [>= start+T]: attention mass per slot, added to in place
    params: object = None  # SamplingParams of the next id (run_tokens; None: greedy)
    step: int = 0  # 0-based index of the id being sampled (the seeded draw's counter)

    @property
    def first_position(self) -> int:
        """The RoPE position of the first row: ``position``, or the cache slot ``start`` when unset
        (they differ once KV pruning evicted some of the sequence's tokens)."""
        return self.start if self.position is None else int(self.position)


def sample_rows(batch: list[Rows], logits: list) -> list[int | None]:
    """The next id of each entry with logits, by :func:`nexusrt.reference.sampling.sample` with the
    entry's own ``params`` and ``step`` (the meaning of :meth:`BatchRunner.run_tokens`)."""
    from ..reference.sampling import SamplingParams, sample

    return [None if row is None else sample(row, r.params or SamplingParams(), r.step)
            for r, row in zip(batch, logits)]


@runtime_checkable
class BatchRunner(Protocol):
    """A runner of many sequences at once over one KV block pool (the serving engine drives it).

    The engine owns the pool's bookkeeping (which sequence holds which block); the runner
    owns the pools' memory and computes. A sequence's tokens must come out the same whatever
    else is in the batch (``tests/test_cpu_batch.py``).
    """

    config: object
    max_context: int  # most tokens one sequence may hold
    num_blocks: int  # KV blocks in the pool
    prune_policies: frozenset  # the KV pruning policies besides "full" it runs (compact(); h2o: Rows.scores too)

    def run(self, batch: list[Rows]) -> list[np.ndarray | None]:
        """Append each :class:`Rows` to its sequence's cache; fp32 ``[vocab]`` logits of the last
        row for each entry with ``logits`` set, None for the others."""

    def run_tokens(self, batch: list[Rows]) -> list[int | None]:
        """:meth:`run`, then the next id of each entry with ``logits`` set, sampled with its
        ``params`` at its ``step`` (:func:`sample_rows`; a GPU picks on the device, same ids)."""

    def compact(self, table: list[int], keep) -> None:
        """Move the K/V of cache slots ``keep`` (ascending) to slots ``0 .. len(keep)-1`` of ``table``
        in every layer (KV pruning; the engine then frees the blocks past the kept tokens)."""

    # Optional, a host tier (``host_blocks`` > 0): the engine then preempts by swap (serving.swap).
    # ``swap_blocks(outs, ins)`` copies (device, host) pairs out, then (host, device) pairs back in,
    # every layer's K and V, ordered before the next step's work.

    def close(self) -> None:
        """Release the pools (the weights belong to whoever gave them)."""
