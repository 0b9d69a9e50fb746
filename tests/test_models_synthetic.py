"""Synthetic weights: the documented formula, determinism, laziness, and a runnable tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from nexusrt.backends.base import ModelRunner
from nexusrt.backends.cpu.model import CpuRunner
from nexusrt.models import PRESETS, load_model, tensor_specs
from nexusrt.models.synthetic import SyntheticWeights
from nexusrt.reference.rng import MASK64, splitmix64
from nexusrt.reference.synthetic import KIND_PARAMS, synthetic_values


def _formula(seed, t, e, kind):
    """The docstring's definition, in plain Python integers and float32 scalars."""
    key = (seed * 0x9E3779B97F4A7C15 + t * 0xD1B54A32D192ED03 + e) & MASK64
    x = np.float32(splitmix64(key) >> 40) * np.float32(2.0 ** -23) - np.float32(1.0)
    center, scale = KIND_PARAMS[kind]
    return np.float32(np.float32(center) + np.float32(np.float32(scale) * x))


def test_values_follow_the_documented_formula():
    w = SyntheticWeights.from_preset("tiny", seed=5)
    for name in ("embed", "layers.1.q", "layers.0.attn_norm", "lm_head"):
        arr = w.load(name)
        spec, t = w.spec(name), w.tensor_index(name)
        flat = arr.reshape(-1)
        for e in (0, 1, 37, flat.size - 1):
            assert flat[e] == _formula(5, t, e, spec.kind), (name, e)
    assert w.tensor_index("embed") == 0 and w.tensor_index("lm_head") == len(w.specs()) - 1


def test_ranges_determinism_and_seeds():
    a = SyntheticWeights.from_preset("tiny", seed=0)
    q = a.load("layers.0.q")
    assert q.shape == (256, 256) and np.abs(q).max() <= 0.02 and q.std() > 0.01
    norm = a.load("final_norm")
    assert np.all((norm >= 0.95) & (norm <= 1.05)) and norm.std() > 0.01
    np.testing.assert_array_equal(SyntheticWeights.from_preset("tiny", seed=0).load("layers.0.q"), q)
    assert not np.array_equal(SyntheticWeights.from_preset("tiny", seed=1).load("layers.0.q"), q)
    assert not np.array_equal(a.load("layers.0.k")[:8], q[:8])  # tensors differ from each other
    chunked = synthetic_values(0, 3, 1000, 50, "linear")
    np.testing.assert_array_equal(chunked, synthetic_values(0, 3, 0, 1050, "linear")[1000:])


def test_large_presets_are_lazy():
    w = SyntheticWeights.from_preset("llama-3.1-8b")
    specs = w.specs()
    assert len(specs) == len(tensor_specs(PRESETS["llama-3.1-8b"])) == 1 + 32 * 9 + 2
    norm = w.load("layers.31.mlp_norm")  # one small tensor, without producing the rest
    assert norm.shape == (4096,)
    assert w.spec("lm_head").shape == (128256, 4096)
    tied = SyntheticWeights.from_preset("llama-3.2-1b")
    assert tied.spec("lm_head").name == "embed"
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        SyntheticWeights.from_preset("tiny", seed=-1)


def test_tiny_model_runs_through_the_same_path():
    model = load_model("synthetic:tiny")
    runner = CpuRunner(model.weights)
    assert isinstance(runner, ModelRunner)
    ids = model.tokenizer.encode("hello")
    logits = runner.forward_all(ids)
    assert logits.shape == (len(ids), 512) and np.isfinite(logits).all() and logits.std() > 0
    runner.reset()
    runner.prefill(np.array(ids, np.int32))
    np.testing.assert_allclose(runner.last_logits(), logits[-1], rtol=1e-5, atol=1e-6)
