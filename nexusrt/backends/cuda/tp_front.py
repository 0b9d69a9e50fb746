"""The front process's side of tensor parallelism on CUDA: a ModelRunner over one worker per GPU.

:class:`ProcessRunner` checks what it can before any process starts (the plan's
divisibility, the CUDA kernels' limits on a rank's local shape, enough GPUs, nccl4py and
its library present), makes NCCL's unique id, and starts one
:mod:`.tp_worker` process per rank through the same
:class:`~nexusrt.parallel.procs.WorkerGroup` the CPU ranks use (pipes, a dead rank named,
every other rank stopped). It is the one-sequence :class:`~nexusrt.backends.base.ModelRunner`
of ``nrt.LLM(..., backend="cuda", tensor_parallel=N)``: every call is one message to every
rank, and rank 0's answer comes back. A generated id costs one round trip
(``decode_sample``: the rank replays its captured decode graph, all-reduces inside, then
samples the gathered logits), so the front decides every stop itself.

The serving engine's batched step runs over the same workers: :meth:`ProcessRunner.batch_runner`
makes a :class:`~.tp_batch.ProcessBatchRunner` (each rank a ``CudaBatchRunner`` with its
``RankComm``), which ``nexusrt serve --tensor-parallel N`` and lists of prompts use.

Not offered yet: the device-side decode loop of :meth:`CudaRunner.generate_tokens` (ids queued
ahead of the host).
"""

from __future__ import annotations

import numpy as np

from ...errors import BackendUnavailable
from ...parallel import ShardPlan
from ...parallel.nccl import unique_id
from ...parallel.procs import RankFront, WorkerGroup
from .tp_worker import RANK_ENV, CudaRankSpec, serve_cuda_rank


def gpu_count() -> int:
    """CUDA devices this process sees (CUDA_VISIBLE_DEVICES applies)."""
    from ...driver.calls import call

    return int(call("cuDeviceGetCount"))


def check_ranks(config, size: int, gpus: int | None = None) -> ShardPlan:
    """The plan of ``config`` over ``size`` GPUs, or the refusal :class:`ProcessRunner` makes
    before any process starts: :class:`~nexusrt.errors.ModelError` for shapes the plan or the
    CUDA kernels refuse (a rank's local shape), :class:`~nexusrt.errors.BackendUnavailable`
    for fewer GPUs than ranks (``gpus``: the count to assume; None asks the driver)."""
    from .runner import _check_supported

    plan = ShardPlan(config, size)  # indivisible heads, KV heads, vocab, MLP width: ModelError
    _check_supported(plan.local_config(0))  # what a rank runs must fit the kernels
    present = gpu_count() if gpus is None else gpus
    if size > present:
        raise BackendUnavailable(f"tensor_parallel={size} needs {size} GPUs (one process each); this machine "
                                 f"shows {present}{' (CUDA_VISIBLE_DEVICES?)' if present else ''}")
    return plan


class ProcessRunner(RankFront):
    """The model at ``origin`` (a resolved :class:`~nexusrt.models.loader.WeightsOrigin`; ``config``
    its config, all the front reads) split over ``size`` GPUs, rank ``r`` on device ``r``.

    Raises before any process starts: :class:`~nexusrt.errors.ModelError` for shapes the plan
    or the CUDA kernels refuse, :class:`~nexusrt.errors.BackendUnavailable` for fewer GPUs than
    ranks, :class:`~nexusrt.parallel.nccl.NcclError` without nccl4py. Any call raises
    :class:`~nexusrt.parallel.procs.WorkerDied` (naming the rank) once a worker has died; the
    others are stopped by then. ``target`` replaces the worker's entry (tests).
    """

    def __init__(self, origin, config, size: int, max_context: int | None = None, *, target=serve_cuda_rank,
                 gpus: int | None = None):
        self.config = config
        self.plan = check_ranks(config, size, gpus)
        spec = CudaRankSpec(origin, size, unique_id(), max_context)  # no nccl4py: NcclError with the install hint
        self._workers = WorkerGroup(target, size, (spec,), name="CUDA tensor-parallel worker", env=RANK_ENV)
        self.ready = self._workers.ready
        self.max_context = int(self.ready[0]["max_context"])
        self.position = 0

    def ask(self, message, what: str):
        """Rank 0's answer to ``message`` (:data:`~.tp_worker.MESSAGES`) sent to every rank; ``what``
        names the call in a :class:`~nexusrt.parallel.procs.WorkerDied`."""
        return self._workers.request(message, what)[0]

    def batch_runner(self, num_blocks: int, max_batch: int = 32, max_chunk: int = 2048,
                     deterministic: bool = False):
        """The serving engine's :class:`~nexusrt.backends.base.BatchRunner` over these workers
        (:class:`~.tp_batch.ProcessBatchRunner`; arguments as :class:`~.batch.CudaBatchRunner`'s
        after its base). One at a time: close it before making another."""
        from .tp_batch import ProcessBatchRunner

        return ProcessBatchRunner(self, num_blocks, max_batch, max_chunk, deterministic)

    # -- ModelRunner ----------------------------------------------------------------------------
    def reset(self) -> None:
        self.ask(("reset",), "reset")
        self.position = 0

    def prefill(self, token_ids) -> None:
        ids = np.ascontiguousarray(np.asarray(token_ids, dtype=np.int32).reshape(-1))
        self.ask(("prefill", ids), "prefill")
        self.position += ids.size

    def decode(self, token_id: int) -> None:
        self.ask(("decode", int(token_id)), "decode step")
        self.position += 1

    def last_logits(self) -> np.ndarray:
        return self.ask(("logits",), "logits copy")

    def sample(self, params, step: int) -> int:
        return int(self.ask(("sample", params, int(step)), "sampling"))

    def forward_all(self, token_ids) -> np.ndarray:
        ids = np.ascontiguousarray(np.asarray(token_ids, dtype=np.int32).reshape(-1))
        out = self.ask(("forward_all", ids), "forward pass")
        self.position = ids.size
        return out

    def generate_tokens(self, prompt_ids, max_new_tokens: int, params, on_token) -> int:
        """:func:`~nexusrt.backends.base.generate_tokens`'s meaning, one round trip per id after the first."""
        self.reset()
        self.prefill(prompt_ids)
        got = 0
        token = self.sample(params, 0) if max_new_tokens > 0 else None
        while token is not None:
            got += 1
            if on_token(token) or got == max_new_tokens or self.position >= self.max_context:
                break
            token = int(self.ask(("decode_sample", token, params, got), "decode step"))
            self.position += 1
        return got

    def rank_timings(self) -> dict:
        """Rank 0's ``CudaRunner.timings`` (upload, capture)."""
        return self.ask(("timings",), "timings")

    def close(self) -> None:
        """Ask every worker to exit (each releases its graphs, weights, NCCL and device), then stop
        any left; safe twice."""
        self._workers.close(("close",))
