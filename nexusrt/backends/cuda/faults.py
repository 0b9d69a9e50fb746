"""The fault ring's drain on the device: between decode steps the one-sequence runner calls
:meth:`FaultService.service`, which never waits for the compute stream.

Each call finishes what the last one started and starts the next (:mod:`nexusrt.kvcache.fault_plan`
decides, this module issues), all on the ``control`` stream (the highest priority):

1. a snapshot: the control stream waits for the compute stream's work so far, then copies the
   ring's words into a pinned mirror; the next call drains the mirror once that copy is done
   (the ring is read while later steps still post: the drain rule stops at a claimed slot whose
   id has not landed, and the drain alone writes ``tail``, so a racing read loses nothing);
2. for the drained ids (and for a prefetch's blocks, :meth:`FaultService.prefetch`: the
   sequence's oldest sealed host blocks moved ahead of any post, no ring slot), on the control
   stream behind the compute stream's work so far: EMPTY
   into the consumed slots then the new ``tail`` (slots free for producers again), per move a
   host-to-device copy of the block's K and V in every layer (a run of consecutive blocks is one
   copy), then its table entry (a kernel reads either ``~h``, still valid, or the filled device
   block), then ``requested[h] = 0``, or, once the reserve is exhausted, ``requested = 1`` for
   every host block (parked: nothing can move, so no kernel posts again). Each of these is one
   driver call per run of consecutive words (:func:`~nexusrt.kvcache.fault_plan.spans`; the
   consumed slots are at most two runs), not one per block: a service is a handful of calls;
3. a moved host block returns to the host tier only after the compute stream has passed an
   event recorded once the table writes were seen complete, so no kernel still reads it.

Once nothing can move (:attr:`~nexusrt.kvcache.fault_plan.FaultDrain.exhausted`: no table entry
names a host block, or the reserve is full) and nothing is pending, a call does nothing: no
event, no stream wait, no snapshot copy. The two events a call uses are made once and
re-recorded (a stream wait or a query binds the event's latest record at the time it is made,
so re-recording after that changes nothing already queued); a move's event is reused from
step 3 to the next move.

:meth:`quiesce` waits for the control stream: the runner calls it before a new sequence's
prefill writes blocks a pending copy could still read, and before freeing the pools.
"""

from __future__ import annotations

import numpy as np

from ... import memory
from ...driver.calls import call
from ...driver.streams import Event
from ...kvcache.fault_plan import FaultDrain, spans
from ...kvcache.fault_ring import EMPTY, ENTRIES, TAIL
from ...kvcache.tiers import block_bytes

TAG = "kv_fault"


