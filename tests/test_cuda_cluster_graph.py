"""The one-sequence runner's decode attention on the GPU. With the tensor-core (mma) kernels, one
graph serves every context up to ``MMA_WIDE_FROM`` tokens (head_dim 64: a second graph with the wide
split count from there on, when the runner's context reaches it); without them
(``NEXUSRT_ATTN_MMA=0``), two graphs: attention by the cluster kernels while the context fits one
cluster of steps (faster there), by the plain kernels past it (the cluster kernels' long path is
slower), picked per step by the context the step reads."""

from __future__ import annotations

import numpy as np
import pytest

from nexusrt.kernels.ops import attention_decode as attn_dec

from test_cuda_model import GPU_SHAPE, _checkpoint, check_greedy_against_hf
from tests import helpers_hf as H

LIMIT = 256  # the qwen3 test checkpoint: head_dim 128, group 2
# The wide graph's threshold, lowered for the tests from MMA_WIDE_FROM[64] (14,336): at 8 KV heads on
# 132 SMs, 33 and 49 splits already cut a 6,400-token context differently (25 and 34 splits).
WIDE_FROM = 6400


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """head_dim 64 with 8 KV heads: enough heads that the wide count differs from the narrow one."""
    return H.build_checkpoint(tmp_path_factory.mktemp("wide"), H.CheckpointSpec(), seed=61,
                              **{**GPU_SHAPE, "arch": "llama", "heads": 16, "kv_heads": 8,
                                 "max_position_embeddings": 8192})


def _lower_the_wide_threshold(rt, monkeypatch):
    if not attn_dec.mma_ok(rt):
        pytest.skip("the mma kernels need sm_80 (and NEXUSRT_ATTN_MMA not 0)")
    monkeypatch.setitem(attn_dec.MMA_WIDE_FROM, 64, WIDE_FROM)


def _skip_without_clusters(rt, monkeypatch):
    monkeypatch.setenv("NEXUSRT_ATTN_MMA", "0")  # with the mma kernels the runner has no cluster graph
    if not attn_dec.cluster_ok(rt):
        pytest.skip("the cluster kernels need sm_90 (and NEXUSRT_ATTN_CLUSTER not 0)")


@pytest.mark.gpu
@pytest.mark.parametrize("mma", ["1", "0"])
def test_greedy_generation_across_the_cluster_limit_matches_hf(gpu_rt, tmp_path_factory, monkeypatch, mma):
    """With mma the same contexts cross the mma kernels' one-split limit (4 steps, 256 tokens at
    head_dim 128) into two-step splits."""
    if mma == "1" and not attn_dec.mma_ok(gpu_rt):
        pytest.skip("the mma kernels need sm_80 (and NEXUSRT_ATTN_MMA not 0)")
    if mma == "0":
        _skip_without_clusters(gpu_rt, monkeypatch)
    path = _checkpoint("qwen3", tmp_path_factory)
    assert attn_dec.cluster_context_limit(128, 2) == LIMIT
    assert attn_dec.MMA_ONE_SPLIT_STEPS[128] * attn_dec.tokens_per_step(128, 2, mma=True) == LIMIT
    ids = np.random.default_rng(13).integers(0, 300, LIMIT - 16).tolist()  # 16 steps each side
    check_greedy_against_hf(path, ids, 32, max_context=320, label=f"qwen3 across the limit (mma={mma})")


@pytest.mark.gpu
def test_decode_picks_the_cluster_graph_up_to_the_limit_and_the_plain_one_past_it(gpu_rt, tmp_path_factory,
                                                                                   monkeypatch):
    import nexusrt as nrt
    from nexusrt.backends.cuda.runner import CudaRunner
    from nexusrt.models.loader import load_model

    _skip_without_clusters(gpu_rt, monkeypatch)
    path = _checkpoint("qwen3", tmp_path_factory)
    ids = np.random.default_rng(17).integers(0, 300, LIMIT + 8).astype(np.int32)
    runner = CudaRunner(load_model(path), nrt.firmware.runtime(), max_context=320)
    try:
        assert runner.cluster_limit == LIMIT
        short, long_ = runner._decode_graph(False, LIMIT), runner._decode_graph(False, LIMIT + 1)
        assert short is not long_ and long_ is runner._decode_graph(False, None)
        assert ("decode", True, True) in runner._graphs  # the sampled pair is captured up front
        full = runner.forward_all(ids)  # teacher-forced, the prefill kernels: the reference here
        runner.reset()
        runner.prefill(ids[:LIMIT - 4])
        got = []
        for t in ids[LIMIT - 4:]:  # contexts LIMIT - 3 .. LIMIT + 8: both graphs
            got.append(runner.last_logits())
            runner.decode(int(t))
        got = np.stack(got)
        want = full[LIMIT - 5:LIMIT + 7]  # the row before each step's token, as last_logits() gives it
        assert np.isfinite(got).all()
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 0.02 * scale  # bf16 activations either way
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75
    finally:
        runner.close()


