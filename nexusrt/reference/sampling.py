"""Sampling: parameters and the one algorithm both backends implement.

Given fp32 logits ``l[0..V-1]``, :class:`SamplingParams` ``(temperature T, top_k, top_p,
seed)`` and the 0-based index ``step`` of the token being generated:

1. **Greedy** when ``T == 0``: ``argmax l`` (the lowest index among equal maxima).
2. **Candidates**: ``K = min(top_k or K_MAX, K_MAX, V)`` with ``K_MAX = 1024``; the K
   largest logits, ordered by value descending, then index ascending on ties.
3. **Softmax** over candidates, fp32: ``z_i = l_i / T`` (IEEE division),
   ``p_i = exp(z_i - z_0)`` (``z_0`` is the largest), prefix sums
   ``c_j = c_{j-1} + p_j`` accumulated sequentially in fp32.
4. **Top-p**: keep the shortest prefix ``0..n-1`` with ``c_{n-1} >= top_p * c_{K-1}``
   (fp32 product), i.e. whose probability mass reaches ``top_p``.
5. **Draw**: ``u = uniform(seed, step)``; in float64, ``target = u * c_{n-1}``; the pick
   is the first candidate ``j < n`` with ``c_j > target`` (``n-1`` if none).

A NaN never wins the greedy pick and is the smallest candidate (the device's rule). Logits that
are all NaN, or a sampled step with fewer than K numbers among them (its candidate set is
empty), define no pick: :func:`sample` raises :class:`~nexusrt.errors.NonFiniteLogits` (a
checkpoint with NaN or inf weights gets there).

``uniform(seed, step) = (splitmix64(seed * 0x9E3779B97F4A7C15 + step) >> 11) * 2**-53``,
all integer arithmetic mod 2**64 (``splitmix64``: :mod:`nexusrt.reference.rng`), so
``u`` is in ``[0, 1)`` with 53 random bits. A device ``expf`` may differ from NumPy's
by an ulp; that changes a pick only when ``u`` lands within ~1e-7 of a boundary.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, replace

import numpy as np

from ..errors import InvalidArgument, NonFiniteLogits
from .rng import GAMMA, MASK64, splitmix64

K_MAX = 1024
MIN_TEMPERATURE = float(np.finfo(np.float32).tiny)  # the least positive temperature: fp32's least normal


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 is greedy; ``top_k`` 0 means only the K_MAX cap; ``seed`` None
    means "pick one" (the engine resolves it and reports it)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        # NumPy scalars (np.int64 seeds, np.float32 temperatures) are taken, held as Python numbers.
        for name, kind, cast in (("temperature", numbers.Real, float), ("top_k", numbers.Integral, int),
                                 ("top_p", numbers.Real, float), ("seed", numbers.Integral, int)):
            v = getattr(self, name)
            if isinstance(v, kind) and not isinstance(v, (bool, np.bool_)) and type(v) not in (int, float):
                object.__setattr__(self, name, cast(v))
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise InvalidArgument("temperature", f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if 0 < t < MIN_TEMPERATURE:  # as fp32 it would be 0 or subnormal: l / T divides by zero
            raise InvalidArgument("temperature", f"temperature {t!r} is below {MIN_TEMPERATURE:.3g}, the least "
                                                 "fp32 holds as a normal number; use 0 for greedy")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InvalidArgument("top_k", f"top_k must be an integer >= 0 (0 = no limit), got {k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise InvalidArgument("top_p", f"top_p must be in (0, 1], got {p!r}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MASK64):
            raise InvalidArgument("seed", f"seed must be an integer in [0, 2**64), got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def resolved(self) -> "SamplingParams":
        """These params with a concrete seed (random when unset)."""
        if self.seed is not None:
            return self
        return replace(self, seed=int.from_bytes(os.urandom(8), "little") >> 1)


def uniform(seed: int, step: int) -> float:
    """The draw for ``step`` under ``seed``: a float in [0, 1)."""
    return (splitmix64((seed * GAMMA + step) & MASK64) >> 11) * 2.0 ** -53


def candidates(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest logits, value descending then index ascending."""
    v = logits.shape[0]
    k = min(k, v)
    if k < v:
        part = np.argpartition(-logits, k - 1)[:k]
        threshold = logits[part].min()
        above = np.flatnonzero(logits > threshold)
        # Equal values at the cut: the lowest indices win, whatever argpartition chose.
        equal = np.flatnonzero(logits == threshold)[:k - above.size]
        idx = np.concatenate([above, equal])
    else:
        idx = np.arange(v)
    return idx[np.lexsort((idx, -logits[idx]))]


def sample(logits: np.ndarray, params: SamplingParams, step: int) -> int:
    """The next token id under ``params`` at ``step`` (see the module docstring)."""
    logits = np.asarray(logits, dtype=np.float32)
    nan = np.isnan(logits)
    if nan.all():
        raise _no_pick(step, logits.size, logits.size)
    if params.greedy:
        if not nan.any():
            return int(np.argmax(logits))
        best = logits[~nan].max()  # np.argmax would pick the first NaN: here a NaN never wins
        return int(np.flatnonzero(~nan & (logits == best))[0])
    idx = candidates(logits, candidate_count(params, logits.shape[0]))
    if idx.size == 0:  # fewer than K numbers: the K largest are not defined
        raise _no_pick(step, int(nan.sum()), logits.size)
    return pick(logits, idx, params, step)


def _no_pick(step: int, nans: int, size: int) -> NonFiniteLogits:
    return NonFiniteLogits(f"the logits of step {step} hold {nans} NaN of {size}, too many to pick a token: the "
                           "model's weights (or what they computed) are not finite numbers")


def candidate_count(params: SamplingParams, vocab: int) -> int:
    """``K = min(top_k or K_MAX, K_MAX, vocab)``: how many candidates a sampled step draws from."""
    return min(params.top_k or K_MAX, K_MAX, vocab)


def pick(logits: np.ndarray, idx: np.ndarray, params: SamplingParams, step: int) -> int:
    """Steps 3-5 of the module docstring (softmax, top-p, draw) over the candidates ``idx``,
    already in candidate order (:func:`candidates`); ``logits`` fp32."""
    # IEEE results all the way, as on the device: an infinite logit (or z overflowing at a tiny
    # temperature) makes inf - inf = NaN here, on purpose, not a warning.
    with np.errstate(invalid="ignore", over="ignore"):
        z = logits[idx] / np.float32(params.temperature)
        p = np.exp(z - z[0])
    c = np.cumsum(p, dtype=np.float32)  # numpy accumulates in order: the sequential sum
    n = int(np.argmax(c >= np.float32(params.top_p) * c[-1])) + 1
    target = uniform(params.seed or 0, step) * float(c[n - 1])
    hits = np.flatnonzero(c[:n].astype(np.float64) > target)
    return int(idx[hits[0] if hits.size else n - 1])
