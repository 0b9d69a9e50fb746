"""A CUDA rank with no GPU, for the worker-protocol tests of ``test_cuda_tp_cpu``.

:func:`fake_cuda_rank` is a WorkerGroup target that runs the real
:func:`nexusrt.backends.cuda.tp_worker.serve_cuda_rank` (its boot, its message handling,
the loop every rank shares) with three things swapped inside the spawned process: nccl4py
(the recording stand-in of ``nccl_fakes``), ``firmware.init`` (records the device ordinal
asked for and boots the CPU backend) and ``CudaRunner`` (:class:`FakeRankRunner`). Each rank
writes what it saw to ``<log_dir>/rank<r>.json`` as it goes: the device, NCCL's calls, its
local shard's shape, the messages handled.
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

    def forward_all(self, ids):
        self.reset()
        self.prefill(ids)
        return self.table[np.asarray(ids)]

    def close(self):
        self.closed = True


def fake_cuda_rank(rank: int, conn, spec, log_dir: str, die_at=None) -> None:
    """WorkerGroup target: the real CUDA rank loop over the stand-ins (module docstring)."""
    import nexusrt.firmware as firmware
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
    real_handle = tp_worker.handle

    def handle(message, runner, rank):
        record["messages"].append(message[0])
        try:
            return real_handle(message, runner, rank)
        finally:
            save()

    tp_worker.handle = handle
    try:
        tp_worker.serve_cuda_rank(rank, conn, spec)
    finally:
        save()


class FakeRankTarget:
    """A picklable WorkerGroup target: :func:`fake_cuda_rank` with its log directory and crash point."""

    def __init__(self, log_dir, die_at=None):
        self.log_dir, self.die_at = str(log_dir), die_at

    def __call__(self, rank, conn, spec):
        fake_cuda_rank(rank, conn, spec, self.log_dir, self.die_at)
