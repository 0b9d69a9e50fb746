"""Broken checkpoint directories: one clear error each, naming the file and what was expected."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from helpers_hf import copy_checkpoint  # noqa: E402

from nexusrt.backends.cpu.model import CpuRunner  # noqa: E402
from nexusrt.errors import ModelError  # noqa: E402
from nexusrt.models import load_model  # noqa: E402
from nexusrt.models.weights import CheckpointWeights  # noqa: E402


@pytest.fixture
def ckpt(tmp_path):
    return copy_checkpoint("qwen2", tmp_path / "m")


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _rewrite_weights(path, change):
    from safetensors.numpy import load_file, save_file

    f = path / "model.safetensors"
    tensors = load_file(str(f))
    change(tensors)
    save_file(tensors, str(f))


@pytest.mark.parametrize("name, message", [
    ("config.json", "config.json: missing"),
    ("tokenizer.json", "tokenizer.json: missing"),
    ("model.safetensors", "no \\*.safetensors weight files"),
])
def test_missing_files(ckpt, name, message):
    (ckpt / name).unlink()
    with pytest.raises(ModelError, match=message):
        load_model(ckpt)


def test_missing_directory_and_unknown_synthetic(tmp_path):
    for empty in ("", "  "):  # not the working directory
        with pytest.raises(ModelError, match="is empty: name a checkpoint directory"):
            load_model(empty)
    with pytest.raises(ModelError, match="no such directory"):
        load_model(tmp_path / "absent")
    with pytest.raises(ModelError, match="unknown synthetic model 'huge'.*synthetic:tiny"):
        load_model("synthetic:huge")


def test_missing_tensor(ckpt):
    _rewrite_weights(ckpt, lambda t: t.pop("model.layers.1.self_attn.v_proj.bias"))
    with pytest.raises(ModelError, match="tensor 'model.layers.1.self_attn.v_proj.bias' is missing"):
        load_model(ckpt)


def test_shape_disagrees_with_config(ckpt):
    _edit_config(ckpt, intermediate_size=96)
    with pytest.raises(ModelError, match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has "
                                         r"shape \[128, 64\], expected \[96, 64\] from .*config.json"):
        load_model(ckpt)


def test_integer_weights_rejected(ckpt):
    def quantize(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int8)
    _rewrite_weights(ckpt, quantize)
    with pytest.raises(ModelError, match="tensor 'model.norm.weight' has dtype I8; weights must be"):
        load_model(ckpt)


def test_untied_config_without_lm_head(tmp_path):
    path = copy_checkpoint("llama", tmp_path / "m")  # a tied checkpoint has no lm_head.weight
    _edit_config(path, tie_word_embeddings=False)
    with pytest.raises(ModelError, match="'lm_head.weight' is missing .*tie_word_embeddings=false"):
        load_model(path)


def test_truncated_weights_file(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ModelError, match="model.safetensors: tensor '.*': data ends at byte .*truncated file"):
        load_model(ckpt)


def test_bad_json_files(ckpt):
    (ckpt / "generation_config.json").write_text("{")
    with pytest.raises(ModelError, match="generation_config.json: not valid JSON"):
        load_model(ckpt)
    (ckpt / "generation_config.json").unlink()
    (ckpt / "tokenizer_config.json").write_text("[")
    with pytest.raises(ModelError, match="tokenizer_config.json: not valid JSON"):
        load_model(ckpt)


def test_failed_load_leaves_nothing_allocated(ckpt, monkeypatch, cpu_rt):
    import nexusrt as nrt

    real = CheckpointWeights._load
    calls = []

    def flaky(self, spec):
        calls.append(spec.name)
        if len(calls) == 6:
            raise ModelError(f"injected read failure at {spec.name}")
        return real(self, spec)

    monkeypatch.setattr(CheckpointWeights, "_load", flaky)
    try:
        nrt.LLM(ckpt, backend="cpu")
        raise AssertionError("LLM() should have failed")
    except ModelError as exc:
        assert "injected read failure" in str(exc)
    gc.collect()
    assert len(calls) == 6
    assert not [o for o in gc.get_objects() if type(o) is CpuRunner]


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_non_finite_weights_end_in_one_clear_error_without_numpy_warnings(ckpt, cpu_rt, bad):
    """inf/NaN in a weight: every op after it would warn; one NonFiniteLogits says what is wrong,
    through the one-sequence runner and the serving engine, and the engine keeps no blocks."""
    import warnings

    import nexusrt as nrt
    from nexusrt.errors import NonFiniteLogits

    def poison(tensors):
        name = next(k for k in sorted(tensors) if "mlp.down_proj" in k)
        w = tensors[name].copy()
        w.flat[:64] = bad
        tensors[name] = w

    _rewrite_weights(ckpt, poison)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning from NumPy fails the test
        with nrt.LLM(ckpt, backend="cpu") as llm:
            with pytest.raises(NonFiniteLogits, match="not finite numbers"):
                llm.generate("hello there", max_new_tokens=4)
            with pytest.raises(NonFiniteLogits):
                llm.submit("hello there", max_new_tokens=4).result()
            blocks = llm.engine.engine.blocks
            blocks.audit()
            assert blocks.num_used == 0
