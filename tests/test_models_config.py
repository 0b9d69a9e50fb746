"""ModelConfig from HF config.json (v4 and v5 spellings), validation and presets."""

from __future__ import annotations

import json

import pytest

from nexusrt.errors import ModelError
from nexusrt.models import PRESETS, ModelConfig, load_config, tensor_specs
from nexusrt.models.presets import preset

LLAMA32_1B_V4 = {  # the shape of Meta's published config.json (transformers 4.x spelling)
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "num_attention_heads": 32, "num_hidden_layers": 16,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 128256,
}


def test_v4_config_equals_the_preset():
    cfg = ModelConfig.from_hf(LLAMA32_1B_V4)
    assert cfg == PRESETS["llama-3.2-1b"]
    assert cfg.eos_token_ids == (128001, 128008, 128009)
    assert 1.2e9 < cfg.num_parameters() < 1.3e9  # Llama 3.2 1B has 1.24 B parameters


def test_v5_rope_parameters_spelling():
    d = {k: v for k, v in LLAMA32_1B_V4.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")}
    d["rope_parameters"] = {**LLAMA32_1B_V4["rope_scaling"], "rope_theta": 500000.0}
    d["dtype"] = "bfloat16"
    assert ModelConfig.from_hf(d) == PRESETS["llama-3.2-1b"]


def test_8b_preset_shape():
    cfg = PRESETS["llama-3.1-8b"]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.tie_word_embeddings) == (4096, 32, 128, False)
    assert cfg.rope_scaling["factor"] == 8.0
    assert 7.9e9 < cfg.num_parameters() < 8.1e9


def test_70b_preset_shape():
    cfg = PRESETS["llama-3.1-70b"]  # Meta's config.json: 70.55e9 parameters
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (8192, 28672, 80)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (64, 8, 128, 128256)
    assert not cfg.tie_word_embeddings and cfg.rope_scaling["factor"] == 8.0
    assert 70.5e9 < cfg.num_parameters() < 70.6e9


def test_defaults_and_family_switches():
    d = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300,
         "rope_scaling": {"type": "linear", "factor": 2.0}}
    cfg = ModelConfig.from_hf(d)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.attention_bias, cfg.qk_norm) == (4, 16, True, False)
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.max_position_embeddings == 32768
    q3 = ModelConfig.from_hf({**d, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32})
    assert (q3.attention_bias, q3.qk_norm, q3.head_dim) == (False, True, 32)
    names = [s.name for s in tensor_specs(q3)]
    assert "layers.1.q_norm" in names and "layers.0.q_bias" not in names
    assert ModelConfig.from_hf({**d, "architectures": ["MistralForCausalLM"], "sliding_window": 8}).sliding_window == 8


def test_missing_keys_name_key_and_file(tmp_path):
    d = dict(LLAMA32_1B_V4)
    del d["hidden_size"], d["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ModelError, match=r"config\.json: missing required keys 'hidden_size', 'vocab_size'"):
        load_config(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel.*not supported.*LlamaForCausalLM, MistralForCausalLM, "
                                             "Qwen2ForCausalLM, Qwen3ForCausalLM"),
    ({"architectures": []}, "non-empty list"),
    ({"num_key_value_heads": 5}, "multiple of num_key_value_heads"),
    ({"num_hidden_layers": 0}, r"cfg.json: num_hidden_layers must be an integer in \[1, 1024\], got 0"),
    ({"num_hidden_layers": 10**8}, r"num_hidden_layers must be an integer in \[1, 1024\], got 100000000"),
    ({"hidden_size": "2048"}, "cfg.json: hidden_size must be an integer, got '2048'"),
    ({"hidden_size": 2048.0}, "hidden_size must be an integer, got 2048.0"),
    ({"vocab_size": True}, "vocab_size must be an integer, got True"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be an integer in"),
    ({"max_position_embeddings": 0}, "max_position_embeddings must be an integer in"),
    ({"head_dim": 0}, "head_dim must be an integer in"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a positive number"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number"),
    ({"rope_theta": 0}, "rope_theta must be a positive number"),
    ({"rope_theta": float("nan")}, "rope_theta must be a finite number, got nan"),
    ({"tie_word_embeddings": "false"}, "cfg.json: tie_word_embeddings must be true or false, got 'false'"),
    ({"eos_token_id": "2"}, "eos_token_id must be a token id"),
    ({"architectures": "LlamaForCausalLM"}, "architectures must be a list of str"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 4.0}}, "missing required key 'rope_scaling.low_freq_factor'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": float("nan")}},
     "cfg.json: rope_scaling.factor must be a finite number, got nan"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "rope_scaling.factor must be a positive number"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "rope_scaling.factor must be a finite number"),
    ({"rope_scaling": [1]}, "rope_scaling must be a JSON object"),
    ({"rope_parameters": {"rope_type": "linear", "factor": float("inf")}}, "rope_parameters.factor must be a finite"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"mlp_bias": True}, "mlp_bias"),
])
def test_bad_configs(change, message):
    with pytest.raises(ModelError, match=message):
        ModelConfig.from_hf({**LLAMA32_1B_V4, **change}, source="cfg.json")


def test_config_file_errors(tmp_path):
    with pytest.raises(ModelError, match="config.json: missing"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json: not valid JSON"):
        load_config(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("[" * 100000 + "]" * 100000, "nested deeper than 64 levels"),
    ('{"a": ' * 70 + "1" + "}" * 70, "nested deeper than 64 levels"),
    ('{"hidden_size": 1, "hidden_size": 2}', "key 'hidden_size' appears twice"),
    ('{"rope_scaling": {"factor": NaN}}', r"rope_scaling.factor is nan \(numbers must be finite\)"),
    ('{"rms_norm_eps": 1e999}', "rms_norm_eps is inf"),
    (b'{"a": "\xff"}', "not UTF-8 text"),
    ("[1, 2]", "expected a JSON object, got list"),
])
def test_hostile_json(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ModelError, match=f"config.json: {message}"):
        load_config(tmp_path)


def test_json_size_limit(tmp_path):
    from nexusrt.models.jsonfile import read_json

    path = tmp_path / "big.json"
    with open(path, "wb") as f:  # sparse: no disk used, and the reader must stop at the limit
        f.truncate(1 << 30)
    with pytest.raises(ModelError, match="big.json: larger than the 1024-byte limit"):
        read_json(path, max_bytes=1024)


def test_special_file_is_refused(tmp_path):
    import os

    os.mkfifo(tmp_path / "config.json")  # a plain open() would block forever
    with pytest.raises(ModelError, match="config.json: not a regular file"):
        load_config(tmp_path)


def test_preset_copies_are_independent():
    a = preset("llama-3.1-8b")
    a.rope_scaling["factor"] = 1.0
    assert PRESETS["llama-3.1-8b"].rope_scaling["factor"] == 8.0
    with pytest.raises(ModelError, match="unknown synthetic model 'nope'.*tiny"):
        preset("nope")
