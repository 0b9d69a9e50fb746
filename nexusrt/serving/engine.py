"""The request engine: one step = schedule, run the batch, sample, apply stop rules, free blocks.

Pure logic over a :class:`~nexusrt.backends.base.BatchRunner`; not thread safe (the
:class:`~nexusrt.serving.loop.EngineLoop` runs it on one thread). Sampling is
:func:`nexusrt.reference.sampling.sample` with the request's seed at its own step (the runner picks: :meth:`BatchRunner.run_tokens`), so a
request's ids do not depend on the batch around it.

A sequence ends exactly once, through :meth:`Engine.end`, which frees its blocks and calls
its ``on_finish``: after a stop rule, a cancel, or an error of the runner or of its own
callback. An error of one step ends the sequences of that step, never the engine.

A runner with a host tier (``host_blocks`` > 0 and ``swap_blocks``) makes preemption swap a
victim's blocks to the host instead of recomputing them (:mod:`.swap`); the step issues the
copies it owes before its work.
"""

from __future__ import annotations

import numpy as np

from ..backends.base import BatchRunner, Rows
from ..errors import FatalError, InvalidArgument, RequestTooLarge
from ..kvcache.blocks import BLOCK_SIZE, blocks_for
from .block_manager import BlockManager
from .metrics import EngineMetrics
from .pruning import prune
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence, State
from .swap import HostSwap


