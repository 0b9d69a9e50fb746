"""Which sequences compute which ids in the next step: continuous batching with chunked prefill.

Each step, under a budget of ``token_budget`` ids: first every running decode (one id each,
oldest first), then the running sequences still in their prompt (a chunk each: as much as
the budget and the free blocks allow), then waiting sequences are admitted (prefix-cache hits
first, then a chunk) while fewer than ``max_running`` run: preempted ones first, the others in
arrival order round-robin across requests (a server request's ``n`` choices share a
``Sequence.group``; :meth:`Scheduler._admission_order`), so one request's many choices do not
hold back every request behind them. One whose next uncached block another running sequence
is computing waits for it (see :meth:`BlockManager.blocked`): a shared prompt is computed once.

**Preemption by recompute.** When a running sequence needs a block and none is free, the
newest running sequence not yet scheduled this step gives its blocks back and returns to
the front of the queue with ``num_computed = 0``; when it is admitted again it recomputes
its prompt and the ids it had generated (blocks it had filled may still be in the prefix
cache). Its sampled ids are kept and its sampling steps continue, so its output is the one
it would have had without preemption (a sequence under a pruning policy recomputes in
chunks and prunes again, so its cache, and the ids after the preemption, may differ: pruning
is lossy). The oldest running sequence always makes progress:
the engine refuses a request that would not fit in the pool alone.

**Preemption by swap** (with a host tier, ``swap``: :mod:`.swap`): a victim whose filled blocks
fit in the free host blocks keeps them there instead, and when it is admitted again (before
any other waiting sequence: it is at the front) it gets fresh device blocks, the runner copies
its host blocks back, and it goes on from where it stopped: nothing is recomputed, and its
cache (pruned or not) is the one it had.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..kvcache.blocks import BLOCK_SIZE
from .block_manager import BlockManager
from .sequence import Sequence, State
from .swap import HostSwap


@dataclass(frozen=True)
class SchedulerConfig:
    """``max_running``: cap on sequences holding KV; ``token_budget``: ids computed per step
    (at least ``max_running``, so every running decode fits in one step)."""

    max_running: int = 32
    token_budget: int = 512
    fixed_chunks: int = 0  # > 0: prompt chunks end only at multiples of it (or the prompt's end)

    def __post_init__(self):
        for name in ("max_running", "token_budget"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.token_budget < self.max_running:
            raise ValueError(f"token_budget ({self.token_budget}) must be >= max_running ({self.max_running}) "
                             "so that every running decode fits in a step")
        f = self.fixed_chunks
        if isinstance(f, bool) or not isinstance(f, int) or f < 0:
            raise ValueError(f"fixed_chunks must be an integer >= 0, got {f!r}")
        if f and self.token_budget < f + self.max_running:
            raise ValueError(f"token_budget ({self.token_budget}) must be >= fixed_chunks + max_running "
                             f"({f + self.max_running}) so that a whole chunk fits beside the decodes")


@dataclass(frozen=True)
class Work:
    """``seq`` computes ``all_ids[start:start+count]`` this step (and samples if that completes it)."""

    seq: Sequence
    start: int
    count: int

    @property
    def samples(self) -> bool:
        return self.start + self.count == len(self.seq)


class Scheduler:
    """The waiting queue and the running set over a :class:`BlockManager`."""

    def __init__(self, blocks: BlockManager, config: SchedulerConfig = SchedulerConfig(),
                 swap: HostSwap | None = None):
        self.blocks, self.config, self.swap = blocks, config, swap
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the newest
        self.preemptions = 0  # by recompute or by swap
        # Where a pruned sequence's prompt chunks end (multiples of it): the largest chunk that
        # always fits beside a full set of decodes, so it waits at most one step for budget.
        self.pruned_chunk = max(1, config.token_budget - config.max_running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.state = State.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out of the queue or the running set and free its blocks (it ended)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        if self.swap is not None:
            self.swap.drop(seq)

    def schedule(self) -> list[Work]:
        """The next step's work; admits, and preempts when blocks run out."""
        work: list[Work] = []
        scheduled: set[int] = set()
        budget = self.config.token_budget
        for decodes in (True, False):
            for seq in list(self.running):
                if seq.state is not State.RUNNING or seq.is_decode != decodes or budget == 0:
                    continue
                room = self._make_room(seq, scheduled)
                if room == 0:
                    continue  # seq itself was preempted
                n = self._count(seq, budget, room)
                if n == 0:
                    continue  # a fixed chunk does not fit this step
                work.append(self._take(seq, n, scheduled))
                budget -= n
        for seq in self._admission_order():
            if budget == 0 or len(self.running) >= self.config.max_running:
                break
            if seq.host_table:  # swapped out: its blocks come back from the host tier
                n = self._swap_in(seq, budget)
                if n == 0:
                    break
            else:
                if self.blocks.blocked(seq):  # its prefix is being computed: share it next step instead
                    continue
                counted = self.blocks.lookups, self.blocks.hits
                self.blocks.admit(seq)
                n = self._count(seq, budget, self._room(seq))
                if n == 0:  # no free block (or room for the fixed chunk): wait (a trial admission counts no lookup)
                    self.blocks.free(seq)
                    self.blocks.lookups, self.blocks.hits = counted
                    break
            self.waiting.remove(seq)
            seq.state = State.RUNNING
            self.running.append(seq)
            self.blocks.reserve(seq)
            work.append(self._take(seq, n, scheduled))
            budget -= n
        return work

    def _admission_order(self) -> list[Sequence]:
        """The waiting sequences in the order they are offered a place: the preempted first (at the
        queue's front, in its order), then the others round-robin across their requests' groups
        (a server request's ``n`` choices are one group): the i-th waiting sequence of a group
        with r running comes at round r + i, ties by arrival. So a request behind another's 64
        choices gets the next free place instead of waiting for all 64 to finish."""
        if len({s.group for s in self.waiting}) <= 1:  # one group (the usual case): the queue's order
            return list(self.waiting)  # (preemption puts a sequence back at the front)
        front = [s for s in self.waiting if s.preemptions or s.host_table]
        running = {}
        for s in self.running:
            running[s.group] = running.get(s.group, 0) + 1
        seen: dict[int, int] = {}
        keyed = []
        for pos, s in enumerate(self.waiting):
            if s.preemptions or s.host_table:
                continue
            rank = seen.get(s.group, 0)
            seen[s.group] = rank + 1
            keyed.append((running.get(s.group, 0) + rank, pos, s))
        return front + [s for _, _, s in sorted(keyed, key=lambda k: k[:2])]

    def cut(self, seq: Sequence) -> int:
        """Where ``seq``'s prompt chunks end (multiples of it; 0: wherever the budget leaves off), so
        also the most ids it computes in a step: ``fixed_chunks``, or :attr:`pruned_chunk` for a
        sequence under a pruning policy."""
        return self.config.fixed_chunks or (self.pruned_chunk if seq.kv.prunes else 0)

    def _count(self, seq: Sequence, budget: int, room: int) -> int:
        """Ids ``seq`` computes this step: all it has pending, as far as budget and blocks allow;
        with ``fixed_chunks``, up to the next multiple of it and only whole (else 0: it waits for
        budget), so a prompt is cut at the same places whatever else runs (batch invariance;
        short of blocks it takes what fits, as preemption does, and the cut may then differ). A
        sequence under a pruning policy is always cut so (at :attr:`pruned_chunk`): it is pruned
        after every step, so where its prompt is cut decides which tokens it keeps."""
        f = self.cut(seq)
        if not f or seq.is_decode:
            return min(seq.num_pending, budget, room)
        want = min(seq.num_pending, f - seq.num_computed % f)
        return min(want, room) if want <= budget else 0

    def _room(self, seq: Sequence) -> int:
        """Ids ``seq`` can compute with its blocks plus the free ones (a pruned sequence's ids fill
        cache slots from ``num_slots``, below their positions)."""
        capacity = (len(seq.block_table) + self.blocks.num_free) * BLOCK_SIZE
        return max(0, capacity - seq.num_slots)

    def _make_room(self, seq: Sequence, scheduled: set[int]) -> int:
        """Preempt the newest unscheduled running sequences until ``seq`` can compute one id."""
        while self._room(seq) == 0:
            victims = [s for s in self.running if s.seq_id not in scheduled]
            victim = victims[-1]  # seq itself is unscheduled, so there is one
            self._preempt(victim)
            if victim is seq:
                return 0
        return self._room(seq)

    def _swap_in(self, seq: Sequence, budget: int) -> int:
        """Give swapped-out ``seq`` fresh device blocks for its filled slots and owe the copies
        back, when they and room for its next ids fit now: the ids it computes this step (0:
        nothing taken, it waits)."""
        counted = self.blocks.lookups, self.blocks.hits
        shared = self.blocks.share_cached(seq, seq.num_slots // BLOCK_SIZE)  # still in the prefix cache
        n = 0
        if self.blocks.can_grow(seq, seq.num_slots):
            self.blocks.grow(seq, seq.num_slots)
            n = self._count(seq, budget, self._room(seq))
        if n == 0:  # it waits: a trial counts no lookup
            self.blocks.release(seq)
            self.blocks.lookups, self.blocks.hits = counted
            return 0
        self.swap.into(seq, skip=shared)
        return n

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if self.swap is not None and self.swap.fits(seq):
            self.swap.out(seq)  # owes the copies of its filled blocks, taken by the engine this step
            self.blocks.release(seq)
            seq.swaps += 1
        else:
            self.blocks.free(seq)
        seq.state = State.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _take(self, seq: Sequence, n: int, scheduled: set[int]) -> Work:
        self.blocks.grow(seq, seq.num_slots + n)
        scheduled.add(seq.seq_id)
        return Work(seq, seq.num_computed, n)
