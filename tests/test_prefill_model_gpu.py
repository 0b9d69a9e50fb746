"""The tensor-core prefill of the CUDA runner against HF transformers on the GPU.

For all four families at head_dim 64 and 128: logits of every prompt row for prompts of 1,
17, 1,000 and 3,000 tokens within HF's own bf16 error (tests/test_cuda_model.py's ratio
check); chunked and unchunked prefill of one prompt agree to bf16 rounding; the bucketed,
graph-replayed ``prefill`` (padded last chunk) gives the last row's logits that the
stage-by-stage ``forward_all`` gives; greedy continuation of a 2k-token prompt equals HF's
up to reported ties.
"""

from __future__ import annotations

import numpy as np
import pytest

import nexusrt as nrt
from tests import helpers_hf as H
from tests.test_cuda_model import GPU_SHAPE, _check_against_hf, _hf_refs, check_greedy_against_hf

pytestmark = pytest.mark.gpu

FAMILIES = {
    "llama_d64": dict(arch="llama", tie=True, rope_theta=500000.0, rope_scaling=H.LLAMA3_ROPE),
    "mistral_d128": dict(arch="mistral", sliding_window=None, head_dim=128),
    "qwen2_d64": dict(arch="qwen2"),
    "qwen3_d128": dict(arch="qwen3", tie=True, head_dim=128),
}
_BUILT = {}


def _checkpoint(name, tmp_path_factory):
    if name not in _BUILT:
        kwargs = {**GPU_SHAPE, **FAMILIES[name], "max_position_embeddings": 4096}
        _BUILT[name] = H.build_checkpoint(tmp_path_factory.mktemp(name), H.CheckpointSpec(),
                                          seed=len(_BUILT) + 41, **kwargs)
    return _BUILT[name]


def _runner(path, max_context):
    from nexusrt.backends.cuda.runner import CudaRunner
    from nexusrt.models.loader import load_model

    return CudaRunner(load_model(path), nrt.firmware.runtime(), max_context=max_context)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("length", [1, 17, 1000, 3000])
def test_prefill_rows_within_hf_bf16_error(family, length, gpu_rt, tmp_path_factory):
    path = _checkpoint(family, tmp_path_factory)
    ids = np.random.default_rng(length).integers(0, 300, length).tolist()
    ref, hf_bf16 = _hf_refs(path, ids)
    runner = _runner(path, 3072)
    try:
        ours = runner.forward_all(np.asarray(ids, np.int32))
    finally:
        runner.close()
    _check_against_hf(ours, ref, hf_bf16, f"{family} prompt {length}")


@pytest.mark.parametrize("family", ["llama_d64", "qwen3_d128"])
def test_chunked_and_unchunked_prefill_agree(family, gpu_rt, tmp_path_factory):
    path = _checkpoint(family, tmp_path_factory)
    ids = np.random.default_rng(7).integers(0, 300, 1500).astype(np.int32)
    runner = _runner(path, 2048)
    try:
        whole = runner.forward_all(ids, chunk=1024)
        pieces = runner.forward_all(ids, chunk=100)
    finally:
        runner.close()
    err = H.rel_err(pieces, whole)
    print(f"{family}: chunk 100 vs 1024 rel err {err:.2e}")
    assert err < 1e-2


@pytest.mark.parametrize("length", [1, 2, 63, 64, 65, 300, 1000, 1100, 2047])
def test_bucketed_prefill_equals_forward_all_last_row(length, gpu_rt, tmp_path_factory):
    """The graph path (buckets 64..2048 at this context, a padded last chunk, the LM-head graph) against
    the stage-by-stage path on the same runner."""
    path = _checkpoint("qwen2_d64", tmp_path_factory)
    ids = np.random.default_rng(length + 3).integers(0, 300, length).astype(np.int32)
    runner = _runner(path, 2048)
    try:
        ref = runner.forward_all(ids)[-1]
        runner.reset()
        runner.prefill(ids)
        got = runner.last_logits()
        assert runner.position == length
        # and the cache it left is right: one decode step equals the teacher-forced next row
        nxt = int(np.argmax(got))
        runner.decode(nxt)
        step = runner.last_logits()
        ref_step = runner.forward_all(np.append(ids, nxt).astype(np.int32))[-1]
    finally:
        runner.close()
    assert H.rel_err(got, ref) < 1e-2
    assert H.rel_err(step, ref_step) < 1e-2


@pytest.mark.parametrize("family", ["llama_d64", "qwen3_d128"])
def test_greedy_after_a_2k_prompt_matches_hf(family, gpu_rt, tmp_path_factory):
    path = _checkpoint(family, tmp_path_factory)
    ids = np.random.default_rng(11).integers(0, 300, 2048).tolist()
    check_greedy_against_hf(path, ids, 32, max_context=2048 + 64, label=f"{family} after 2048")


def test_runner_frees_its_cublaslt_workspace(gpu_rt):
    before = nrt.memory.stats()["in_use_bytes"]
    llm = nrt.LLM("synthetic:tiny", backend="cuda", max_context=300)
    llm.generate("hello " * 40, max_new_tokens=4, temperature=0)
    assert nrt.memory.stats()["by_tag"].get("cublaslt", 0) > 0
    llm.close()
    assert nrt.memory.stats()["in_use_bytes"] == before
    assert nrt.memory.stats()["by_tag"].get("cublaslt", 0) == 0