class Engine:
    """Sequences in, ids out, over ``runner``'s block pool."""

    def __init__(self, runner: BatchRunner, config: SchedulerConfig = SchedulerConfig(),
                 prefix_caching: bool = True):
        self.runner = runner
        self.blocks = BlockManager(runner.num_blocks, prefix_caching)
        host = getattr(runner, "host_blocks", 0)
        self.swap = HostSwap(host) if host else None
        self.scheduler = Scheduler(self.blocks, config, self.swap)
        self.metrics = EngineMetrics()

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def check(self, seq: Sequence) -> None:
        """ValueError unless ``seq`` fits this engine alone (then it can always finish)."""
        if seq.kv.prunes and seq.kv.policy not in self.runner.prune_policies:
            others = "".join(f" or {p!r}" for p in sorted(self.runner.prune_policies))
            why = " (h2o ranks tokens by attention scores, which this runner's attention does not add up)" \
                if seq.kv.policy == "h2o" else ""
            raise InvalidArgument("kv_policy", f"kv_policy={seq.kv.policy!r} is not available on this backend's "
                                               f"runner{why}; use kv_policy='full'{others}, or the CPU backend, "
                                               "which runs every policy")
        if seq.max_context > self.runner.max_context:
            raise ValueError(f"the sequence's context {seq.max_context} exceeds the runner's {self.runner.max_context}")
        longest = min(len(seq.prompt_ids) + seq.max_new_tokens, seq.max_context)
        if seq.kv.prunes:  # pruned back to the budget after every step, so a step adds at most a chunk
            longest = min(longest, seq.kv.budget + (self.scheduler.cut(seq) or self.scheduler.config.token_budget))
        if blocks_for(longest) > self.blocks.num_blocks:
            raise RequestTooLarge(f"{longest} tokens ({len(seq.prompt_ids)} in the prompt, up to {seq.max_new_tokens} "
                                  f"to generate) need {blocks_for(longest)} KV blocks; the pool has "
                                  f"{self.blocks.num_blocks} (raise the KV memory, or ask for fewer tokens)",
                                  longest, self.blocks.num_blocks * BLOCK_SIZE)

    def add(self, seq: Sequence) -> None:
        self.check(seq)
        self.scheduler.add(seq)

    def end(self, seq: Sequence, state: State, reason: str, error: BaseException | None = None) -> None:
        """End ``seq`` (once): free its blocks, record it, call its ``on_finish``."""
        if seq.done:
            return
        seq.kv_kept = seq.num_slots  # what its cache held, before remove() frees it
        self.scheduler.remove(seq)
        seq.state, seq.finish_reason, seq.error = state, reason, error
        m = self.metrics
        m.requests[reason] += 1
        m.prompt_tokens += len(seq.prompt_ids)
        m.generation_tokens += len(seq.output_ids)
        if seq.t_first is not None:
            m.ttft.observe(seq.t_first - seq.t_arrival)
            if len(seq.output_ids) > 1:
                m.tpot.observe((seq.t_last - seq.t_first) / (len(seq.output_ids) - 1))
        if seq.on_finish is not None:
            try:
                seq.on_finish(seq)
            except BaseException:  # the caller's problem (SystemExit too); the blocks are back, the engine goes on
                m.callback_errors += 1

    def cancel(self, seq: Sequence) -> None:
        self.end(seq, State.CANCELLED, "cancelled")

    def step(self) -> int:
        """Run one step; returns the ids computed (0: nothing to do)."""
        work = self.scheduler.schedule()
        if self.swap is not None and not self._swap():
            work = [w for w in work if not w.seq.done]
        if not work:
            return 0
        for w in work:
            w.seq.extend_kv(w.count)
        batch = [Rows(np.asarray(w.seq.ids(w.start, w.count), np.int32), w.start - w.seq.evicted,
                      list(w.seq.block_table), w.samples, position=w.start, scores=w.seq.kv_scores,
                      params=w.seq.params, step=w.seq.step) for w in work]
        try:
            tokens = self.runner.run_tokens(batch)
        except FatalError:  # the runner can never step again: the loop stops and fails every sequence
            raise
        except Exception as exc:  # the step's sequences end with the error; the engine goes on
            for w in work:
                self.end(w.seq, State.FINISHED, "error", exc)
            return 0
        self.metrics.steps += 1
        for w, token in zip(work, tokens):
            seq = w.seq
            seq.num_computed += w.count
            self.metrics.computed_tokens += w.count
            self.blocks.commit(seq)
            if seq.kv.prunes and not self._prune(seq):
                continue
            if not w.samples:
                continue
            try:
                stop = seq.append(token)
            except BaseException as exc:  # the caller's on_token failed (SystemExit too): only this sequence ends
                self.end(seq, State.FINISHED, "error", exc)
                continue
            if stop:
                self.end(seq, State.FINISHED, seq.finish_reason)
        return sum(w.count for w in work)

    def _swap(self) -> bool:
        """Issue the copies this step's preemptions and admissions owe (outs, then ins); False
        when they failed: the sequences swapped in end with the error (their blocks hold no
        KV), those swapped out will recompute (theirs may not have reached the host)."""
        outs, ins, swapped_out, swapped_in = self.swap.take()
        if not outs and not ins:
            return True
        try:
            self.runner.swap_blocks(outs, ins)
        except FatalError:
            raise
        except Exception as exc:
            for seq in swapped_in:
                self.end(seq, State.FINISHED, "error", exc)
            for seq in swapped_out:
                if not seq.done and seq.host_table:
                    self.swap.drop(seq)
                    self.blocks.free(seq)  # it holds no device block: this forgets what it computed
            return False
        return True

    def _prune(self, seq: Sequence) -> bool:
        """Evict ``seq``'s cache down to its budget (compact the kept slots, free the blocks past
        them); False when that failed (the sequence ended with the error)."""
        table = list(seq.block_table)
        try:
            seq.kv_positions, seq.kv_scores, dropped = prune(seq.kv, seq.kv_positions, seq.kv_scores,
                                                             lambda keep: self.runner.compact(table, keep))
        except FatalError:
            raise
        except Exception as exc:
            self.end(seq, State.FINISHED, "error", exc)
            return False
        seq.evicted += dropped
        seq.evicted_total += dropped
        self.metrics.kv_evicted += dropped
        self.blocks.shrink(seq, seq.num_slots)
        return True

    def run_until_done(self) -> None:
        """Step until no sequence waits or runs (single-threaded use and tests)."""
        while self.has_work:
            self.step()
