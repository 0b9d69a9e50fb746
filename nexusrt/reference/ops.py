"""Reference NumPy ops of the decoder, in fp32: the CPU backend runs them and the CUDA kernels
are validated against them (with :func:`linear_epilogue` for the GEMV/GEMM launchers' fusions).

Conventions: activations are ``[T, ...]`` (T tokens); linear weights are HF's
``[out_features, in_features]``; RoPE uses HF's rotate-half layout (the two halves of
each head are the real and imaginary parts, not interleaved pairs).
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """``weight * x / sqrt(mean(x**2) + eps)`` over the last dim."""
    x = np.asarray(x, dtype=F32)
    var = np.mean(np.square(x), axis=-1, keepdims=True, dtype=F32)
    return np.asarray(weight, dtype=F32) * (x / np.sqrt(var + F32(eps)))


def rope_inv_freq(config) -> np.ndarray:
    """RoPE inverse frequencies ``[head_dim // 2]`` fp32, with linear or llama3 scaling.

    ``config``: a :class:`nexusrt.models.config.ModelConfig` (its ``head_dim``,
    ``rope_theta`` and ``rope_scaling`` are read; the oracle does not import the models layer).

    Computed in fp32 step by step as HF does, so the angles agree to the last bit.
    """
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(F32) / F32(dim)
    inv_freq = (F32(1.0) / np.power(F32(config.rope_theta), exponent)).astype(F32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = F32(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = F32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(F32)
    smooth = ((F32(old_len) / wavelen - F32(low)) / F32(high - low)).astype(F32)
    smoothed = (F32(1) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(F32)


def apply_rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Rotate ``x [T, heads, head_dim]`` by the angles of ``positions [T]``."""
    freqs = np.asarray(positions, dtype=F32)[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = np.concatenate([freqs, freqs], axis=-1)[:, None, :]  # [T, 1, D]
    cos, sin = np.cos(emb), np.sin(emb)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(F32)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_positions: np.ndarray,
              window: int | None = None) -> np.ndarray:
    """Causal grouped-query attention, scale ``1/sqrt(D)``, fp32.

    ``q [T, Hq, D]``; ``k, v [S, Hkv, D]`` hold positions ``0..S-1``; query t sees keys
    ``j <= q_positions[t]`` (and ``j > q_positions[t] - window`` with a sliding window).
    Returns ``[T, Hq, D]``.
    """
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    group = hq // hkv
    qg = q.reshape(t, hkv, group, d)
    scores = np.einsum("tkgd,skd->kgts", qg, k, dtype=F32) * F32(1.0 / math.sqrt(d))
    key_pos = np.arange(s)[None, :]
    qpos = np.asarray(q_positions)[:, None]
    allowed = key_pos <= qpos
    if window is not None:
        allowed &= key_pos > qpos - window
    scores = np.where(allowed[None, None], scores, F32(-np.inf))
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.einsum("kgts,skd->tkgd", probs, v, dtype=F32)
    return out.reshape(t, hq, d)


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """``silu(gate) * up`` with ``silu(x) = x * sigmoid(x)``."""
    with np.errstate(over="ignore"):  # exp(-gate) -> inf for very negative gate gives silu -> -0
        return (gate / (F32(1) + np.exp(-gate)) * up).astype(F32)


def linear(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ w.T (+ bias)`` for ``w [out, in]``."""
    y = x @ w.T
    return y if bias is None else y + bias


def embedding(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Rows of ``table [vocab, hidden]`` for ``ids [T]`` (a copy, fp32)."""
    return np.asarray(table[np.asarray(ids, dtype=np.int64)], dtype=F32)


def linear_epilogue(w, x, *, bias=None, residual=None, norm_weight=None, eps: float = 1e-5,
                    gate_up: bool = False) -> np.ndarray:
    """``[rmsnorm](x) . w^T (+ bias)``, then ``silu(gate) * up`` for gate_up, then ``+ residual``.

    ``w`` [rows, K] (bf16 or fp32; gate rows then up rows for gate_up), ``x`` fp32 [M, K].
    """
    xx = rms_norm(x, norm_weight, eps) if norm_weight is not None else x
    y = linear(xx, np.asarray(w, dtype=np.float32), None if bias is None else np.asarray(bias, np.float32))
    if gate_up:
        i = w.shape[0] // 2
        y = silu_mul(y[:, :i], y[:, i:])
    return y if residual is None else y + residual


def rel_error(out, ref) -> float:
    """``||out - ref|| / ||ref||`` in float64."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
