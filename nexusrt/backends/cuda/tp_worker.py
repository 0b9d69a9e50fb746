"""One CUDA rank of a tensor-parallel group in its own process: its GPU, its shard, its graphs.

The process entry :func:`serve_cuda_rank` (started by
:class:`~nexusrt.parallel.procs.WorkerGroup`, as the CPU ranks of
:mod:`nexusrt.backends.cpu.tp_worker` are) boots the runtime on its own device (ordinal =
rank unless the spec says otherwise), opens the front's resolved
:class:`~nexusrt.models.loader.WeightsOrigin`, joins the NCCL group with the unique id the
front sent through the pipe, and builds a :class:`~.runner.CudaRunner` over its
:func:`~nexusrt.parallel.shard` view (only its rows and columns are read,
:mod:`.shard_upload`) with a :class:`~.collectives.RankComm`, so its decode graph holds the
step's all-reduces. Then it answers the front's messages (:data:`MESSAGES`) through the loop
every rank shares (:func:`~nexusrt.parallel.worker_side.serve_requests`).

Every rank gets every message and runs the same graphs in the same order (SPMD); every rank
samples the same gathered logits, so every rank's next id is the same and only rank 0's
answers travel back.

The serving engine's batched step runs the same way: ``batch_open`` makes the rank's
:class:`~.batch.CudaBatchRunner` over its runner's weights with the same RankComm (its own KV
pool of the engine's block count, its graphs captured with their collectives), and each
``batch_step`` carries the step's :class:`~nexusrt.backends.base.Rows` to every rank, which runs
``run_tokens`` on them: the same entries make every rank take the same path and collectives, and
every rank picks from the same gathered rows, so the picks agree and rank 0's come back.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from types import SimpleNamespace

from ...models.loader import WeightsOrigin
from ...parallel import ShardPlan, shard
from ...parallel.nccl import NVLS_ENV, NcclGroup
from ...parallel.worker_side import serve_requests

MESSAGES = """
("reset",)                              -> None
("prefill", ids)                        -> None
("decode", token)                       -> None
("logits",)                             -> rank 0: fp32 [vocab] (every rank holds the gathered row); others None
("sample", params, step)                -> the next id (the same on every rank)
("decode_sample", token, params, step)  -> decode, then sample: one round trip per generated id
("forward_all", ids)                    -> rank 0: fp32 [len(ids), vocab]; others None
("timings",)                            -> the rank's CudaRunner.timings
("collective_times", repeats)           -> every rank: collectives.time_step_collectives (a decode step's
                                           all-reduces and all-gather alone, timed on the rank's stream)
("batch_open", num_blocks, max_batch, max_chunk, deterministic)
                                        -> the rank's CudaBatchRunner made: {"max_context", "num_blocks",
                                           "prune_policies"} (one at a time: a second is refused)
