"""One request as the engine sees it: its ids, its state, its KV block table, its stop rules.

A sequence's ids are ``prompt_ids + output_ids``; the first ``num_computed`` of them have
their K and V in the cache. Every step computes some of the rest (a prefill chunk, or the
one id sampled last: a decode) and, once all are computed, samples the next id from the
last row. So chunked prefill, decode and recompute after preemption are one rule.

The sampling step of output id ``i`` is ``i``: the request's draws depend on its seed and
its own position only, never on the batch around it or on being preempted.
"""

from __future__ import annotations

import enum
import itertools
import time
from typing import Callable

import numpy as np

from ..reference.sampling import SamplingParams
from .pruning import KvPolicy

OnToken = Callable[["Sequence", int], bool]
"""Called on the engine's thread with each new id; returns True to stop the sequence."""
OnFinish = Callable[["Sequence"], None]
"""Called on the engine's thread once, when the sequence ends (finished, cancelled or failed)."""

_ids = itertools.count()


class State(enum.Enum):
    WAITING = "waiting"  # queued, or preempted: waiting to recompute, or swapped out (host_table)
    RUNNING = "running"  # holds KV blocks and is scheduled each step
    FINISHED = "finished"  # ended by a stop rule or an error (see finish_reason / error)
    CANCELLED = "cancelled"  # ended by its client


class Sequence:
    """The engine's state of one request.

    ``max_new_tokens`` and ``max_context`` are length limits; ``on_token`` applies the
    caller's other stop rules (EOS ids, stop strings). ``finish_reason`` is ``length``,
    ``context`` (the cache is full), ``stop`` (``on_token`` returned True), ``cancelled``
    or ``error`` (then ``error`` holds the exception).
    """

    def __init__(self, prompt_ids, params: SamplingParams, max_new_tokens: int, max_context: int,
                 on_token: OnToken | None = None, on_finish: OnFinish | None = None, kv: KvPolicy | None = None):
        if not prompt_ids:
            raise ValueError("a sequence needs at least one prompt id")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if len(prompt_ids) > max_context:
            raise ValueError(f"the prompt is {len(prompt_ids)} tokens but the context holds {max_context}")
        self.seq_id = next(_ids)
        self.group = self.seq_id  # sequences of one request (a server's n choices) share it: fair admission
        self.queued = False  # handed to an engine loop (once: EngineLoop.submit refuses a second time)
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.output_ids: list[int] = []
        self.params = params.resolved()
        self.max_new_tokens, self.max_context = max_new_tokens, max_context
        self.on_token, self.on_finish = on_token, on_finish
        self.state = State.WAITING
        self.block_table: list[int] = []
        self.host_table: list[int] = []  # swapped out: host blocks holding its filled blocks (serving.swap)
        self.block_keys: list[bytes] = []  # prefix-cache keys of the leading full blocks of all_ids (BlockManager)
        self.num_keyed = 0  # leading blocks of block_table already offered to the prefix cache
        self.num_computed = 0  # ids whose K/V are in the cache
        self.num_cached = 0  # prompt ids found in the prefix cache (not computed) at the last admission
        self.preemptions = 0
        self.swaps = 0  # preemptions that kept its KV on the host tier (no recompute)
        self.kv = kv or KvPolicy()
        self.evicted_total = 0  # tokens pruned over the sequence's life (across preemptions)
        self.peak_blocks = 0
        self.kv_kept = 0  # tokens in its cache when it ended (Engine.end)
        self.reset_kv()
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.t_arrival = time.perf_counter()
        self.t_first: float | None = None  # first output id
        self.t_last: float | None = None

    def reset_kv(self) -> None:
        """Forget the pruned cache's state (the sequence lost its blocks: ended or preempted)."""
        self.evicted = 0  # ids computed but pruned from the cache: id i (i >= evicted) sits in a slot < i
        self.kv_positions = np.zeros(0, np.int64)  # pruning policies: the position of each filled slot
        self.kv_scores = np.zeros(0, np.float64) if self.kv.policy == "h2o" else None

    def extend_kv(self, count: int) -> None:
        """Record the positions (and zero scores) of the ``count`` ids about to be computed, and of
        any slots filled from the prefix cache at admission (never pruned yet: slot == position)."""
        if not self.kv.prunes:
            return
        new = np.arange(len(self.kv_positions) + self.evicted, self.num_computed + count)
        self.kv_positions = np.concatenate([self.kv_positions, new])
        if self.kv_scores is not None:
            self.kv_scores = np.concatenate([self.kv_scores, np.zeros(len(new))])

    @property
    def num_slots(self) -> int:
        """Cache slots filled: the computed ids not pruned."""
        return self.num_computed - self.evicted

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def ids(self, start: int, count: int) -> list[int]:
        """``all_ids[start:start+count]`` without building all of it (a decode step wants one id)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p:start - p + count]
        if start + count <= p:
            return self.prompt_ids[start:start + count]
        return self.prompt_ids[start:] + self.output_ids[:start + count - p]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Ids still to compute before the next sample."""
        return len(self) - self.num_computed

    @property
    def is_decode(self) -> bool:
        """Past its prompt, with exactly the id sampled last left to compute."""
        return bool(self.output_ids) and self.num_pending == 1

    @property
    def done(self) -> bool:
        return self.state in (State.FINISHED, State.CANCELLED)

    @property
    def step(self) -> int:
        """The sampling step of the next output id."""
        return len(self.output_ids)

    def append(self, token: int) -> bool:
        """Record a sampled id; True when a stop rule ends the sequence (``finish_reason`` set)."""
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.output_ids.append(int(token))
        if self.on_token is not None and self.on_token(self, int(token)):
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.max_new_tokens:
            self.finish_reason = "length"
        elif len(self) > self.max_context:  # the id just sampled would have no room in the cache
            self.finish_reason = "context"
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id}, {self.state.value}, prompt={len(self.prompt_ids)}, "
                f"out={len(self.output_ids)}, computed={self.num_computed}, blocks={len(self.block_table)})")
