"""The batch runner on a CUDA tensor-parallel rank, checked on the CPU (issue 17, serving).

- The batch step's chains over a rank's shard (batched decode rows, ragged prompt rows, the
  chunks' logits rows): an all-reduce right after every O and down product, in place on the
  residual rows, the residual added by rank 0 only, the LM head writing the rank's ``[m, V/N]``
  rows, an all-gather of them and the unpack of every rank's block into whole logits rows before
  the sampler; the unpack puts rank r's block into columns ``r·V/N ..`` of each row.
- ``CudaBatchRunner`` over a rank's base runner on the fake device of ``cuda_batch_fakes`` as a one-rank group
  (NCCL recorded, the gather a copy): a step of decodes, a lone decode and prompt chunks gives
  the fake model's picks through the gathered rows, its collectives are warmed up before any
  capture and run in every graph; h2o is not offered; a RankComm other than the base runner's
  is refused.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

from cuda_batch_fakes import chunk, dev, one  # noqa: F401  (dev: the fixture)
from nexusrt import memory
from nexusrt.backends.cuda import step as steps
from nexusrt.backends.cuda.batch_buffers import BatchBuffers
from nexusrt.backends.cuda.buffers import RunnerBuffers
from nexusrt.backends.cuda.collectives import RankComm
from nexusrt.backends.cuda.ragged import RaggedBuffers
from nexusrt.backends.cuda.weights import _layout
from nexusrt.models.synthetic import SyntheticWeights
from nexusrt.parallel import ShardPlan, shard
from nexusrt.reference.sampling import SamplingParams
from nexusrt.scheduler.graph import TaskGraph
from tests.fakes import FakeRuntime
from tests.test_cuda_step_cpu import _config, _FakeLt, no_occupancy_query  # noqa: F401


class FakeGroup:
    """NcclGroup's interface in one process: records each call; with one rank the gather is a copy."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size, self.calls = rank, size, []

    def all_reduce(self, x, stream):
        self.calls.append(("all_reduce", x.ptr, x.numel))

    def all_gather(self, send, recv, stream):
        self.calls.append(("all_gather", send.ptr, recv.ptr, send.numel))
        if self.size == 1 and send.ptr != recv.ptr:
            ctypes.memmove(recv.ptr, send.ptr, send.nbytes)


def _names(stages) -> list[str]:
    return [s.name.split(".", 1)[1] for s in stages]


