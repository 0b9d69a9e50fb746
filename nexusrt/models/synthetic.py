"""Deterministic random weights from (preset, seed), generated in place, tensor by tensor.

The values are :func:`nexusrt.reference.synthetic.synthetic_values` (the formula a CUDA
kernel reproduces bit for bit lives there, with the oracle): ``tensor_index`` is the
position of the tensor in :func:`nexusrt.models.weights.tensor_specs`, ``element_index``
the row-major index in its HF shape.
"""

from __future__ import annotations

import numpy as np

from ..reference.synthetic import synthetic_values
from .config import ModelConfig
from .presets import preset
from .weights import TensorSpec, WeightSource

_CHUNK = 1 << 22  # elements generated at once: bounds temporaries for the 8B preset's tables


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
