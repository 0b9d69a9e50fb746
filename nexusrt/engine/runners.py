"""The one-sequence path of ``nrt.LLM``: choosing the runner, and streaming its callback-style loop."""

from __future__ import annotations

import queue
import threading

from .. import runtime as runtime_mod
from ..errors import BackendUnavailable
from ..models.loader import LoadedModel
from ..kvcache.blocks import blocks_for
from ..kvcache.fault_plan import plan_faults
from ..kvcache.tiers import plan_tiers
from .fit import check_fit, runner_context


def check_tensor_parallel(tensor_parallel, backend: str, tp_processes: bool = False) -> None:
    """Refuse a degree that is not an integer >= 1 and a ``tp_processes`` that is not a bool.
    On CUDA every rank is a worker process (one per GPU), so ``tp_processes`` changes nothing there."""
    if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise ValueError(f"tensor_parallel must be an integer >= 1, got {tensor_parallel!r}")
    if not isinstance(tp_processes, bool):
        raise ValueError(f"tp_processes must be True or False, got {tp_processes!r}")


def check_kv_gpu_budget(config, backend: str, max_context: int | None, kv_gpu_budget,
                        kv_fault_reserve=None) -> None:
    """Refuse a ``kv_gpu_budget`` that cannot work for this model and context (below one layer's
    pages, a host tier above MemAvailable), a ``kv_fault_reserve`` that cannot
    (:func:`~nexusrt.kvcache.fault_plan.plan_faults`), then either on a backend without a host
    tier: the CPU runner has one memory, so there is nothing to split. The CUDA runner re-plans
    with its exact capacity (a padded last chunk's rows included)."""
    if kv_gpu_budget is None and kv_fault_reserve is None:
        return
    plan = plan_tiers(blocks_for(runner_context(config, backend, max_context)), kv_gpu_budget,
                      num_layers=config.num_hidden_layers, num_kv_heads=config.num_key_value_heads,
                      head_dim=config.head_dim)
    plan_faults(plan, kv_fault_reserve)
    if backend != "cuda":
        raise BackendUnavailable(f"kv_gpu_budget ({plan.device_blocks} blocks on the device, {plan.host_blocks} "
                                 f"on the host) needs backend='cuda': the {backend} runner keeps its KV in one memory")


def make_runner(model: LoadedModel, backend: str, max_context: int | None, tensor_parallel: int = 1,
                kv_gpu_budget: int | None = None, tp_processes: bool = False, kv_fault_reserve: int | None = None):
    """The :class:`~nexusrt.backends.base.ModelRunner` of ``backend`` for ``model`` (CpuRunner or
    CudaRunner); on the CPU, ``tensor_parallel`` > 1 runs it over that many in-process ranks, or
    with ``tp_processes`` over one worker process per rank, each opening ``model.origin`` (the
    weights the front already resolved and verified) and reading its shard. The caller has run
    :func:`check_tensor_parallel` (``nrt.LLM`` does, before reading the model).
    ``kv_gpu_budget``: bytes of KV on the device, the rest on the pinned host tier (CUDA);
    ``kv_fault_reserve``: bytes of device KV the fault ring moves host blocks into (CUDA)."""
    # Each branch checks the fit before reading a byte of weights, not when the machine runs out.
    check_kv_gpu_budget(model.config, backend, max_context, kv_gpu_budget, kv_fault_reserve)
    name = str(model.path or model.name)
    if backend == "cpu":
        from ..backends.cpu.model import CpuRunner

        check_fit(model.config, backend, max_context, name)
        if tp_processes:
            from ..backends.cpu.tp_front import ProcessDecoder

            decoder = ProcessDecoder(model.origin, model.config, tensor_parallel)
            try:
                return CpuRunner(model.weights, max_context, decoder=decoder)
            except BaseException:
                decoder.close()  # no worker outlives a runner that never was
                raise
        if tensor_parallel == 1:
            return CpuRunner(model.weights, max_context)
        from ..backends.cpu.sharded import ShardedDecoder

        return CpuRunner(model.weights, max_context, decoder=ShardedDecoder(model.weights, tensor_parallel))
    rt = runtime_mod.current("the CUDA runner")
    if not rt.is_cuda:
        raise BackendUnavailable(f"backend='cuda' needs the runtime booted on CUDA, but it runs on {rt.backend} "
                                 f"({rt.probe_reason or 'no reason given'}); use backend='cpu'")
    if tensor_parallel > 1:
        return _cuda_ranks(model, max_context, tensor_parallel, kv_gpu_budget, kv_fault_reserve)
    from ..backends.cuda.runner import CudaRunner

    check_fit(model.config, backend, max_context, name)
    return CudaRunner(model, rt, max_context=max_context, kv_gpu_budget=kv_gpu_budget,
                      kv_fault_reserve=kv_fault_reserve)


def _cuda_ranks(model: LoadedModel, max_context, tensor_parallel: int, kv_gpu_budget, kv_fault_reserve):
    """The one-sequence runner over one CUDA worker process per GPU (:mod:`nexusrt.backends.cuda.tp_front`)."""
    if kv_gpu_budget is not None or kv_fault_reserve is not None:
        raise BackendUnavailable("kv_gpu_budget / kv_fault_reserve with tensor_parallel > 1 on cuda: the ranks keep "
                                 "their KV on their own GPUs only (the host tier is not wired through the workers)")
    from ..backends.cuda.tp_front import ProcessRunner

    # No fit check here: the front's GPU is not a rank's. A rank that runs out of memory fails its
    # boot, and the group names the rank and stops the others.
    return ProcessRunner(model.origin, model.config, tensor_parallel, max_context)


def stream_tokens(runner, session, ids, max_new_tokens, params, pieces):
    """Run the runner's callback-style ``generate_tokens`` in a worker thread, yielding as ids arrive."""
    q: queue.Queue = queue.Queue()
    cancelled = threading.Event()

    def on_token(token):
        done = session.on_token(token) or cancelled.is_set()
        q.put(("text", list(pieces)))
        pieces.clear()
        return done

    def work():
        try:
            runner.generate_tokens(ids, max_new_tokens, params, on_token)
            q.put(("end", None))
        except BaseException as exc:  # re-raised in the consumer
            q.put(("error", exc))

    worker = threading.Thread(target=work, name="nexusrt-generate", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "error":
                raise value
            if kind == "end":
                break
            yield from value
    finally:
        cancelled.set()
        worker.join()
