"""The model shape: one dataclass, validated once, built from an HF ``config.json``.

``ModelConfig.from_hf(d)`` accepts both spellings transformers has written: v4
(``rope_theta`` + ``rope_scaling``, ``torch_dtype``) and v5 (``rope_parameters``,
``dtype``). Optional keys take the defaults HF's own config classes use; the keys
listed in :data:`REQUIRED_KEYS` have no sane default and must be present.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError
from .architectures import ARCHITECTURES, supported_list
from .jsonfile import read_json_object

REQUIRED_KEYS = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "vocab_size")
ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# HF's per-family defaults for keys a config.json may leave out.
_MAX_POS_DEFAULT = {"LlamaForCausalLM": 2048, "MistralForCausalLM": 4096 * 32,
                    "Qwen2ForCausalLM": 32768, "Qwen3ForCausalLM": 32768}


@dataclass
class ModelConfig:
    """Shape and numerics of a decoder-only transformer NexusRT can run.

    ``rope_scaling`` is ``None`` for plain RoPE, else a dict with ``rope_type``
    (``linear`` or ``llama3``) and that type's parameters. ``attention_bias`` means
    biases on the q/k/v projections (Qwen2); ``qk_norm`` means per-head RMSNorm on q and
    k before RoPE (Qwen3). ``sliding_window`` (Mistral) limits each query to the last
    ``sliding_window`` keys including itself.
    """

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    torch_dtype: str = "float32"
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    source: str = field(default="config", compare=False, repr=False)

    def __post_init__(self):
        where = f"{self.source}: "
        if self.architecture not in ARCHITECTURES:
            raise ModelError(f"{where}architecture {self.architecture!r} is not supported; "
                             f"supported: {supported_list()}")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelError(f"{where}{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(f"{where}num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ModelError(f"{where}head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ModelError(f"{where}{name} must be a positive number, got {value!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ModelError(f"{where}sliding_window must be a positive integer or null, got {self.sliding_window!r}")
        self.rope_scaling = _check_rope_scaling(self.rope_scaling, where)
        self.eos_token_ids = tuple(int(e) for e in self.eos_token_ids)

    # -- derived sizes the runners use -------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_parameters(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        h, i, layers = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        per_layer += (self.q_size + 2 * self.kv_size) if self.attention_bias else 0
        per_layer += 2 * self.head_dim if self.qk_norm else 0
        embed = self.vocab_size * h
        return layers * per_layer + embed * (1 if self.tie_word_embeddings else 2) + h

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a parsed HF ``config.json``; errors name the key and ``source``."""
        if not isinstance(d, dict):
            raise ModelError(f"{source}: expected a JSON object, got {type(d).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in d or d[k] is None]
        if missing:
            raise ModelError(f"{source}: missing required key{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(repr(k) for k in missing)}")
        archs = d["architectures"]
        if not isinstance(archs, list) or not archs:
            raise ModelError(f"{source}: 'architectures' must be a non-empty list, got {archs!r}")
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise ModelError(f"{source}: architecture {arch!r} is not supported; supported: {supported_list()}")
        _reject_unsupported_features(d, arch, source)
        heads = d["num_attention_heads"]
        rope_theta, rope_scaling = _rope_from_hf(d, source)
        eos = d.get("eos_token_id")
        return cls(
            architecture=arch,
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or _div(d["hidden_size"], heads, source),
            vocab_size=d["vocab_size"],
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings") or _MAX_POS_DEFAULT[arch],
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=ARCHITECTURES[arch].qkv_bias,
            qk_norm=ARCHITECTURES[arch].qk_norm,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
            sliding_window=d.get("sliding_window") if arch == "MistralForCausalLM" else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            source=source,
        )


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read and validate ``model_dir/config.json``."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelError(f"{path}: missing (every checkpoint directory needs config.json)")
    return ModelConfig.from_hf(read_json_object(path), source=str(path))


def _div(hidden: Any, heads: Any, source: str) -> int:
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0 or hidden % heads:
        raise ModelError(f"{source}: no head_dim and hidden_size {hidden!r} is not a multiple of "
                         f"num_attention_heads {heads!r}")
    return hidden // heads


def _reject_unsupported_features(d: dict, arch: str, source: str) -> None:
    """Features the runners do not implement fail loudly instead of computing something else."""
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
    if d.get("mlp_bias"):
        raise ModelError(f"{source}: mlp_bias=true is not supported")
    if d.get("attention_bias") and not ARCHITECTURES[arch].qkv_bias:
        raise ModelError(f"{source}: attention_bias=true is not supported for {arch} "
                         "(it would add biases to q, k, v and o)")
    if d.get("use_sliding_window") and "sliding_attention" in (d.get("layer_types") or ["sliding_attention"]):
        raise ModelError(f"{source}: use_sliding_window=true is not supported for {arch}")
    prf = (d.get("rope_parameters") or {}).get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise ModelError(f"{source}: partial_rotary_factor {prf!r} is not supported (only 1.0)")


def _rope_from_hf(d: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the v5 ``rope_parameters`` or v4 keys."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    if params is not None and not isinstance(params, dict):
        raise ModelError(f"{source}: rope_parameters must be an object, got {params!r}")
    if params:
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = dict(d["rope_scaling"]) if isinstance(d.get("rope_scaling"), dict) else d.get("rope_scaling")
    if isinstance(scaling, dict):
        if "rope_type" not in scaling and "type" in scaling:
            scaling["rope_type"] = scaling.pop("type")
        scaling.pop("type", None)
        if scaling.get("rope_type", "default") == "default":
            scaling = None
    return theta, scaling


def _check_rope_scaling(scaling: Any, where: str) -> dict | None:
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ModelError(f"{where}rope_scaling must be an object or null, got {scaling!r}")
    kind = scaling.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ModelError(f"{where}rope type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return None
    needed = _LLAMA3_KEYS if kind == "llama3" else ("factor",)
    missing = [k for k in needed if not isinstance(scaling.get(k), (int, float))]
    if missing:
        raise ModelError(f"{where}rope_scaling of type {kind!r} needs numeric {', '.join(missing)}")
    if scaling["factor"] <= 0:
        raise ModelError(f"{where}rope_scaling factor must be positive, got {scaling['factor']!r}")
    if kind == "llama3" and scaling["high_freq_factor"] == scaling["low_freq_factor"]:
        raise ModelError(f"{where}llama3 rope_scaling needs high_freq_factor != low_freq_factor")
    return dict(scaling)
