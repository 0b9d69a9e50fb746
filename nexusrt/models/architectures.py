"""The architectures NexusRT runs, each declared once: features and HF tensor names.

All four families share the Llama block (pre-norm, GQA attention with RoPE, SwiGLU MLP).
They differ only in two switches, declared here and nowhere else:

- ``qkv_bias``: q/k/v projections carry a bias (Qwen2).
- ``qk_norm``: q and k get a per-head RMSNorm over ``head_dim`` before RoPE (Qwen3).

Our per-tensor names (left) map to the HF checkpoint names (right); ``{i}`` is the layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GLOBAL_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "o": "model.layers.{i}.self_attn.o_proj.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight",
    "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
}
QKV_BIAS_NAMES = {
    "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
}
QK_NORM_NAMES = {
    "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
}


@dataclass(frozen=True)
class Architecture:
    """One supported HF ``architectures[0]`` value and what its layers contain."""

    name: str
    qkv_bias: bool = False
    qk_norm: bool = False
    layer_names: dict = field(default_factory=dict)

    def __post_init__(self):
        names = dict(LAYER_NAMES)
        if self.qkv_bias:
            names.update(QKV_BIAS_NAMES)
        if self.qk_norm:
            names.update(QK_NORM_NAMES)
        object.__setattr__(self, "layer_names", names)

    def hf_name(self, name: str) -> str:
        """HF tensor name for one of ours: ``"embed"`` or ``"layers.3.q"``."""
        if name in GLOBAL_NAMES:
            return GLOBAL_NAMES[name]
        _, i, short = name.split(".")
        return self.layer_names[short].format(i=i)


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("LlamaForCausalLM"),
    Architecture("MistralForCausalLM"),
    Architecture("Qwen2ForCausalLM", qkv_bias=True),
    Architecture("Qwen3ForCausalLM", qk_norm=True),
)}


def supported_list() -> str:
    return ", ".join(ARCHITECTURES)