("batch_step", rows)                    -> rank 0: run_tokens(rows), the picks; others None
("batch_logits", rows)                  -> rank 0: run(rows), the logits rows; others None
("batch_compact", table, keep)          -> None (KV pruning in every rank's pool)
("batch_close",)                        -> None (the batch runner's pools and graphs released)
("close",)                              -> the rank exits
"""

# In every worker's environment before NCCL is loaded: NVLink multicast off (the lent machines
# do not support it), and every peer connection made when the communicator is created rather
# than on a collective's first use, which may fall inside a graph capture.
RANK_ENV = {NVLS_ENV: "0", "NCCL_RUNTIME_CONNECT": "0"}


@dataclass(frozen=True)
class CudaRankSpec:
    """What a CUDA rank needs to boot: the weights, the group's degree, NCCL's unique id (the
    front's, 128 bytes), the runner's context, and each rank's device (None: rank ``r`` on ``r``)."""

    weights: WeightsOrigin
    size: int
    uid: bytes
    max_context: int | None = None
    devices: tuple[int, ...] | None = None

    def device(self, rank: int) -> int:
        return rank if self.devices is None else self.devices[rank]


def _boot(rank: int, spec: CudaRankSpec):
    """``(handle, release, ready)`` for :func:`serve_requests`; on failure what was made is released."""
    from ... import firmware
    from .collectives import RankComm
    from .runner import CudaRunner

    os.environ.update(RANK_ENV)  # WorkerGroup set them already; a direct caller gets them too
    with contextlib.ExitStack() as made:
        firmware.init(backend="cuda", device=spec.device(rank))  # makes this device's context current
        made.callback(firmware.shutdown)
        weights = spec.weights.open()
        made.callback(weights.close)
        plan = ShardPlan(weights.config, spec.size)
        group = NcclGroup(rank, spec.size, spec.uid)  # collective: returns once every rank has joined
        # Abort, not destroy: the process ends right after, and destroy waits for peers that may be gone.
        made.callback(group.close, abort=True)
        part = shard(weights, plan, rank)
        runner = CudaRunner(SimpleNamespace(config=part.config, weights=part), firmware.runtime(),
                            max_context=spec.max_context, tp=RankComm(group, weights.config.vocab_size))
        made.callback(runner.close)
        batch = BatchSlot()
        made.callback(batch.close)  # before the runner whose weights it shares
        release = made.pop_all().close  # from here on the loop owns them, released in reverse order
    ready = {"pid": os.getpid(), "device": spec.device(rank), "max_context": runner.max_context}
    return (lambda message: handle(message, runner, rank, batch)), release, ready


def serve_cuda_rank(rank: int, conn, spec: CudaRankSpec) -> None:
    """The worker process's main: boot rank ``rank`` on its GPU, answer ``ready``, then serve."""
    serve_requests(conn, lambda: _boot(rank, spec))


class BatchSlot:
    """The rank's batch runner, if the front opened one (at most one: the front's engine has one)."""

    def __init__(self):
        self.runner = None

    def open(self, base, num_blocks: int, max_batch: int, max_chunk: int, deterministic: bool) -> dict:
        from . import batch as batch_mod  # looked up at call time, so a test can stand in for it

        if self.runner is not None:
            raise ValueError("this rank's batch runner is open already (batch_close it first)")
        self.runner = batch_mod.CudaBatchRunner(base, num_blocks, max_batch, max_chunk=max_chunk,
                                                deterministic=deterministic)
        r = self.runner
        return {"max_context": r.max_context, "num_blocks": r.num_blocks, "prune_policies": r.prune_policies}

    def get(self):
        if self.runner is None:
            raise ValueError("no batch runner is open on this rank (batch_open first)")
        return self.runner

    def close(self) -> None:
        if self.runner is not None:
            runner, self.runner = self.runner, None
            runner.close()


def handle_batch(message, runner, rank: int, batch: BatchSlot):
    """One ``batch_*`` message of :data:`MESSAGES` (the serving engine's step on this rank)."""
    kind = message[0]
    if kind == "batch_open":
        return batch.open(runner, *message[1:])
    if kind == "batch_close":
        return batch.close()
    if kind == "batch_compact":
        return batch.get().compact(message[1], message[2])
    # Every rank runs the step (its collectives are collective); every rank's picks are the same.
    out = batch.get().run_tokens(message[1]) if kind == "batch_step" else batch.get().run(message[1])
    return out if rank == 0 else None


def handle(message, runner, rank: int, batch: BatchSlot | None = None):
    """One message of :data:`MESSAGES` on ``runner`` (a CudaRunner with a RankComm, or a stand-in);
    ``batch``: the rank's batch runner slot (``batch_*`` messages)."""
    kind = message[0]
    if kind in ("batch_open", "batch_close", "batch_compact", "batch_step", "batch_logits"):
        return handle_batch(message, runner, rank, batch)
    if kind == "reset":
        return runner.reset()
    if kind == "prefill":
        return runner.prefill(message[1])
    if kind == "decode":
        return runner.decode(message[1])
    if kind == "logits":
        logits = runner.last_logits()  # every rank synchronises: the gather was collective
        return logits if rank == 0 else None
    if kind == "sample":
        return runner.sample(message[1], message[2])
    if kind == "decode_sample":
        runner.decode(message[1])
        return runner.sample(message[2], message[3])
    if kind == "forward_all":
        return runner.forward_all(message[1])  # None on ranks other than 0
    if kind == "timings":
        return dict(runner.timings)
    if kind == "collective_times":
        from .collectives import time_step_collectives

        return time_step_collectives(runner.tp, runner.rt, runner.config, runner.stream, message[1])
    raise ValueError(f"unknown message {kind!r}")
