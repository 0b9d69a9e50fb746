"""The CUDA runner's wiring, checked on the CPU: its buffers (allocated by the CPU arena), the
decode step, the LM-head step and every prefill chunk built as stage chains through the real
launchers (a fake kernel cache stands in for the GPU and records what was asked), then
validated as task graphs. A launcher keyword, shape or dtype that no longer matches what the
runner passes fails here, without a GPU; every kernel asked for must exist in the compiled
source it is asked from.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from nexusrt import memory
from nexusrt.backends.cuda import step as steps
from nexusrt.backends.cuda.buffers import RunnerBuffers
from nexusrt.backends.cuda.chunks import buckets_for
from nexusrt.backends.cuda.weights import _layout
from nexusrt.kernels.compiler import compile_file
from nexusrt.models.presets import preset
from nexusrt.models.synthetic import SyntheticWeights
from nexusrt.scheduler.graph import TaskGraph
from tests.fakes import FakeRuntime

VARIANTS = {
    "llama_tiny": dict(),
    "qwen2_bias": dict(architecture="Qwen2ForCausalLM"),
    "qwen3_norms_d128": dict(architecture="Qwen3ForCausalLM", head_dim=128, num_attention_heads=8,
                             num_key_value_heads=2),
}


class _FakeLt:
    """An LtContext as the GEMM launcher sees it: a plan per problem."""

    def __init__(self):
        self.plans = {}

    def plan(self, problem):
        return self.plans.setdefault(problem, SimpleNamespace(problem=problem))


def _config(variant):
    return dataclasses.replace(preset("tiny"), **VARIANTS[variant])


def _device_weights(cfg):
    """The runner's weight layout for ``cfg`` in the CPU arena, with RoPE's inverse frequencies."""
    weights, _ = _layout(SyntheticWeights(cfg))
    weights.inv_freq = memory.empty((cfg.head_dim // 2,), "fp32")
    weights.owned.append(weights.inv_freq)
    return weights


def _check_kernels_exist(rt) -> None:
    """Every kernel the launchers asked the fake cache for is in the source compiled for sm_90a."""
    sources = {}
    for source, name, _ in rt.asked:
        cubin = sources.setdefault(source, compile_file(source, "sm_90a").cubin)
        assert name.encode() in cubin, f"{name} is not a kernel of {source}.cu"


@pytest.fixture
def no_occupancy_query(monkeypatch):
    """Launchers that size grids by the driver's occupancy answer get a fixed one (2 blocks/SM)."""
    import importlib
    import pkgutil

    from nexusrt.kernels import ops

    for info in pkgutil.iter_modules(ops.__path__):
        module = importlib.import_module(f"{ops.__name__}.{info.name}")
        if hasattr(module, "blocks_per_sm"):
            monkeypatch.setattr(module, "blocks_per_sm", lambda kernel, threads, shared: 2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_step_builds_and_validates_through_the_real_launchers(variant, cpu_rt, no_occupancy_query):
    cfg = _config(variant)
    rt = FakeRuntime()
    weights = _device_weights(cfg)
    buckets = buckets_for(300)
    buffers = RunnerBuffers(rt, cfg, 300, buckets[-1], positions=300 + buckets[0] - 1)
    lt = _FakeLt()
    try:
        if variant == "qwen2_bias":
            assert weights.layers[0].qkv_bias is not None
        if variant == "qwen3_norms_d128":
            assert weights.layers[0].q_norm is not None
        chains = {"decode": steps.decode_stages(rt, cfg, weights, buffers, sample=True),
                  "decode_fused": steps.decode_stages(rt, cfg, weights, buffers, sample=True, fuse_rope=True),
                  "logits": steps.logits_stages(rt, cfg, weights, buffers)}
        for m in buckets + (1, 17):
            chains[f"prefill{m}"] = steps.prefill_stages(rt, cfg, weights, buffers, m, lt)
        with memory.empty((17, cfg.vocab_size), "fp32") as logits:
            chains["all_logits"] = steps.prefill_stages(rt, cfg, weights, buffers, 17, lt, all_logits=logits)
            for name, stages in chains.items():
                TaskGraph(stages, name).validate()  # names, hazards, order
        layers = cfg.num_hidden_layers
        assert len(chains["decode"]) == 1 + 6 * layers + 1 + 3  # embed, 6 per layer, LM head, sampler (3)
        # The fused QKV + RoPE + append takes one stage where the shape allows (not q/k norms).
        fused = variant != "qwen3_norms_d128"
        assert len(chains["decode_fused"]) == 1 + (5 if fused else 6) * layers + 1 + 3
        assert any(s.name.endswith(".qkv_rope") for s in chains["decode_fused"]) == fused
        assert len(chains["prefill64"]) == 1 + 9 * layers  # norm, qkv, rope, attention, o, norm, gate_up, silu, down
        assert len(chains["all_logits"]) == 1 + 9 * layers + 2
        gemm_m = {p.m for p in lt.plans}
        assert set(buckets) | {1, 17} <= gemm_m  # every chunk size planned its GEMMs
        assert any(p.bias for p in lt.plans) == (variant == "qwen2_bias")
    finally:
        buffers.free()
        weights.free()
    _check_kernels_exist(rt)
    assert memory.stats()["in_use_bytes"] == 0


def test_decode_step_takes_the_cluster_attention_when_asked(cpu_rt, no_occupancy_query):
    cfg = _config("llama_tiny")
    rt = FakeRuntime()
    rt.profile.compute_capability = (9, 0)
    weights = _device_weights(cfg)
    buffers = RunnerBuffers(rt, cfg, 300, buckets_for(300)[-1], positions=300 + buckets_for(300)[0] - 1)
    try:
        stages = steps.decode_stages(rt, cfg, weights, buffers, sample=False, cluster=True)
        attn = [s for s in stages if s.name.endswith(".attention")]
        assert attn and all(s.kernel.cluster == (1, 8, 1) for s in attn)
        plain = [s for s in steps.decode_stages(rt, cfg, weights, buffers, sample=False) if s.name.endswith(".attention")]
        assert all(s.kernel.cluster is None for s in plain)  # the default: the plain kernels
    finally:
        buffers.free()
        weights.free()
    _check_kernels_exist(rt)
    assert memory.stats()["in_use_bytes"] == 0


def test_buffers_hold_a_block_table_for_every_position(cpu_rt):
    cfg = _config("llama_tiny")
    buffers = RunnerBuffers(FakeRuntime(), cfg, 100, 256, positions=163)
    try:
        table = buffers.block_table.to_numpy()
        assert len(table) * 16 >= 163 and len(set(table.tolist())) == len(table)
        assert buffers.prompt.shape == (163,)  # a padded chunk's ids are staged too
    finally:
        buffers.free()


def test_fit_check_counts_the_prefill_buffers_the_runner_allocates(cpu_rt):
    from nexusrt.backends.cuda.buffers import working_bytes
    from nexusrt.engine.fit import check_fit, footprint
    from nexusrt.errors import ModelTooLarge
    from nexusrt.kernels.ops.cublaslt import WORKSPACE_BYTES

    cfg = _config("qwen2_bias")
    chunk = 1024
    buffers = RunnerBuffers(FakeRuntime(), cfg, 1000, chunk, positions=1063)
    try:
        rows = [buffers.hidden, buffers.qkv, buffers.q, buffers.normed, buffers.attn, buffers.gate_up, buffers.act,
                buffers.ids]
        tuning = 2 * (chunk * cfg.hidden_size + 2 * cfg.intermediate_size * cfg.hidden_size
                      + chunk * 2 * cfg.intermediate_size)
        assert working_bytes(cfg, chunk) == sum(t.nbytes for t in rows) + WORKSPACE_BYTES + tuning
    finally:
        buffers.free()
    fp = footprint(cfg, "cuda", 1000)
    assert fp.working == working_bytes(cfg, 1024) and fp.total == fp.weights + fp.kv + fp.working
    assert footprint(cfg, "cpu", 1000).working == 0
    with pytest.raises(ModelTooLarge, match="of prefill buffers"):
        check_fit(cfg, "cuda", 1000, "tiny", available=(fp.weights + fp.kv, "a test"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_decode_step_builds_through_the_real_launchers(variant, cpu_rt, no_occupancy_query):
    """The batch runner's buffers (a shared pool with a scratch block) and its batched decode graph
    for every bucket, plain and with the deterministic mode's fixed attention chunk."""
    from nexusrt.backends.cuda.batch_buffers import BatchBuffers, batch_buckets
    from nexusrt.kernels.ops.attention_decode import tokens_per_step

    cfg = _config(variant)
    rt = FakeRuntime()
    weights = _device_weights(cfg)
    buckets = batch_buckets(5)
    assert buckets == (1, 2, 4, 8)
    pre = RunnerBuffers(rt, cfg, 300, 64, positions=363, pool_blocks=41)
    bb = BatchBuffers(rt, cfg, buckets[-1], 23, 600, pre.k_pools, pre.v_pools)
    lt = _FakeLt()
    try:
        assert pre.k_pools[0].shape[0] == 41 and pre.block_table.shape == (23,)
        fixed = 4 * tokens_per_step(cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads)
        for m in buckets:
            for chunk in (0, fixed):
                stages = steps.batch_decode_stages(rt, cfg, weights, bb, m, lt, bb.workspace(cfg, m, 3), chunk)
                TaskGraph(stages, f"batch{m}").validate()
                # embed, layers, norm, LM head, the batched sampler's two launches
                assert len(stages) == 1 + 9 * cfg.num_hidden_layers + 4
                part, finish = stages[-2:]
                assert part.name.endswith("sample.partial") and finish.name.endswith("sample.finish")
                assert part.kernel.grid == (-(-cfg.vocab_size // 4096), m, 1) and finish.kernel.grid == (m, 1, 1)
                assert bb.next in finish.outputs and bb.params in part.inputs and bb.steps in finish.inputs
        assert {p.m for p in lt.plans} == set(buckets)
        with pytest.raises(ValueError, match="fixed_chunk"):
            steps.batch_decode_stages(rt, cfg, weights, bb, 2, lt, bb.workspace(cfg, 2, 3), fixed + 1)
    finally:
        bb.free()
        pre.free()
        weights.free()
    _check_kernels_exist(rt)
    assert any(name.startswith("attention_decode_rows") for _, name, _ in rt.asked)
    assert any(name.startswith("rope_append_rows") for _, name, _ in rt.asked)
    asked = {name for _, name, _ in rt.asked}
    assert {"sample_rows_partial", "sample_rows_finish"} <= asked and not any("argmax" in n for n in asked)
    assert memory.stats()["in_use_bytes"] == 0


def test_batch_buckets_and_kv_bytes():
    from nexusrt.backends.cuda.batch_buffers import batch_buckets, blocks_for_bytes

    assert batch_buckets(1) == (1,) and batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(65)[-1] == 128
    for bad in (0, 257, True, 2.0):
        with pytest.raises(ValueError, match="max_batch"):
            batch_buckets(bad)
    cfg = _config("llama_tiny")
    per_block = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 16 * cfg.head_dim * 2
    assert blocks_for_bytes(cfg, 10 * per_block + 1) == 10


def test_a_step_entry_the_cuda_batch_runner_cannot_take_is_refused_by_name():
    from nexusrt.backends.base import Rows
    from nexusrt.backends.cuda.batch_buffers import check_entry

    def check(ids=(5,), start=3, table=(7,), **kw):
        check_entry(Rows(np.asarray(ids, np.int32), start, list(table), **kw), 100, 8, 50, 300)

    check()
    check(ids=range(1, 40), start=10, table=(1, 2, 3, 4))
    check(ids=range(1, 40), start=10, table=(1, 2, 3, 4), position=61)  # a pruned sequence's chunk
    for kwargs, match in ((dict(ids=()), "at least one id"), (dict(start=99, ids=(1, 2)), "exceed the context"),
                          (dict(position=2), "RoPE position 2 lies below"),
                          (dict(position=100), "exceed the context"),
                          (dict(scores=np.zeros(3)), "scores hold 3 slots; the rows fill 4"),
                          (dict(start=16), "does not cover"), (dict(table=range(9)), "does not cover"),
                          (dict(table=(50,)), "outside 0..49"), (dict(table=(-1,)), "outside"),
                          (dict(ids=(300,)), "token ids"), (dict(ids=(1, -2)), "token ids")):
        with pytest.raises(ValueError, match=match):
            check(**kwargs)


def test_the_lone_decode_chain_refuses_a_sampler_or_a_host_tier(cpu_rt, no_occupancy_query):
    """decode_stages(meta=...) runs RoPE/append by the rows kernel over device blocks and leaves
    b.pos to the caller: a sampler (which advances b.pos, not meta) or a host tier is refused."""
    cfg = _config("llama_tiny")
    rt = FakeRuntime()
    weights = _device_weights(cfg)
    buckets = buckets_for(300)
    buffers = RunnerBuffers(rt, cfg, 300, buckets[-1], positions=300 + buckets[0] - 1)
    meta = memory.zeros((4,), "int32")
    try:
        stages = steps.decode_stages(rt, cfg, weights, buffers, sample=False, meta=meta)
        assert meta in stages[2].inputs  # layer 0's rope_append reads the position and slot words
        with pytest.raises(ValueError, match="no sampler"):
            steps.decode_stages(rt, cfg, weights, buffers, sample=True, meta=meta)
        buffers.k_host_pools = [meta]  # any host tier at all
        with pytest.raises(ValueError, match="no host KV tier"):
            steps.decode_stages(rt, cfg, weights, buffers, sample=False, meta=meta)
    finally:
        buffers.k_host_pools = []
        meta.free()
        buffers.free()
        weights.free()
