"""Named model shapes for synthetic weights (benchmarks and demos with no files).

The Llama presets copy the shape, RoPE and token ids of Meta's published config.json
files, so a synthetic model costs exactly what the real one does.
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import ModelError
from .config import ModelConfig

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def _llama3(name: str, hidden: int, intermediate: int, layers: int, head_dim: int, rope_factor: float,
            tied: bool, heads: int = 32) -> ModelConfig:
    """A Llama 3.x shape: GQA ``heads``/8, vocab 128256, 128K context, bf16, Meta's token ids."""
    return ModelConfig(
        architecture="LlamaForCausalLM", hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8, head_dim=head_dim,
        vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": rope_factor}, max_position_embeddings=131072,
        tie_word_embeddings=tied, torch_dtype="bfloat16", bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009), source=f"preset {name}")


PRESETS: dict[str, ModelConfig] = {
    # Small enough for NumPy in tests; vocab covers the 256 bytes + specials of ByteTokenizer.
    "tiny": ModelConfig(
        architecture="LlamaForCausalLM", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False,
        torch_dtype="float32", source="preset tiny"),
    "llama-3.2-1b": _llama3("llama-3.2-1b", 2048, 8192, 16, 64, rope_factor=32.0, tied=True),
    "llama-3.1-8b": _llama3("llama-3.1-8b", 4096, 14336, 32, 128, rope_factor=8.0, tied=False),
    # 141 GB of bf16: one H200 cannot hold it; the tensor-parallel bench's 70B shape (TP=4, 8).
    "llama-3.1-70b": _llama3("llama-3.1-70b", 8192, 28672, 80, 128, rope_factor=8.0, tied=False, heads=64),
}


def preset(name: str) -> ModelConfig:
    """A copy of the named preset (callers may change fields without touching the table)."""
    if name not in PRESETS:
        raise ModelError(f"unknown synthetic model {name!r}; presets: {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    return replace(cfg, rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None)