def _check_layers(stages, x, layers: int) -> None:
    """An in-place all-reduce of ``x`` right after every O and down product, and nowhere else."""
    names = _names(stages)
    reduces = [i for i, n in enumerate(names) if n.endswith("all_reduce")]
    assert len(reduces) == 2 * layers
    for i in range(layers):
        for product in ("o", "down"):
            at = names.index(f"layer{i}.{product}")
            s = stages[at + 1]
            assert names[at + 1] == f"layer{i}.{product}.all_reduce" and s.kind == "host"
            assert [t.ptr for t in s.inputs] == [x.ptr] == [t.ptr for t in s.outputs]
            assert s.inputs[0].shape == x.shape


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("variant", ["llama_tiny", "qwen2_bias"])
def test_a_ranks_batch_chains_put_the_collectives_where_the_plan_needs_them(variant, rank, cpu_rt,
                                                                          no_occupancy_query, monkeypatch):
    from nexusrt.kernels.ops import gemm as gm

    cfg, size = _config(variant), 2
    part = shard(SyntheticWeights(cfg), ShardPlan(cfg, size), rank)
    local, vp = part.config, cfg.vocab_size // size
    weights, _ = _layout(part)
    weights.inv_freq = memory.empty((cfg.head_dim // 2,), "fp32")
    weights.owned.append(weights.inv_freq)
    rt, lt = FakeRuntime(), _FakeLt()
    residuals = []
    real = gm.gemm

    def record(rt, y, w, x, **kw):
        if any(w.ptr in (lw.o.ptr, lw.down.ptr) for lw in weights.layers):
            residuals.append((y.ptr, None if kw.get("residual") is None else kw["residual"].ptr))
        return real(rt, y, w, x, **kw)

    monkeypatch.setattr(gm, "gemm", record)
    pre = RunnerBuffers(rt, local, 300, 256, positions=363, pool_blocks=41, lm_head_rows=vp)
    bb = BatchBuffers(rt, local, 8, 23, 600, pre.k_pools, pre.v_pools, vocab_part=vp, ranks=size)
    rg = RaggedBuffers(256, 8, 23)
    tp = RankComm(FakeGroup(rank, size), cfg.vocab_size)
    try:
        assert bb.rank_logits.shape == (8, vp) and bb.gathered.shape == (size * 8 * vp,)
        m = 4
        chains = {"batch": steps.batch_decode_stages(rt, local, weights, bb, m, lt, bb.workspace(local, m, 3), tp=tp),
                  "ragged": steps.ragged_prefill_stages(rt, local, weights, pre, rg, 128, lt, tp=tp),
                  "chunk_logits": steps.chunk_logits_stages(rt, local, weights, bb, m, lt, tp)}
        for name, stages in chains.items():
            TaskGraph(stages, name).validate()
        layers = cfg.num_hidden_layers
        _check_layers(chains["batch"], bb.hidden[0:m], layers)
        _check_layers(chains["ragged"], pre.hidden[0:128], layers)
        assert len(residuals) == 2 * 2 * layers and all(res == (y if rank == 0 else None) for y, res in residuals)
        for name, rows in (("batch", bb.logits[0:m]), ("chunk_logits", bb.logits[8:8 + m])):
            stages = chains[name]
            names = _names(stages)
            at = names.index("lm_head")
            head, gather, unpack = stages[at:at + 3]
            assert head.outputs[0].ptr == bb.rank_logits.ptr and head.outputs[0].shape == (m, vp)
            assert names[at + 1:at + 3] == ["lm_head.all_gather", "lm_head.unpack"]
            assert gather.inputs == head.outputs and gather.outputs[0].ptr == bb.gathered.ptr
            assert gather.outputs[0].numel == size * m * vp
            assert unpack.inputs == gather.outputs and unpack.outputs[0].ptr == rows.ptr
            assert unpack.outputs[0].shape == (m, cfg.vocab_size)
        sampler = chains["batch"][-2:]  # the batched sampler reads the whole rows the unpack wrote
        assert _names(sampler) == ["sample.partial", "sample.finish"] and sampler[0].inputs[0].ptr == bb.logits.ptr
        with pytest.raises(ValueError, match="h2o scores on a tensor-parallel rank"):
            steps.batch_decode_stages(rt, local, weights, bb, m, lt, bb.workspace(local, m, 3), scores=object(), tp=tp)
        plain = BatchBuffers(rt, local, 8, 23, 600, pre.k_pools, pre.v_pools)  # no rank rows: refused
        try:
            with pytest.raises(ValueError, match="vocab_part"):
                steps.chunk_logits_stages(rt, local, weights, plain, m, lt, tp)
        finally:
            plain.free()
    finally:
        for t in (rg, bb, pre, weights):
            t.free()
    assert memory.stats()["in_use_bytes"] == 0


def test_unpack_puts_each_ranks_block_in_its_columns(cpu_rt, monkeypatch):
    import sys

    copy_mod = sys.modules["nexusrt.memory.copy"]
    made = []

    def call(name, p, stream):
        assert name == "cuMemcpy2DAsync" and stream == 9
        made.append(p)
        for r in range(p.Height):
            ctypes.memmove(p.dstDevice + r * p.dstPitch, p.srcDevice + r * p.srcPitch, p.WidthInBytes)

    monkeypatch.setattr(copy_mod, "call", call)
    monkeypatch.setattr(copy_mod, "cu", lambda: SimpleNamespace(
        CUDA_MEMCPY2D=SimpleNamespace, CUmemorytype=SimpleNamespace(CU_MEMORYTYPE_DEVICE=2)))
    size, m, vocab = 4, 3, 32
    vp = vocab // size
    want = np.arange(m * vocab, dtype=np.float32).reshape(m, vocab)
    blocks = want.reshape(m, size, vp).transpose(1, 0, 2).copy()  # what an all-gather leaves: [N, m, V/N]
    tp = RankComm(FakeGroup(2, size), vocab)
    with memory.from_numpy(blocks.reshape(-1)) as gathered, memory.zeros((m, vocab), "fp32") as logits:
        tp.unpack_rows(gathered, logits)(SimpleNamespace(handle=9))
        assert np.array_equal(logits.to_numpy(), want) and len(made) == size
        with pytest.raises(ValueError, match="gathered holds"):
            tp.unpack_rows(gathered[0:size * m * vp - 1], logits)


def test_a_one_rank_batch_runner_steps_through_the_gathered_rows(dev):  # noqa: F811
    group = FakeGroup(0, 1)
    tp = RankComm(group, dev.cfg.vocab_size)
    r = dev.runner(tp=tp)
    warm = list(group.calls)
    # before any capture: one eager all-reduce per decode row count, the gathers of a row and of each bucket
    assert [c[0] for c in warm] == ["all_reduce"] * 4 + ["all_gather"] * 4
    assert [c[2] for c in warm[:4]] == [dev.cfg.hidden_size * m for m in (1, 1, 2, 4)]
    assert "h2o" not in r.prune_policies and "sink-window" in r.prune_policies
    del group.calls[:]
    sampled = SamplingParams(temperature=0.9, top_k=7, seed=11)
    steps_ = [[one(5, 10, [0]), one(9, 3, [1], params=sampled, step=2), one(200, 40, [2, 3, 4])],
              [one(17, 30, [6, 7])],  # a lone decode: the one-sequence graph, gathered in place
              [chunk([3, 4, 5, 6], 0, [8], logits=True), chunk(list(range(20, 90)), 0, [9, 10, 11, 12, 13], logits=True,
                                                                params=sampled, step=0), one(8, 5, [14])]]
    for batch in steps_:
        for e in batch:
            e.logits = True
        assert r.run_tokens(batch) == dev.expected(batch)
    layers = dev.cfg.num_hidden_layers
    reduces = sum(c[0] == "all_reduce" for c in group.calls)
    assert reduces == 2 * layers * 4  # the batch graph, the lone decode, the ragged pass, the batch graph again
    assert [e for e in dev.log if e[0] == "2d"]  # the batch rows' unpack ran
    with pytest.raises(ValueError, match="h2o scores"):
        r.run_tokens([one(5, 10, [0], logits=True, scores=np.zeros(16))])
    assert r.tp is tp  # the base runner's comm: the batch runner cannot hold another