@pytest.mark.gpu
def test_decode_with_the_mma_kernels_is_one_graph_for_every_context(gpu_rt, tmp_path_factory):
    import nexusrt as nrt
    from nexusrt.backends.cuda.runner import CudaRunner
    from nexusrt.models.loader import load_model

    if not attn_dec.mma_ok(gpu_rt):
        pytest.skip("the mma kernels need sm_80 (and NEXUSRT_ATTN_MMA not 0)")
    path = _checkpoint("qwen3", tmp_path_factory)
    runner = CudaRunner(load_model(path), nrt.firmware.runtime(), max_context=320)
    try:
        assert runner.attn_mma and runner.cluster_limit == 0
        assert runner._decode_graph(False, 1) is runner._decode_graph(False, LIMIT + 1)
    finally:
        runner.close()


@pytest.mark.gpu
def test_greedy_generation_into_the_wide_graph_matches_hf(gpu_rt, wide_checkpoint, monkeypatch):
    from nexusrt.kernels.ops.common import sm_count

    _lower_the_wide_threshold(gpu_rt, monkeypatch)
    sms, step = sm_count(gpu_rt), attn_dec.tokens_per_step(64, 2, mma=True)
    wide = attn_dec.wide_splits(8, 64, 2, WIDE_FROM + 64, sms)
    narrow = attn_dec.choose_splits(8, 64, 2, WIDE_FROM + 64, sms)
    # The two graphs cut these contexts differently (else this would test one graph twice).
    assert wide > narrow and all(attn_dec.split_plan(c, wide, step, mma_head_dim=64) !=
                                 attn_dec.split_plan(c, narrow, step, mma_head_dim=64)
                                 for c in (WIDE_FROM, WIDE_FROM + 16))
    ids = np.random.default_rng(19).integers(0, 300, WIDE_FROM - 16).tolist()  # 16 steps each side
    check_greedy_against_hf(wide_checkpoint, ids, 32, max_context=WIDE_FROM + 64,
                            label="llama, 8 KV heads, into the wide graph")


@pytest.mark.gpu
def test_decode_picks_the_wide_graph_from_its_threshold_on(gpu_rt, wide_checkpoint, monkeypatch):
    import nexusrt as nrt
    from nexusrt.backends.cuda.runner import CudaRunner
    from nexusrt.models.loader import load_model

    _lower_the_wide_threshold(gpu_rt, monkeypatch)
    model = load_model(wide_checkpoint)
    runner = CudaRunner(model, nrt.firmware.runtime(), max_context=WIDE_FROM + 64)
    try:
        assert runner.wide_from == WIDE_FROM and runner.buffers.attn_ws_wide is not None
        assert ("decode", True, False, "wide") in runner._graphs  # the sampled one is captured up front
        short, wide = runner._decode_graph(False, WIDE_FROM - 1), runner._decode_graph(False, WIDE_FROM)
        assert short is runner._decode_graph(False, None) and wide is not short
        assert runner.buffers.attn_ws_wide.max_splits > runner.buffers.attn_ws.max_splits
    finally:
        runner.close()
    short_runner = CudaRunner(model, nrt.firmware.runtime(), max_context=WIDE_FROM - 1)
    try:  # a runner that never reaches the threshold has neither the graph nor its workspace
        assert short_runner.wide_from == 0 and short_runner.buffers.attn_ws_wide is None
    finally:
        short_runner.close()
