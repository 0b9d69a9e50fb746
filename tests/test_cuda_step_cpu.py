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
    weights, _ = _layout(SyntheticWeights(cfg))
    weights.inv_freq = memory.empty((cfg.head_dim // 2,), "fp32")
    weights.owned.append(weights.inv_freq)
    buckets = buckets_for(300)
    buffers = RunnerBuffers(rt, cfg, 300, buckets[-1], positions=300 + buckets[0] - 1)
    lt = _FakeLt()
    try:
        if variant == "qwen2_bias":
            assert weights.layers[0].qkv_bias is not None
        if variant == "qwen3_norms_d128":
            assert weights.layers[0].q_norm is not None
        chains = {"decode": steps.decode_stages(rt, cfg, weights, buffers, sample=True),
                  "logits": steps.logits_stages(rt, cfg, weights, buffers)}
        for m in buckets + (1, 17):
            chains[f"prefill{m}"] = steps.prefill_stages(rt, cfg, weights, buffers, m, lt)
        with memory.empty((17, cfg.vocab_size), "fp32") as logits:
            chains["all_logits"] = steps.prefill_stages(rt, cfg, weights, buffers, 17, lt, all_logits=logits)
            for name, stages in chains.items():
                TaskGraph(stages, name).validate()  # names, hazards, order
        layers = cfg.num_hidden_layers
        assert len(chains["decode"]) == 1 + 6 * layers + 1 + 2  # embed, 6 per layer, LM head, sampler
        assert len(chains["prefill64"]) == 1 + 9 * layers  # norm, qkv, rope, attention, o, norm, gate_up, silu, down
        assert len(chains["all_logits"]) == 1 + 9 * layers + 2
        gemm_m = {p.m for p in lt.plans}
        assert set(buckets) | {1, 17} <= gemm_m  # every chunk size planned its GEMMs
        assert any(p.bias for p in lt.plans) == (variant == "qwen2_bias")
    finally:
        buffers.free()
        weights.free()
    sources = {}
    for source, name, _ in rt.asked:
        cubin = sources.setdefault(source, compile_file(source, "sm_90a").cubin)
        assert name.encode() in cubin, f"{name} is not a kernel of {source}.cu"
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
