"""A CUDA rank with no GPU, for the worker-protocol tests of ``test_cuda_tp_cpu``.

:func:`fake_cuda_rank` is a WorkerGroup target that runs the real
:func:`nexusrt.backends.cuda.tp_worker.serve_cuda_rank` (its boot, its message handling,
the loop every rank shares) with four things swapped inside the spawned process: nccl4py
(the recording stand-in of ``nccl_fakes``), ``firmware.init`` (records the device ordinal
asked for and boots the CPU backend), ``CudaRunner`` (:class:`FakeRankRunner`) and
``CudaBatchRunner`` (:class:`FakeBatchRunner`). Each rank writes what it saw to
``<log_dir>/rank<r>.json`` as it goes: the device, NCCL's calls, its local shard's shape, the
messages handled, its batch runner's arguments, steps and compactions.
"""

from __future__ import annotations

import json
import os

from types import SimpleNamespace

import numpy as np

from nccl_fakes import StreamHandle
from nexusrt.reference.sampling import SamplingParams, sample

STREAM_BASE = 40  # rank r's stand-in stream handle is STREAM_BASE + r


def logits_table(vocab: int) -> np.ndarray:
    """The fake model: the logits after token ``t`` are ``table[t]`` (the same on every rank)."""
    return np.random.default_rng(5).standard_normal((vocab, vocab)).astype(np.float32)


class FakeRankRunner:
    """What CudaRunner's interface promises, on the CPU: the logits after the last id are
    ``logits_table[last id]``; ``die_at``: ``(rank, position)`` at whose decode the process exits.
    ``rt`` (the CPU runtime the fake boot made) and ``stream`` (a stand-in handle NCCL accepts) are
    what the worker's collective timing reads from a runner."""

    def __init__(self, model, rt, max_context=None, tp=None, *, record, die_at=None):
        self.config, self.tp, self.record, self.die_at = model.config, tp, record, die_at
        self.rt = rt
        self.stream = SimpleNamespace(role="compute", handle=StreamHandle(STREAM_BASE + tp.rank),
                                      synchronize=lambda: None)
        self.max_context = int(max_context or 64)
        self.table = logits_table(model.config.vocab_size)
        self.timings = {"upload_s": 0.0}
        self.ids: list[int] = []
        self.closed = False
        record["local"] = {"heads": model.config.num_attention_heads, "kv_heads": model.config.num_key_value_heads,
                           "inter": model.config.intermediate_size, "shard_rank": model.weights.rank,
                           "lm_head_rows": model.weights.spec("lm_head").shape[0],
                           "tp": [tp.rank, tp.size, tp.vocab_part]}

    @property
    def position(self) -> int:
        return len(self.ids)

    def _room(self, n):
        if self.position + n > self.max_context:
            raise ValueError(f"the sequence would hold {self.position + n} tokens; the context is {self.max_context}")

    def reset(self):
        self.ids = []

    def prefill(self, ids):
        self._room(len(ids))
        self.ids += [int(i) for i in ids]

    def decode(self, token):
        self._room(1)
        if self.die_at == (self.tp.rank, self.position):
            os._exit(9)  # a crash as the OOM killer or a device fault leaves it: no answer, no cleanup
        self.ids.append(int(token))

    def last_logits(self):
        return self.table[self.ids[-1]].copy()

    def sample(self, params, step):
        return int(sample(self.last_logits(), params or SamplingParams(), step))

    def forward_all(self, ids):  # CudaRunner's contract: ranks other than 0 return None
        self.reset()
        self.prefill(ids)
        return self.table[np.asarray(ids)] if self.tp.rank == 0 else None

    def close(self):
        self.closed = True


