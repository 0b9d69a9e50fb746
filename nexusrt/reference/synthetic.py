"""Synthetic weights: the formula for element ``i`` of tensor ``t`` under ``seed``.

The one definition a CUDA kernel must reproduce bit for bit (all integer arithmetic on
uint64, wrapping mod 2**64; :mod:`nexusrt.reference.rng` defines ``splitmix64``)::

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

A bf16 copy on the GPU is the round-to-nearest-even of the fp32 value: the device fill kernel
(``fill_uniform_bf16`` in ``kernels/ops/elementwise.py``) starts from :func:`tensor_key`.
:class:`nexusrt.models.synthetic.SyntheticWeights` serves these values as a model's weights.
"""

from __future__ import annotations

import numpy as np

from .rng import GAMMA, MASK64, splitmix64_array

TENSOR_MUL = 0xD1B54A32D192ED03
KIND_PARAMS = {"embed": (0.0, 0.02), "linear": (0.0, 0.02), "norm": (1.0, 0.05), "bias": (0.0, 0.02)}


def tensor_key(seed: int, tensor_index: int = 0) -> int:
    """``seed * GAMMA + tensor_index * TENSOR_MUL`` mod 2**64: the key of element 0."""
    if seed < 0 or tensor_index < 0:
        raise ValueError(f"seed and tensor_index must be >= 0, got {seed}, {tensor_index}")
    return (seed * GAMMA + tensor_index * TENSOR_MUL) & MASK64


def synthetic_values(seed: int, tensor_index: int, start: int, count: int, kind: str) -> np.ndarray:
    """Elements ``start .. start+count-1`` of tensor ``tensor_index`` as fp32 (the formula above)."""
    center, scale = KIND_PARAMS[kind]
    with np.errstate(over="ignore"):
        keys = np.arange(start, start + count, dtype=np.uint64) + np.uint64(tensor_key(seed, tensor_index))
    r = splitmix64_array(keys)
    x = (r >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -23) - np.float32(1.0)
    # numpy rounds each of the two operations to fp32 separately, as the kernel must.
    return np.float32(center) + np.float32(scale) * x
