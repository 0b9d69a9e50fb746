"""The front process's side of tensor parallelism through worker processes (CPU ranks).

:class:`ProcessDecoder` starts one worker per rank (:mod:`nexusrt.backends.cpu.tp_worker`),
each loading only its shard, and stands in for a decoder: both CPU runners drive it through
``new_pools``, ``forward_logits`` and ``compact_pools`` (one message to every rank each), so
``CpuRunner`` is the one-sequence runner and ``CpuBatchRunner`` the serving engine's over
worker processes with no code of their own. The hidden rows and KV pools stay in the
workers; only a step's :class:`~nexusrt.backends.base.Rows` go out and rank 0's gathered
logits come back.

It lives in ``backends/cpu`` because it is this backend's runner half (it names the CPU rank
loop); the machinery under it, the process group and the shared-memory communicator, is in
``parallel/`` and knows no backend, so a CUDA front would reuse it with a CUDA rank loop and
NCCL in place of :class:`~nexusrt.parallel.shm.ShmGroup`.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass

import numpy as np

from ...models.loader import WeightsOrigin
from ...parallel import ShardPlan
from ...parallel.procs import RankFront, WorkerDied, WorkerGroup
from ...parallel.shm import create_segment
from ..base import Rows
from .sharded import join_logits
from .tp_worker import RankSpec, serve_rank


def blas_env(size: int) -> dict[str, str]:
    """BLAS thread counts for ``size`` ranks sharing this machine's cores. Without them every
    worker starts a BLAS thread per core, and OpenBLAS threads spin while they wait: with more
    threads than cores, a step ran 20 times slower (2 ranks on 2 cores)."""
    threads = str(max(1, (os.cpu_count() or 1) // size))
    return {name: threads for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


@dataclass(frozen=True)
class RemotePools:
    """A handle to K/V pools that live in the workers (pool ``id`` of every rank)."""

    id: int


class ProcessDecoder(RankFront):
    """The model whose weights ``weights`` locates (a :class:`~nexusrt.models.loader.WeightsOrigin`,
    resolved and verified by the front's :func:`~nexusrt.models.loader.load_model`) split over
    ``size`` worker processes; ``config`` is its config (the front reads only that).
    Indivisible shapes fail before any process starts. A collective waits
    :data:`~nexusrt.parallel.shm.DEFAULT_TIMEOUT` seconds for a peer before it names the missing rank.
    Raises :class:`~nexusrt.parallel.procs.WorkerDied` from any call once a worker has died;
    the other workers are stopped by then.
    """

    # h2o's attention mass is summed over every rank's heads in one float64 order in process;
    # the ranks here hold theirs apart, so only the policy without scores is offered.
    prune_policies = frozenset({"sink-window"})

    def __init__(self, weights: WeightsOrigin, config, size: int):
        self.config = config
        self.plan = ShardPlan(config, size)  # bad degrees and indivisible shapes fail here, no process yet
        self._segment = _Segment(create_segment(size))
        self.segment_name = self._segment.name  # the shared-memory segment of the collectives (unlinked by close)
        self._workers = None
        try:
            spec = RankSpec(weights, size, self.segment_name)
            self._workers = WorkerGroup(serve_rank, size, (spec,), name="tensor-parallel worker", env=blas_env(size))
        except BaseException:
            self._segment.release()
            raise
        # A front dropped or left open at exit still stops its workers and unlinks its segment
        # (else Python's resource tracker warns of a leaked segment at every such exit).
        weakref.finalize(self, _shut, self._workers, self._segment)

    def new_pools(self, num_blocks: int) -> RemotePools:
        """K/V pools of ``num_blocks`` blocks in every worker (each rank's own KV heads)."""
        ids = self._request(("pools", num_blocks), "pool allocation")
        return RemotePools(ids[0])

    def forward_logits(self, batch: list[Rows], pools: RemotePools, rows) -> np.ndarray:
        """One step in every worker; fp32 ``[len(rows), vocab]``: the ranks' vocab slices joined."""
        return join_logits(self._request(("step", pools.id, batch, np.asarray(rows, np.intp)), "step"))

    def compact_pools(self, pools: RemotePools, table: list[int], keep) -> None:
        """KV compaction (see ``DecoderSteps.compact_pools``) in every worker's pools."""
        self._request(("compact", pools.id, list(table), np.asarray(keep)), "KV compaction")

    def close(self) -> None:
        """Stop the workers (asked first, then terminated) and unlink the segment; safe twice."""
        _shut(self._workers, self._segment)

    def _request(self, message, what: str) -> list:
        try:
            return self._workers.request(message, what)
        except WorkerDied:  # every worker is stopped by now: nothing uses the segment any more
            self._segment.release()
            raise


class _Segment:
    """The collectives' shared-memory segment, released once whichever thread (the one-sequence
    caller, the engine's loop, close, the finalizer) gets there first."""

    def __init__(self, segment):
        self._segment, self.name = segment, segment.name
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            segment, self._segment = self._segment, None
        if segment is not None:
            segment.close()
            try:
                segment.unlink()
            except FileNotFoundError:  # gone already (a worker's tracker, or the OS at exit)
                pass


def _shut(workers: WorkerGroup | None, segment: _Segment) -> None:
    if workers is not None:
        workers.close(("close",))
    segment.release()
