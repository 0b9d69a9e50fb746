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
from .paths import CheckpointDir
from .validate import Fields

REQUIRED_KEYS = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "vocab_size")
ROPE_TYPES = ("default", "linear", "llama3")
# Upper bounds far above every real model: a config past them is corrupt or hostile, and
# would otherwise build billions of tensor specs or ask for exabytes before failing.
LIMITS = {"hidden_size": 1 << 17, "intermediate_size": 1 << 20, "num_hidden_layers": 1024,
          "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 4096,
          "vocab_size": 1 << 22, "max_position_embeddings": 1 << 24}
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
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= LIMITS[name]:
                raise ModelError(f"{where}{name} must be an integer in [1, {LIMITS[name]}], got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(f"{where}num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ModelError(f"{where}head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ModelError(f"{where}{name} must be a positive number, got {value!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ModelError(f"{where}tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool)
                                                or not isinstance(self.sliding_window, int)
                                                or self.sliding_window <= 0):
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
        f = Fields(d, source)
        missing = [k for k in REQUIRED_KEYS if not f.has(k)]
        if missing:
            raise ModelError(f"{source}: missing required key{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(repr(k) for k in missing)}")
        archs = f.list("architectures")
        if not archs:
            raise ModelError(f"{source}: 'architectures' must be a non-empty list, got {archs!r}")
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise ModelError(f"{source}: architecture {arch!r} is not supported; supported: {supported_list()}")
        _reject_unsupported_features(f, arch)
        sizes = {k: f.int(k, lo=1, hi=LIMITS[k]) for k in REQUIRED_KEYS[1:]}
        heads = sizes["num_attention_heads"]
        rope_theta, rope_scaling = _rope_from_hf(f)
        eos = f.ids("eos_token_id", hi=sizes["vocab_size"])  # an id past the vocabulary would never stop
        return cls(
            architecture=arch,
            **sizes,
            num_key_value_heads=f.int("num_key_value_heads", heads, lo=1, hi=LIMITS["num_key_value_heads"]),
            head_dim=(f.int("head_dim", lo=1, hi=LIMITS["head_dim"]) if f.has("head_dim")
                      else _div(sizes["hidden_size"], heads, source)),
            rms_norm_eps=f.float("rms_norm_eps", 1e-6, positive=True, hi=1.0),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=f.int("max_position_embeddings", _MAX_POS_DEFAULT[arch], lo=1,
                                          hi=LIMITS["max_position_embeddings"]),
            tie_word_embeddings=f.bool("tie_word_embeddings", False),
            attention_bias=ARCHITECTURES[arch].qkv_bias,
            qk_norm=ARCHITECTURES[arch].qk_norm,
            torch_dtype=f.str("torch_dtype", None) or f.str("dtype", None) or "float32",
            sliding_window=(f.int("sliding_window", None, lo=1, hi=LIMITS["max_position_embeddings"])
                            if arch == "MistralForCausalLM" else None),
            bos_token_id=f.int("bos_token_id", None, lo=0, hi=sizes["vocab_size"] - 1),
            eos_token_ids=eos or (),
            source=source,
        )


def load_config(model_dir: str | Path | CheckpointDir) -> ModelConfig:
    """Read and validate ``model_dir/config.json``."""
    d = model_dir if isinstance(model_dir, CheckpointDir) else CheckpointDir(model_dir)
    path = d.file("config.json", required=False)
    if path is None:
        raise ModelError(f"{d.root / 'config.json'}: missing (every checkpoint directory needs config.json)")
    return ModelConfig.from_hf(read_json_object(path), source=str(path))


def _div(hidden: int, heads: int, source: str) -> int:
    if hidden % heads:
        raise ModelError(f"{source}: no head_dim and hidden_size {hidden!r} is not a multiple of "
                         f"num_attention_heads {heads!r}")
    return hidden // heads


def _reject_unsupported_features(f: Fields, arch: str) -> None:
    """Features the runners do not implement fail loudly instead of computing something else."""
    source = f.source
    act = f.str("hidden_act", "silu")
    if act != "silu":
        raise ModelError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
    if f.bool("mlp_bias", False):
        raise ModelError(f"{source}: mlp_bias=true is not supported")
    if f.bool("attention_bias", False) and not ARCHITECTURES[arch].qkv_bias:
        raise ModelError(f"{source}: attention_bias=true is not supported for {arch} "
                         "(it would add biases to q, k, v and o)")
    layer_types = f.list("layer_types") or ["sliding_attention"]
    if f.bool("use_sliding_window", False) and "sliding_attention" in layer_types:
        raise ModelError(f"{source}: use_sliding_window=true is not supported for {arch}")
    params = f.obj("rope_parameters")
    prf = params.float("partial_rotary_factor", None) if params is not None else None
    if prf is None:
        prf = f.float("partial_rotary_factor", 1.0)
    if prf != 1.0:
        raise ModelError(f"{source}: partial_rotary_factor {prf!r} is not supported (only 1.0)")


def _rope_from_hf(f: Fields) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the v5 ``rope_parameters`` or v4 keys."""
    params = f.obj("rope_parameters")
    if params is not None and params.has("full_attention"):  # per-layer-type form
        params = params.obj("full_attention")
    theta = f.float("rope_theta", 10000.0, positive=True)
    if params is not None and params.d:
        theta = params.float("rope_theta", theta, positive=True)
        scaling = {k: v for k, v in params.d.items() if k not in ("rope_theta", "partial_rotary_factor")}
        where = "rope_parameters"
    else:
        scaling = f.obj("rope_scaling")
        scaling = dict(scaling.d) if scaling is not None else None
        where = "rope_scaling"
    if isinstance(scaling, dict):
        if "rope_type" not in scaling and "type" in scaling:
            scaling["rope_type"] = scaling.pop("type")
        scaling.pop("type", None)
    return theta, _check_rope_scaling(scaling, f"{f.source}: ", where)


def _check_rope_scaling(scaling: Any, where: str, key: str = "rope_scaling") -> dict | None:
    """The scaling dict checked: known type, and every parameter a positive, finite number."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ModelError(f"{where}{key} must be an object or null, got {scaling!r}")
    kind = scaling.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ModelError(f"{where}rope type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return None
    f = Fields(scaling, where.rstrip(": "), key + ".")
    for name in _LLAMA3_KEYS if kind == "llama3" else ("factor",):
        if name == "original_max_position_embeddings":
            f.int(name, lo=1, hi=LIMITS["max_position_embeddings"])
        else:
            f.float(name, positive=True)
    if kind == "llama3" and scaling["high_freq_factor"] == scaling["low_freq_factor"]:
        raise ModelError(f"{where}llama3 {key} needs high_freq_factor != low_freq_factor")
    return dict(scaling)
