"""The fault ring's drain on the device: between decode steps the one-sequence runner calls
:meth:`FaultService.service`, which never waits for the compute stream.

Each call finishes what the last one started and starts the next (:mod:`nexusrt.kvcache.fault_plan`
decides, this module issues):

1. a snapshot, doorbell-gated: the service's own ``watch`` stream waits in
   ``cuStreamWaitValue32`` on the ring's ``bell`` word, which a kernel sets once it has published
   a post (``kernels/cu/fault_ring.cuh``), and the compute stream sets behind the work queued on
   it when the snapshot was armed; rung, the watch clears the bell and copies the ring's words
   into a pinned mirror. So the first post of a step starts the copy while that step still runs,
   and the watch never waits past the work already queued (a wait only a post could end would
   hold every ``cuCtxSynchronize`` forever once the steps stop posting). The next call drains
   the mirror once that copy is done (the ring is read while later steps still post: the drain
   rule stops at a claimed slot whose id has not landed, and the drain alone writes ``tail``, so
   a racing read loses nothing). The watch has a stream of its own because a waiting stream
   holds up everything queued behind it;
2. for the drained ids (and for a prefetch's blocks, :meth:`FaultService.prefetch`: the
   sequence's oldest sealed host blocks moved ahead of any post, no ring slot), on the
   ``control`` stream (the highest priority): EMPTY into the consumed slots then the new
   ``tail`` (slots free for producers again), per move a host-to-device copy of the block's K and
   V in every layer (a run of consecutive blocks is one copy), then its table entry (a kernel
   reads either ``~h``, still valid, or the filled device block), then ``requested[h] = 0``, or,
   once the reserve is exhausted, ``requested = 1`` for every host block (parked: nothing can
   move, so no kernel posts again). The copies wait for whatever wrote their blocks: the fill
   (:meth:`filled`: a prefill, or ``adopt_kv``) when every moved block lies below its length,
   which is the case for the host tier's oldest blocks, else the compute stream's work so far.
   So the moves overlap the decode steps queued after the fill instead of landing after them.
   Each of these is one driver call per run of consecutive words
   (:func:`~nexusrt.kvcache.fault_plan.spans`; the consumed slots are at most two runs), not one
   per block: a service is a handful of calls;
3. a moved host block returns to the host tier only after the compute stream has passed an
   event recorded once the table writes were seen complete, so no kernel still reads it.

Once nothing can move (:attr:`~nexusrt.kvcache.fault_plan.FaultDrain.exhausted`: no table entry
names a host block, or the reserve is full) and nothing is pending, a call does nothing: no
event, no stream wait, no snapshot copy. The events a call uses are made once and re-recorded (a
stream wait or a query binds the event's latest record at the time it is made, so re-recording
after that changes nothing already queued); a move's event is reused from step 3 to the next move.

:meth:`quiesce` waits for the control stream: the runner calls it before a new sequence's
prefill writes blocks a pending copy could still read, and before freeing the pools.
"""

from __future__ import annotations

import numpy as np