class FaultService:
    """The drain of ``buffers.fault_ring`` for a runner whose device pools hold
    ``reserve_blocks`` free blocks after the sequence's own; ``compute`` is the runner's stream."""

    def __init__(self, rt, cfg, buffers, reserve_blocks: int, compute):
        ring = buffers.fault_ring
        self.rt, self.b, self.ring, self.compute = rt, buffers, ring, compute
        self.control = rt.streams["control"]
        self.layer_block_bytes = buffers.k_host_pools[0].nbytes // ring.layout.host_blocks  # one layer's K (or V)
        self.drain = FaultDrain.for_sequence(ring.layout, buffers.block_table.to_numpy().reshape(-1), reserve_blocks,
                                             block_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim))
        self.mirror = self.table_stage = self._mark = self._copied = None
        self._snapshot = False  # a snapshot copy queued, its event _copied not yet seen done
        self._table_done: list[tuple[Event, list[int]]] = []  # table writes issued, host blocks moved
        self._passed: list[tuple[Event, list[int]]] = []  # the compute stream's mark after them
        self._spare: list[Event] = []  # move events whose host blocks went back, for the next move
        try:
            self.mirror = memory.pinned((ENTRIES + ring.layout.capacity,), "int32", tag=TAG)
            # The table's new entries are staged here and copied a run at a time. A staged word is
            # written once only (a moved entry never changes again, see _stage), so a copy still in
            # flight never reads a word that changed after it was queued.
            self.table_stage = memory.pinned((self.drain.table.size,), "int32", tag=TAG)
            self.table_stage.array[:] = self.drain.table
            self._mark = Event(rt.backend, timing=False)  # the compute stream's work so far (_behind_compute)
            self._copied = Event(rt.backend, timing=False)  # the snapshot copy done
        except BaseException:
            self.free()
            raise

    # -- the calls between steps ------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """Nothing can move any more and no work of this service is pending on the device."""
        return self.drain.exhausted and not (self._snapshot or self._table_done or self._passed)

    def service(self, written_tokens: int) -> None:
        """Drain the last snapshot if its copy is done (moving sealed blocks below
        ``written_tokens``, the cache length the steps enqueued so far write), then take the next;
        nothing once :attr:`idle`."""
        if self.idle:
            return
        self._retire()
        if self._snapshot:
            if not self._copied.query():
                return
            self._snapshot = False
            # The mirror is drained in place: the next copy into it is queued only below.
            self._issue(self.drain.service(self.mirror.array, written_tokens))
        if self.drain.exhausted:  # the last moves are retired by later calls; no more snapshots
            return
        self._behind_compute()
        call("cuMemcpyDtoHAsync", self.mirror.ptr, self.ring.words.ptr, self.mirror.nbytes, self.control.handle)
        self._copied.record(self.control)
        self._snapshot = True

    def prefetch(self, written_tokens: int) -> None:
        """Move the sealed host blocks below ``written_tokens`` into the reserve now, the oldest
        first, as far as it has room (:meth:`FaultDrain.prefetch`): the runner calls it once a
        prefill has filled them, so the first decode step reads them from HBM, not zero-copy."""
        if self.drain.exhausted:
            return
        self._retire()
        self._issue(self.drain.prefetch(written_tokens))

    def flush(self, written_tokens: int, rounds: int = 3) -> None:
        """Service until what the finished steps posted is moved and retired (tests, reports)."""
        self.compute.synchronize()
        for _ in range(rounds):
            self.service(written_tokens)
            self.control.synchronize()
        self._retire()
        self.compute.synchronize()
        self._retire()

    def quiesce(self) -> None:
        self.control.synchronize()
        self._retire()

    def counts(self) -> dict:
        return {**self.drain.counts.report(),
                "blocks_reserve_free": self.drain.pool.device.num_free, "host_entries": self.drain.host_entries}

    def free(self) -> None:
        """Wait for the control stream, then destroy every event and free the pinned buffers, all
        of them even when one step fails (the first failure is raised after)."""
        events = [self._mark, self._copied, *self._spare, *(e for e, _ in self._table_done + self._passed)]
        self._mark = self._copied = None
        self._snapshot, self._table_done, self._passed, self._spare = False, [], [], []
        steps = [self.control.synchronize] + [ev.destroy for ev in events if ev is not None] + \
                [t.free for t in (self.mirror, self.table_stage) if t is not None]
        self.mirror = self.table_stage = None
        failure = None
        for step in steps:
            try:
                step()
            except BaseException as exc:  # noqa: BLE001 - freed anyway, raised below
                failure = failure or exc
        if failure is not None:
            raise failure

    # -- the device work --------------------------------------------------------------------
    def _behind_compute(self) -> None:
        """Hold the control stream's next work until the compute stream's work so far is done."""
        self._mark.record(self.compute)
        self._mark.wait_by(self.control)

    def _fill(self, word: int, value: int, count: int = 1) -> None:
        """Ring words ``word .. word + count - 1`` set to ``value``, in control-stream order."""
        call("cuMemsetD32Async", self.ring.words.ptr + 4 * word, int(value) & 0xFFFFFFFF, count, self.control.handle)

    def _stage(self, writes) -> list[tuple[int, int]]:
        """Put the table writes ``(index, device block)`` into the pinned stage; their index runs."""
        if not writes:
            return []
        index, device = np.array(writes, dtype=np.int64).T
        stage = self.table_stage.array
        if (stage[index] >= 0).any():  # the stage's no-rewrite rule: a copy in flight may read these words
            raise RuntimeError(f"fault service: table entries {index[stage[index] >= 0].tolist()} name device "
                               f"blocks already; a moved entry must never be written again")
        stage[index] = device
        return spans(index)

    def _issue(self, plan) -> None:
        if not plan.slots and not plan.moves:  # nothing drained, nothing prefetched
            return
        self._behind_compute()  # the copies must see every row the enqueued steps write
        for slot, count in plan.slots:
            self._fill(slot, int(EMPTY), count)
        if plan.slots:  # a prefetch consumes no slot: the tail stays
            self._fill(TAIL, plan.tail)
        size = self.layer_block_bytes
        for h, d, count in self.drain.runs(plan.moves):
            for host, dev in zip(self.b.k_host_pools + self.b.v_host_pools, self.b.k_pools + self.b.v_pools):
                call("cuMemcpyHtoDAsync", dev.ptr + d * size, host.ptr + h * size, count * size, self.control.handle)
        for index, count in self._stage(plan.table_writes):
            call("cuMemcpyHtoDAsync", self.b.block_table.ptr + 4 * index, self.table_stage.ptr + 4 * index, 4 * count,
                 self.control.handle)
        requested = self.ring.layout.requested
        if plan.park:  # after the table writes, like the clears; a moved block's word is read by no one
            self._fill(requested, 1, self.ring.layout.host_blocks)
        for h, count in spans(plan.cleared):
            self._fill(requested + h, 0, count)
        if plan.moves:
            ev = self._spare.pop() if self._spare else Event(self.rt.backend, timing=False)
            self._table_done.append((ev.record(self.control), [m.host for m in plan.moves]))

    def _retire(self) -> None:
        """Table writes seen done get a mark on the compute stream (their event, re-recorded);
        marks passed free host blocks and keep the event for the next move."""
        for ev, hosts in [x for x in self._passed if x[0].query()]:
            self._passed.remove((ev, hosts))
            self.drain.release(hosts)
            self._spare.append(ev)
        for ev, hosts in [x for x in self._table_done if x[0].query()]:
            self._table_done.remove((ev, hosts))
            self._passed.append((ev.record(self.compute), hosts))
