"""Model weights by our names, from a checkpoint or generated in place.

Names: ``embed``, ``final_norm``, ``lm_head`` and per layer ``layers.{i}.{short}`` with
``short`` in ``attn_norm q k v o mlp_norm gate up down`` (+ ``q_bias k_bias v_bias`` for
Qwen2, ``q_norm k_norm`` for Qwen3). Shapes follow HF: linear weights are
``[out_features, in_features]``, row-major.

Fused layouts (what a GPU runner wants, one GEMV per group):

- ``qkv``      ``[q_size + 2*kv_size, hidden]``: rows of q, then k, then v
               (q_size = heads*head_dim, kv_size = kv_heads*head_dim).
- ``qkv_bias`` ``[q_size + 2*kv_size]`` in the same order (Qwen2 only).
- ``gate_up``  ``[2*intermediate, hidden]``: rows of gate, then up, so
               ``y = W @ x`` gives ``gate = y[:I]``, ``up = y[I:]``.

With tied embeddings there is no ``lm_head`` tensor in :meth:`WeightSource.specs`, but
``load("lm_head")`` returns the embedding table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelError
from .architectures import ARCHITECTURES
from .config import ModelConfig
from .safetensors import FLOAT_DTYPES, SafetensorsIndex, TensorInfo

FUSED = {"qkv": ("q", "k", "v"), "qkv_bias": ("q_bias", "k_bias", "v_bias"), "gate_up": ("gate", "up")}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor the model needs: our name, HF name, expected shape and its kind.

    ``kind`` is ``embed``, ``linear``, ``norm`` or ``bias`` (synthetic weights scale by it).
    """

    name: str
    hf_name: str
    shape: tuple[int, ...]
    kind: str


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the model in canonical order (the order synthetic weights are numbered in)."""
    arch = ARCHITECTURES[config.architecture]
    h, q, kv, inter, d = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size, config.head_dim
    per_layer = {
        "attn_norm": ((h,), "norm"), "q": ((q, h), "linear"), "k": ((kv, h), "linear"),
        "v": ((kv, h), "linear"), "q_bias": ((q,), "bias"), "k_bias": ((kv,), "bias"),
        "v_bias": ((kv,), "bias"), "q_norm": ((d,), "norm"), "k_norm": ((d,), "norm"),
        "o": ((h, q), "linear"), "mlp_norm": ((h,), "norm"), "gate": ((inter, h), "linear"),
        "up": ((inter, h), "linear"), "down": ((h, inter), "linear"),
    }
    specs = [TensorSpec("embed", arch.hf_name("embed"), (config.vocab_size, h), "embed")]
    for i in range(config.num_hidden_layers):
        for short, (shape, kind) in per_layer.items():
            if short in arch.layer_names:
                name = f"layers.{i}.{short}"
                specs.append(TensorSpec(name, arch.hf_name(name), shape, kind))
    specs.append(TensorSpec("final_norm", arch.hf_name("final_norm"), (h,), "norm"))
    if not config.tie_word_embeddings:
        specs.append(TensorSpec("lm_head", arch.hf_name("lm_head"), (config.vocab_size, h), "linear"))
    return specs


class WeightSource:
    """Base of checkpoint and synthetic weights: subclasses implement :meth:`_load`."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self._specs = {s.name: s for s in tensor_specs(config)}

    def specs(self) -> list[TensorSpec]:
        return list(self._specs.values())

    def spec(self, name: str) -> TensorSpec:
        if name == "lm_head" and self.config.tie_word_embeddings:
            name = "embed"
        try:
            return self._specs[name]
        except KeyError:
            raise ModelError(f"{self.config.architecture} has no tensor {name!r}") from None

    def load(self, name: str, dtype=np.float32) -> np.ndarray:
        """One tensor by our name, converted to ``dtype`` (fp32 by default)."""
        return np.asarray(self._load(self.spec(name)), dtype=dtype)

    def fused(self, layer: int, group: str, dtype=np.float32) -> np.ndarray:
        """``qkv``, ``qkv_bias`` or ``gate_up`` of ``layer``, concatenated along the output dim."""
        if group not in FUSED:
            raise ValueError(f"group must be one of {', '.join(FUSED)}, got {group!r}")
        parts = [self.load(f"layers.{layer}.{p}", dtype) for p in FUSED[group]]
        return np.concatenate(parts, axis=0)

    def _load(self, spec: TensorSpec) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles or caches (nothing is held open by default)."""


class CheckpointWeights(WeightSource):
    """Weights from safetensors files; every tensor's presence, dtype and shape checked up front."""

    def __init__(self, config: ModelConfig, index: SafetensorsIndex):
        super().__init__(config)
        self.index = index
        for spec in self.specs():
            self._check(spec)

    def _check(self, spec: TensorSpec) -> None:
        if spec.hf_name not in self.index:
            hint = " (config.json says tie_word_embeddings=false)" if spec.name == "lm_head" else ""
            raise ModelError(f"{self.index.source}: tensor {spec.hf_name!r} is missing{hint}")
        info = self.index.info(spec.hf_name)
        if info.dtype not in FLOAT_DTYPES:
            raise ModelError(f"{info.file}: tensor {spec.hf_name!r} has dtype {info.dtype}; weights must be "
                             f"one of {', '.join(FLOAT_DTYPES)}")
        if info.shape != spec.shape:
            raise ModelError(f"{info.file}: tensor {spec.hf_name!r} has shape {list(info.shape)}, expected "
                             f"{list(spec.shape)} from {self.config.source}")

    def ref(self, name: str) -> TensorInfo:
        """File, absolute offset, dtype and byte count of one tensor (for streaming loaders)."""
        return self.index.info(self.spec(name).hf_name)

    def _load(self, spec: TensorSpec) -> np.ndarray:
        return self.index.read(spec.hf_name)
