"""The serving engine's batched step over CUDA tensor-parallel workers: a BatchRunner in the front.

:class:`ProcessBatchRunner` rides on a :class:`~.tp_front.ProcessRunner`'s workers (the ranks
that already hold the shards, the NCCL group and each rank's ``CudaRunner``): it asks every rank
to make its own :class:`~.batch.CudaBatchRunner` over those weights with its ``RankComm``
(``batch_open``), then forwards each engine call as one message to every rank and returns rank
0's answer (:mod:`.tp_worker`). The KV pools, hidden rows and logits stay in the workers; a
step's :class:`~nexusrt.backends.base.Rows` go out and the picks come back, so the serving
engine, the scheduler and the HTTP server run over it unchanged.

The refusals a group makes before any process starts (the plan's divisibility, the kernels'
limits on a rank's shape, more ranks than GPUs, nccl4py missing) are the ``ProcessRunner``'s,
made when the LLM built it; a dead worker raises :class:`~nexusrt.parallel.procs.WorkerDied`
from the call that finds it, naming the rank, with every other worker stopped.
"""

from __future__ import annotations

from ...errors import NexusRTError
from .batch_buffers import batch_buckets


class ProcessBatchRunner:
    """A :class:`~nexusrt.backends.base.BatchRunner` of ``num_blocks`` KV blocks (each rank's pool
    holds its own KV heads of every block) over the workers of ``ranks`` (a ``ProcessRunner``);
    the other arguments are :class:`~.batch.CudaBatchRunner`'s. Bad ``num_blocks`` or ``max_batch``
    values are refused here, before any rank sees them."""

    def __init__(self, ranks, num_blocks: int, max_batch: int = 32, max_chunk: int = 2048,
                 deterministic: bool = False):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        batch_buckets(max_batch)  # ValueError for a bad max_batch
        self.ranks, self.config = ranks, ranks.config
        made = ranks.ask(("batch_open", num_blocks, max_batch, int(max_chunk), bool(deterministic)),
                         "batch runner setup")
        self.max_context, self.num_blocks = int(made["max_context"]), int(made["num_blocks"])
        self.prune_policies = frozenset(made["prune_policies"])  # no h2o: a rank's scores are its heads'
        self._open = True

    def run_tokens(self, batch) -> list:
        """:meth:`~nexusrt.backends.base.BatchRunner.run_tokens` on every rank; rank 0's picks."""
        return self.ranks.ask(("batch_step", list(batch)), "serving step")

    def run(self, batch) -> list:
        """The step's logits rows (rank 0's gathered rows; tests)."""
        return self.ranks.ask(("batch_logits", list(batch)), "serving step")

    def compact(self, table: list[int], keep) -> None:
        """KV compaction in every rank's pool (each holds its own KV heads of the same slots)."""
        self.ranks.ask(("batch_compact", list(table), list(map(int, keep))), "KV compaction")

    def close(self) -> None:
        """Release every rank's batch runner (pools, graphs); the workers stay for the LLM's runner.
        Nothing to do once the group is stopped (a dead worker, or the runner closed first); safe twice."""
        if not self._open:
            return
        self._open = False
        try:
            self.ranks.ask(("batch_close",), "batch runner release")
        except NexusRTError:  # WorkerDied or a closed group: the workers' memory went with them
            pass
