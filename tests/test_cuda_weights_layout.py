"""The CUDA runner's weight layout (fused qkv / gate_up, fp32 norms and biases), checked on
the CPU backend: the same layout and streaming load fill host tensors there."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import nexusrt as nrt
from nexusrt.backends.cuda.weights import upload
from nexusrt.models.loader import load_model
from tests import helpers_hf as H


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3", "qwen2_bf16", "llama_sharded"])
def test_layout_matches_the_checkpoint(variant, cpu_rt):
    model = load_model(H.checkpoint(variant))
    src = model.weights
    w = upload(cpu_rt, src, cpu_rt.streams["compute"])
    try:
        bf16 = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
        for i, lw in enumerate(w.layers):
            np.testing.assert_array_equal(lw.qkv.to_numpy().astype(np.float32), bf16(src.fused(i, "qkv")))
            np.testing.assert_array_equal(lw.gate_up.to_numpy().astype(np.float32), bf16(src.fused(i, "gate_up")))
            np.testing.assert_array_equal(lw.down.to_numpy().astype(np.float32), bf16(src.load(f"layers.{i}.down")))
            np.testing.assert_array_equal(lw.mlp_norm.to_numpy(), src.load(f"layers.{i}.mlp_norm"))
            if lw.qkv_bias is not None:
                np.testing.assert_array_equal(lw.qkv_bias.to_numpy(), src.fused(i, "qkv_bias"))
            assert (lw.q_norm is not None) == (model.config.qk_norm is True)
        assert (w.lm_head is w.embed) == model.config.tie_word_embeddings
        assert w.load_report.path == "staging" and w.load_report.tensors == len(src.specs())
    finally:
        w.free()
    assert cpu_rt.arena.stats()["by_tag"].get("weights", 0) == 0


def test_failed_load_leaves_nothing(cpu_rt, tmp_path):
    path = H.copy_checkpoint("llama", tmp_path / "ckpt")
    model = load_model(path)
    shard = path / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated after the header was checked
    with pytest.raises(nrt.ModelError, match="model.safetensors"):
        upload(cpu_rt, model.weights, cpu_rt.streams["compute"])
    assert cpu_rt.arena.stats()["by_tag"].get("weights", 0) == 0
