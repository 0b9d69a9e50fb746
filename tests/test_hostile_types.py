"""Every key of every JSON file a checkpoint has, set to every wrong type: a ModelError or a
working load, never a TypeError/AttributeError/KeyError from inside the loader."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from helpers_hf import checkpoint, copy_checkpoint  # noqa: E402

from nexusrt.errors import ModelError  # noqa: E402
from nexusrt.models import ModelConfig  # noqa: E402
from nexusrt.models.loader import GenerationDefaults  # noqa: E402
from nexusrt.models.safetensors import SafetensorsFile  # noqa: E402
from nexusrt.models.tokenizer import HFTokenizer  # noqa: E402

WRONG = [None, True, "x", "", 1.5, -1, 0, 10**30, [], [1, "a"], {}, {"a": {"b": 1}}]


def _mutations(d: dict):
    """(key path, mutated copy) for every top-level and nested key, for every wrong value."""
    for key, value in d.items():
        for wrong in WRONG:
            yield key, {**d, key: wrong}
        if isinstance(value, dict):
            for sub in value:
                for wrong in WRONG:
                    yield f"{key}.{sub}", {**d, key: {**value, sub: wrong}}


def test_config_json():
    base = json.loads((checkpoint("llama") / "config.json").read_text())
    base["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    base["rope_parameters"] = {"rope_theta": 10000.0}
    n = 0
    for where, d in _mutations(base):
        try:
            ModelConfig.from_hf(d, source="c.json")
        except ModelError as exc:
            assert str(exc).startswith("c.json: "), (where, exc)
        n += 1
    assert n > 300


def test_generation_config_json(tmp_path):
    base = {"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "max_new_tokens": 9,
            "eos_token_id": [1, 2]}
    f = tmp_path / "generation_config.json"
    for where, d in _mutations(base):
        f.write_text(json.dumps(d))
        try:
            GenerationDefaults.from_file(f, (1,), vocab_size=100)
        except ModelError as exc:
            assert "generation_config.json: " in str(exc), (where, exc)


def test_tokenizer_config_json(tmp_path):
    path = copy_checkpoint("llama", tmp_path / "m")
    base = json.loads((path / "tokenizer_config.json").read_text())
    base["bos_token"] = {"content": base.get("bos_token") or "<s>"}
    for where, d in _mutations(base):
        if where.startswith("added_tokens_decoder"):
            continue  # read by tokenizers from tokenizer.json, not by us
        (path / "tokenizer_config.json").write_text(json.dumps(d))
        try:
            HFTokenizer(path)
        except ModelError as exc:
            assert "tokenizer_config.json" in str(exc), (where, exc)


def test_safetensors_header_entries(tmp_path):
    import struct

    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    f = tmp_path / "x.safetensors"
    for where, d in _mutations({"w": entry, "__metadata__": {"format": "pt"}}):
        blob = json.dumps(d).encode()
        f.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 8)
        try:
            SafetensorsFile(f)
        except ModelError as exc:
            assert str(exc).startswith(str(f)), (where, exc)


@pytest.mark.parametrize("key, value", [("eos_token_id", 10**6), ("bos_token_id", 10**6)])
def test_config_token_ids_must_lie_inside_the_vocabulary(tmp_path, key, value):
    from nexusrt.models.config import load_config

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 384, key: value}))
    with pytest.raises(ModelError, match=key):
        load_config(tmp_path)