class FakeBatchRunner:
    """What CudaBatchRunner promises, on the CPU: an entry's logits are ``logits_table[its last id]``
    and its pick ``sample_rows``' (so ids equal the one-sequence fake's); ``die_at``: ``(rank, step)``
    at whose batch step (0-based) the process exits."""

    def __init__(self, base, num_blocks, max_batch=32, max_chunk=2048, deterministic=False, *,
                 record, die_at=None):
        tp = base.tp  # as CudaBatchRunner: a rank's batch runner takes its base runner's RankComm
        self.config, self.max_context, self.num_blocks = base.config, base.max_context, num_blocks
        self.prune_policies = frozenset({"sink-window"})
        self.table, self.rank, self.die_at, self.steps = base.table, tp.rank, die_at, 0
        self.record = record
        record["batch"] = {"num_blocks": num_blocks, "max_batch": max_batch, "max_chunk": max_chunk,
                           "deterministic": deterministic, "steps": [], "compact": [], "closed": False}

    def run(self, batch):
        if self.die_at == (self.rank, self.steps):
            os._exit(9)
        self.steps += 1
        for r in batch:
            if r.start + len(r.token_ids) > self.max_context:
                raise ValueError(f"{r.start + len(r.token_ids)} tokens exceed the context of {self.max_context}")
        self.record["batch"]["steps"].append([[int(i) for i in r.token_ids] for r in batch])
        return [self.table[int(r.token_ids[-1])].copy() if r.logits else None for r in batch]

    def run_tokens(self, batch):
        from nexusrt.backends.base import sample_rows

        return sample_rows(batch, self.run(batch))

    def compact(self, table, keep):
        self.record["batch"]["compact"].append([list(table), [int(k) for k in keep]])

    def close(self):
        self.record["batch"]["closed"] = True


def fake_cuda_rank(rank: int, conn, spec, log_dir: str, die_at=None, die_at_batch=None) -> None:
    """WorkerGroup target: the real CUDA rank loop over the stand-ins (module docstring)."""
    import nexusrt.firmware as firmware
    from nexusrt.backends.cuda import batch as batch_mod
    from nexusrt.backends.cuda import runner as runner_mod
    from nexusrt.backends.cuda import tp_worker

    import nccl_fakes

    record = {"rank": rank, "env": {k: os.environ.get(k) for k in tp_worker.RANK_ENV}, "messages": []}
    calls: list = []
    record["nccl"] = calls
    path = os.path.join(log_dir, f"rank{rank}.json")

    def save():
        with open(path, "w") as f:
            json.dump(record, f, default=lambda v: v.hex() if isinstance(v, bytes) else repr(v))

    nccl_fakes.install(calls)
    real_init = firmware.init

    def init(backend=None, device=0, **kw):
        record["device"] = device
        return real_init(backend="cpu")

    firmware.init = init

    def make(model, rt, max_context=None, tp=None):
        return FakeRankRunner(model, rt, max_context, tp, record=record, die_at=die_at)

    runner_mod.CudaRunner = make

    def make_batch(base, num_blocks, max_batch=32, max_chunk=2048, deterministic=False):
        return FakeBatchRunner(base, num_blocks, max_batch, max_chunk, deterministic, record=record,
                               die_at=die_at_batch)

    batch_mod.CudaBatchRunner = make_batch
    real_handle = tp_worker.handle

    def handle(message, runner, rank, *batch):
        record["messages"].append(message[0])
        try:
            return real_handle(message, runner, rank, *batch)
        finally:
            save()

    tp_worker.handle = handle
    try:
        tp_worker.serve_cuda_rank(rank, conn, spec)
    finally:
        save()


class FakeRankTarget:
    """A picklable WorkerGroup target: :func:`fake_cuda_rank` with its log directory and crash points
    (``die_at``: a decode's, ``die_at_batch``: a batch step's)."""

    def __init__(self, log_dir, die_at=None, die_at_batch=None):
        self.log_dir, self.die_at, self.die_at_batch = str(log_dir), die_at, die_at_batch

    def __call__(self, rank, conn, spec):
        fake_cuda_rank(rank, conn, spec, self.log_dir, self.die_at, self.die_at_batch)