from ... import memory
from ...driver.calls import call
from ...driver.doorbell import wait_word, write_word
from ...driver.streams import Event
from ...kvcache.blocks import BLOCK_SIZE
from ...kvcache.fault_plan import FaultDrain, spans
from ...kvcache.fault_ring import BELL, EMPTY, ENTRIES, TAIL
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
        self.bell = ring.words.ptr + 4 * BELL
        self.mirror = self.table_stage = self._mark = self._copied = self._fill_done = self.watch = None
        self._snapshot = False  # a snapshot armed on the watch, its event _copied not yet seen done
        self._fill_tokens = None  # the cache length the last fill (event _fill_done) wrote; None: no fill seen
        # Moves issued: (event before the copies, event after the table writes, host blocks moved).
        self._table_done: list[tuple[Event, Event, list[int]]] = []
        self._passed: list[tuple[Event, list[int]]] = []  # the compute stream's mark after them
        self._spare: list[Event] = []  # move events whose host blocks went back, for the next move
        self._owned: list[Event] = []  # every event made, destroyed by free() (also after a failed call)
        try:
            self.mirror = memory.pinned((ENTRIES + ring.layout.capacity,), "int32", tag=TAG)
            # The table's new entries are staged here and copied a run at a time. A staged word is
            # written once only (a moved entry never changes again, see _stage), so a copy still in
            # flight never reads a word that changed after it was queued.
            self.table_stage = memory.pinned((self.drain.table.size,), "int32", tag=TAG)
            self.table_stage.array[:] = self.drain.table
            self._mark = self._new_event(timing=False)  # the compute stream's work so far (_behind_compute)
            self._copied = self._new_event(timing=False)  # the snapshot copy done
            self._fill_done = self._new_event(timing=False)  # the last fill done (filled)
            self.watch = rt.streams.new("kv_fault_watch", "high")
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
        ``written_tokens``, the cache length the steps enqueued so far write), then arm the next
        behind the doorbell; nothing once :attr:`idle`."""
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
        self._arm()

    def filled(self, tokens: int) -> None:
        """The compute stream's queue so far fills the cache to ``tokens`` (a prefill, or
        ``adopt_kv``): moves of blocks below it wait for this point only, not for the decode
        steps queued after it (none of them writes a block the fill sealed)."""
        self._fill_done.record(self.compute)
        self._fill_tokens = int(tokens)

    def prefetch(self, written_tokens: int) -> None:
        """Move the sealed host blocks below ``written_tokens`` into the reserve now, the oldest
        first, as far as it has room (:meth:`FaultDrain.prefetch`): the runner calls it once a
        prefill has filled them, so the first decode step reads them from HBM, not zero-copy."""
        if self.drain.exhausted:
            return
        self._retire()
        self._issue(self.drain.prefetch(written_tokens))

    def flush(self, written_tokens: int, rounds: int = 3) -> None:
        """Service until what the finished steps posted is moved and retired (tests, reports).
        Once the compute stream is done so is every armed snapshot (:meth:`_arm`)."""
        self.compute.synchronize()
        for _ in range(rounds):
            self.watch.synchronize()
            self.service(written_tokens)
            self.control.synchronize()
        self._retire()
        self.compute.synchronize()
        self._retire()

    def quiesce(self) -> None:
        """Wait for the control stream's copies (a new sequence's prefill may rewrite the blocks
        they read). An armed snapshot may stay pending (it writes only the mirror, and ends with
        the compute stream's queue at the latest). The fill mark ends: the next fill sets it."""
        self.control.synchronize()
        self._retire()
        self._fill_tokens = None

    def counts(self) -> dict:
        return {**self.drain.counts.report(),
                "blocks_reserve_free": self.drain.pool.device.num_free, "host_entries": self.drain.host_entries}

    def free(self) -> None:
        """Wait for the watch and the control stream, then destroy every event and the watch and
        free the pinned buffers, all of them even when one step fails (the first failure is
        raised after). The watch writes the mirror, so it is done before that goes."""
        watch = self.watch
        events = self._owned
        steps = [self.control.synchronize] + ([watch.synchronize] if watch is not None else []) + \
            [ev.destroy for ev in events] + \
            [t.free for t in (self.mirror, self.table_stage) if t is not None] + \
            ([watch.destroy] if watch is not None else [])
        failure = None
        for step in steps:
            try:
                step()
            except BaseException as exc:  # noqa: BLE001 - freed anyway, raised below
                failure = failure or exc
        self._mark = self._copied = self._fill_done = self.mirror = self.table_stage = self.watch = None
        self._snapshot, self._table_done, self._passed, self._spare, self._owned = False, [], [], [], []
        if failure is not None:
            raise failure

    # -- the device work --------------------------------------------------------------------
    def _arm(self) -> None:
        """Queue the next snapshot on the watch: wait until the bell rings, clear it, copy the
        ring's words (the clear comes before the copy, so a post racing it is in this copy).

        The compute stream rings the bell too, behind the work queued on it so far: the copy
        lands at the first post or once that work is done, whichever comes first, and the watch
        never waits for anything not queued yet. A wait that only a post could end would hold
        every whole-device wait (``cuCtxSynchronize``: shutdown, the arena's synchronous copies)
        forever once no step posts again. A ring from the compute stream that lands after the
        clear only makes the next snapshot run at once."""
        watch = self.watch.handle
        wait_word(watch, self.bell, 1, any_bit=True)
        write_word(watch, self.bell, 0)
        call("cuMemcpyDtoHAsync", self.mirror.ptr, self.ring.words.ptr, self.mirror.nbytes, watch)
        self._copied.record(self.watch)
        write_word(self.compute.handle, self.bell, 1)
        self._snapshot = True

    def _behind_compute(self) -> None:
        """Hold the control stream's next work until the compute stream's work so far is done."""
        self._mark.record(self.compute)
        self._mark.wait_by(self.control)

    def _behind_writers(self, table_writes) -> None:
        """Hold the control stream's copies until the blocks of ``table_writes`` (logical index,
        device block) are written: the fill alone wrote blocks below its length, any other block
        may still be appended to by a queued step."""
        last = max(index for index, _ in table_writes)
        if self._fill_tokens is not None and (last + 1) * BLOCK_SIZE <= self._fill_tokens:
            self._fill_done.wait_by(self.control)
        else:
            self._behind_compute()

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
        if plan.moves:  # the copies must see every row of their blocks
            self._behind_writers(plan.table_writes)
            start = self._event().record(self.control)
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
            self._table_done.append((start, self._event().record(self.control), [m.host for m in plan.moves]))

    def _event(self) -> Event:
        """A timing event for a move: a spare one, or a new one."""
        return self._spare.pop() if self._spare else self._new_event(timing=True)

    def _new_event(self, timing: bool) -> Event:
        ev = Event(self.rt.backend, timing=timing)
        self._owned.append(ev)
        return ev

    def _retire(self) -> None:
        """Table writes seen done add their device time to ``move_ms`` and get a mark on the
        compute stream (their event, re-recorded); marks passed free host blocks. Both events go
        back to the spares for the next move."""
        for ev, hosts in [x for x in self._passed if x[0].query()]:
            self._passed.remove((ev, hosts))
            self.drain.release(hosts)
            self._spare.append(ev)
        for start, done, hosts in [x for x in self._table_done if x[1].query()]:
            self._table_done.remove((start, done, hosts))
            self.drain.counts.move_ms += start.elapsed_ms(done)
            self._spare.append(start)
            self._passed.append((done.record(self.compute), hosts))
