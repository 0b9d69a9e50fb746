"""Deterministic random weights from (preset, seed), generated in place, tensor by tensor.

The one definition a CUDA kernel must reproduce bit for bit (all integer arithmetic on
uint64, wrapping mod 2**64; :mod:`nexusrt.models.rng` defines ``splitmix64``)::

    key   = seed * 0x9E3779B97F4A7C15 + tensor_index * 0xD1B54A32D192ED03 + element_index
    r     = splitmix64(key)
    x     = float32(r >> 40) * 2**-23 - 1.0f        # exact: 24 random bits, x in [-1, 1)
    value = center + scale * x                       # fp32, a rounded multiply then a rounded
                                                     # add (no FMA: __fmul_rn, __fadd_rn)

- ``tensor_index``: position of the tensor in :func:`nexusrt.models.weights.tensor_specs`
  (embed, then per layer attn_norm q k v [q_bias k_bias v_bias] [q_norm k_norm] o
  mlp_norm gate up down, then final_norm, then lm_head when untied).
- ``element_index``: row-major index in the tensor's HF shape (``[out, in]`` for linears).
- ``(center, scale)`` by kind, :data:`KIND_PARAMS`: embed and linear ``(0, 0.02)``,
  norm ``(1, 0.05)``, bias ``(0, 0.02)``.

A bf16 copy on the GPU is the round-to-nearest-even of the fp32 value.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .presets import preset
from .rng import GAMMA, splitmix64_array
from .weights import TensorSpec, WeightSource

TENSOR_MUL = 0xD1B54A32D192ED03
KIND_PARAMS = {"embed": (0.0, 0.02), "linear": (0.0, 0.02), "norm": (1.0, 0.05), "bias": (0.0, 0.02)}
_CHUNK = 1 << 22  # elements generated at once: bounds temporaries for the 8B preset's tables


def synthetic_values(seed: int, tensor_index: int, start: int, count: int, kind: str) -> np.ndarray:
    """Elements ``start .. start+count-1`` of tensor ``tensor_index`` as fp32 (the formula above)."""
    center, scale = KIND_PARAMS[kind]
    with np.errstate(over="ignore"):
        base = np.uint64(seed) * np.uint64(GAMMA) + np.uint64(tensor_index) * np.uint64(TENSOR_MUL)
        keys = np.arange(start, start + count, dtype=np.uint64) + base
    r = splitmix64_array(keys)
    x = (r >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -23) - np.float32(1.0)
    # numpy rounds each of the two operations to fp32 separately, as the kernel must.
    return np.float32(center) + np.float32(scale) * x


class SyntheticWeights(WeightSource):
    """Weights of a preset shape, produced lazily: nothing exists until a tensor is loaded."""

    def __init__(self, config: ModelConfig, seed: int = 0):
        super().__init__(config)
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = seed
        self._index = {s.name: i for i, s in enumerate(self.specs())}

    @classmethod
    def from_preset(cls, name: str, seed: int = 0) -> "SyntheticWeights":
        return cls(preset(name), seed)

    def tensor_index(self, name: str) -> int:
        """The ``tensor_index`` of the formula for one of our tensor names."""
        return self._index[self.spec(name).name]

    def _load(self, spec: TensorSpec) -> np.ndarray:
        t = self._index[spec.name]
        numel = int(np.prod(spec.shape))
        out = np.empty(numel, dtype=np.float32)
        for start in range(0, numel, _CHUNK):
            n = min(_CHUNK, numel - start)
            out[start:start + n] = synthetic_values(self.seed, t, start, n, spec.kind)
        return out.reshape(spec.shape)
