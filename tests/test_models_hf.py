"""The NumPy runner against HF transformers on tiny random checkpoints of every architecture."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers_hf import checkpoint, compare_greedy, hf_greedy, hf_logits, load_hf, rel_err  # noqa: E402

from nexusrt.backends.base import generate_tokens  # noqa: E402
from nexusrt.backends.cpu.model import CpuRunner  # noqa: E402
from nexusrt.reference.sampling import SamplingParams  # noqa: E402
from nexusrt.models import load_model  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
NEW_TOKENS = 40
ARCH_VARIANTS = ["llama", "mistral", "qwen2", "qwen3", "llama_sharded", "qwen2_bf16"]


def _ours(variant):
    model = load_model(checkpoint(variant))
    return model, CpuRunner(model.weights)


@pytest.mark.parametrize("variant", ARCH_VARIANTS)
def test_logits_match_hf(variant):
    model, runner = _ours(variant)
    ids = model.tokenizer.encode(PROMPT)
    assert len(ids) > 16  # longer than mistral's sliding window
    ours = runner.forward_all(ids)
    ref = hf_logits(load_hf(checkpoint(variant)), ids)
    assert ours.shape == ref.shape == (len(ids), model.config.vocab_size)
    assert np.std(ref) > 0.1  # the weights are not degenerate
    assert rel_err(ours, ref) < 1e-4


@pytest.mark.parametrize("variant", ARCH_VARIANTS)
def test_greedy_matches_hf_generate(variant):
    model, runner = _ours(variant)
    ids = model.tokenizer.encode(PROMPT)
    ref_ids, ref_logits = hf_greedy(load_hf(checkpoint(variant)), ids, NEW_TOKENS)
    ours: list[int] = []
    n = generate_tokens(runner, ids, NEW_TOKENS, SamplingParams(temperature=0), lambda t: ours.append(t) or False)
    assert n == NEW_TOKENS == len(ours)
    report = compare_greedy(ours, ref_ids, ref_logits)
    if "tie_at" in report:
        pytest.xfail(f"{variant}: HF's two best logits tie (gap {report['gap']:.2e}) at step {report['tie_at']}; "
                     f"identical up to there")
    assert report == {"matched": NEW_TOKENS}, report
    assert len(set(ours)) > 3  # a real sequence, not one token repeated


@pytest.mark.parametrize("variant", ["llama", "qwen3"])
def test_decode_logits_equal_teacher_forced(variant):
    """prefill + decode through the KV cache gives the logits of one full pass."""
    model, runner = _ours(variant)
    ids = model.tokenizer.encode(PROMPT)
    full = runner.forward_all(ids)
    runner.reset()
    runner.prefill(np.array(ids[:5], np.int32))
    steps = [runner.last_logits()]
    for t in ids[5:]:
        runner.decode(t)
        steps.append(runner.last_logits())
    assert runner.position == len(ids)
    assert rel_err(np.stack(steps), full[4:]) < 1e-5


def test_sharded_and_bf16_are_what_hf_loads():
    sharded = load_model(checkpoint("llama_sharded"))
    assert len(sharded.weights.index.files) > 3
    bf16 = load_model(checkpoint("qwen2_bf16"))
    assert bf16.weights.ref("layers.0.q").dtype == "BF16"
    hf = load_hf(checkpoint("qwen2_bf16"))
    ref = hf.model.layers[1].self_attn.k_proj.bias.detach().numpy()
    np.testing.assert_array_equal(bf16.weights.load("layers.1.k_bias"), ref)


def test_fused_layouts_are_row_concatenations():
    model = load_model(checkpoint("qwen2"))
    w, cfg = model.weights, model.config
    qkv = w.fused(1, "qkv")
    assert qkv.shape == (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size)
    np.testing.assert_array_equal(qkv[cfg.q_size:cfg.q_size + cfg.kv_size], w.load("layers.1.k"))
    np.testing.assert_array_equal(w.fused(1, "qkv_bias")[-cfg.kv_size:], w.load("layers.1.v_bias"))
    gate_up = w.fused(0, "gate_up")
    np.testing.assert_array_equal(gate_up[cfg.intermediate_size:], w.load("layers.0.up"))
    with pytest.raises(ValueError, match="group must be one of"):
        w.fused(0, "qk")


def test_tied_lm_head_is_the_embedding():
    model = load_model(checkpoint("llama"))
    assert model.config.tie_word_embeddings
    assert "lm_head" not in [s.name for s in model.weights.specs()]
    np.testing.assert_array_equal(model.weights.load("lm_head"), model.weights.load("embed"))
    ref = model.weights.ref("embed")
    assert ref.nbytes == model.config.vocab_size * model.config.hidden_size * 4
