"""One CPU rank of a tensor-parallel group in its own process: load the shard, then serve steps.

The process entry :func:`serve_rank` (started by :class:`~nexusrt.parallel.procs.WorkerGroup`)
opens the model's weights itself (the front's resolved, already verified
:class:`~nexusrt.models.loader.WeightsOrigin`: no name lookup, no hashing again), takes
its :func:`~nexusrt.parallel.shard` view, so it reads only its rows and columns of each
tensor, attaches to the group's shared-memory communicator and builds a
:class:`~nexusrt.backends.cpu.sharded.RankDecoder`. Then it answers the front's messages,
one per step (:data:`MESSAGES`), until ``("close",)`` or its pipe closes
(:func:`~nexusrt.parallel.worker_side.serve_requests`, the loop the CUDA ranks share).

The front never reads weights for a rank; a rank never sees a request it was not sent, so
every rank runs every step's collectives in the same order (SPMD).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...models.loader import WeightsOrigin
from ...parallel import ShardPlan, shard
from ...parallel.shm import ShmGroup
from ...parallel.worker_side import serve_requests
from .sharded import RankDecoder

MESSAGES = """
("pools", num_blocks)                  -> a pool id (this rank's K/V pools of its KV heads)
("step", pool_id, batch, rows)         -> fp32 [len(rows), vocab / size]: this rank's vocab slice
("compact", pool_id, table, keep)      -> None (KV pruning: every rank moves its own heads' slots)
("collective_times", repeats)          -> this rank's RankDecoder.collective_times (a decode step's all-reduces alone)
("close",)                             -> the rank exits
"""


@dataclass(frozen=True)
class RankSpec:
    """What a rank needs to boot: where the weights are, the group's degree, and the
    communicator's segment."""

    weights: WeightsOrigin
    size: int
    segment: str  # made by create_segment with its default slot size, as ShmGroup's default


def _boot(rank: int, spec: RankSpec) -> tuple[RankDecoder, object]:
    weights = spec.weights.open()
    try:
        plan = ShardPlan(weights.config, spec.size)
        comm = ShmGroup(spec.segment, rank, spec.size)
    except BaseException:
        weights.close()
        raise
    return RankDecoder(shard(weights, plan, rank), comm, weights.config), weights


def serve_rank(rank: int, conn, spec: RankSpec) -> None:
    """The worker process's main: boot rank ``rank``, answer with its pid, then serve."""
    import os

    def boot():
        decoder, weights = _boot(rank, spec)
        pools: list = []

        def release():
            decoder.close()
            decoder.comm.close()
            weights.close()

        return (lambda message: _handle(message, decoder, pools)), release, os.getpid()

    serve_requests(conn, boot)


def _handle(message, decoder: RankDecoder, pools: list):
    kind = message[0]
    if kind == "pools":
        pools.append(decoder.new_pools(message[1]))
        return len(pools) - 1
    if kind == "step":
        _, pool_id, batch, rows = message
        return decoder.forward_logits(batch, pools[pool_id], rows)  # this rank's vocab slice
    if kind == "compact":
        _, pool_id, table, keep = message
        decoder.compact_pools(pools[pool_id], table, keep)
        return None
    if kind == "collective_times":
        return decoder.collective_times(message[1])
    raise ValueError(f"unknown message {kind!r}")
