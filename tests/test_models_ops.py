"""The reference NumPy ops (what CUDA kernels are validated against) against torch / HF pieces."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nexusrt.models import ModelConfig
from nexusrt.reference import ops

torch = pytest.importorskip("torch")

RNG = np.random.default_rng(1234)


def _cfg(**kw):
    base = dict(architecture="LlamaForCausalLM", hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=100, rope_theta=500000.0)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
])
def test_rope_inv_freq_matches_hf(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = _cfg(rope_scaling=scaling)
    hf_cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0, **(scaling or {})})
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":  # HF's formula, written out (its helper's signature varies across versions)
        ref = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))
    else:
        ref, _ = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu")
    ours = ops.rope_inv_freq(cfg)
    assert ours.dtype == np.float32 and ours.shape == (32,)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
    if scaling:  # the scaling changed something
        assert not np.allclose(ours, ops.rope_inv_freq(_cfg()))


def test_apply_rope_matches_hf_rotate_half():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x = RNG.standard_normal((7, 3, 64)).astype(np.float32)
    pos = np.array([0, 1, 2, 5, 100, 1000, 4095])
    inv = ops.rope_inv_freq(_cfg())
    freqs = torch.tensor(pos, dtype=torch.float32)[:, None] * torch.tensor(inv)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    xt = torch.tensor(x).transpose(0, 1)[None]  # [1, H, T, D]
    ref, _ = apply_rotary_pos_emb(xt, xt, emb.cos()[None], emb.sin()[None])
    np.testing.assert_allclose(ops.apply_rope(x, pos, inv), ref[0].transpose(0, 1).numpy(), atol=2e-6)


@pytest.mark.parametrize("window", [None, 3])
def test_attention_gqa_matches_torch(window):
    t, s, hq, hkv, d = 4, 9, 8, 2, 32
    q = RNG.standard_normal((t, hq, d)).astype(np.float32)
    k = RNG.standard_normal((s, hkv, d)).astype(np.float32)
    v = RNG.standard_normal((s, hkv, d)).astype(np.float32)
    qpos = np.arange(s - t, s)  # the last t positions: a prefill continuing a cache
    mask = torch.tensor(np.arange(s)[None, :] <= qpos[:, None])
    if window:
        mask &= torch.tensor(np.arange(s)[None, :] > qpos[:, None] - window)
    kt = torch.tensor(k).repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
    vt = torch.tensor(v).repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(torch.tensor(q).transpose(0, 1), kt, vt, attn_mask=mask)
    out = ops.attention(q, k, v, qpos, window)
    np.testing.assert_allclose(out, ref.transpose(0, 1).numpy(), atol=1e-5)


def test_rms_norm_silu_linear_embedding():
    x = (RNG.standard_normal((5, 48)) * 3).astype(np.float32)
    w = (1 + 0.1 * RNG.standard_normal(48)).astype(np.float32)
    ref = torch.nn.functional.rms_norm(torch.tensor(x), (48,), torch.tensor(w), eps=1e-5)
    np.testing.assert_allclose(ops.rms_norm(x, w, 1e-5), ref.numpy(), rtol=1e-5, atol=1e-6)
    g, u = x[:, :24], x[:, 24:]
    np.testing.assert_allclose(ops.silu_mul(g, u), (torch.nn.functional.silu(torch.tensor(g)) * torch.tensor(u)).numpy(),
                               rtol=1e-5, atol=1e-6)
    assert ops.silu_mul(np.array([-1000.0], np.float32), np.array([1.0], np.float32))[0] == 0.0
    wt = RNG.standard_normal((16, 48)).astype(np.float32)
    b = RNG.standard_normal(16).astype(np.float32)
    np.testing.assert_allclose(ops.linear(x, wt, b), x @ wt.T + b, rtol=1e-5)
    table = RNG.standard_normal((10, 4)).astype(np.float32)
    np.testing.assert_array_equal(ops.embedding(np.array([3, 0, 3]), table), table[[3, 0, 3]])


def test_attention_first_query_sees_only_itself():
    q = RNG.standard_normal((3, 2, 8)).astype(np.float32)
    k = RNG.standard_normal((3, 1, 8)).astype(np.float32)
    v = RNG.standard_normal((3, 1, 8)).astype(np.float32)
    out = ops.attention(q, k, v, np.arange(3))
    np.testing.assert_allclose(out[0, 0], v[0, 0], rtol=1e-6)
    assert math.isfinite(float(out.sum()))
