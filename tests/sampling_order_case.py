"""A draw that pins the order of the spec's prefix sums (reference/sampling.py, step 3: one
sequential fp32 chain). One candidate of weight 1 and 1,023 of weight e**-17 (~4.1e-8, under
half an ulp of 1.0): added one by one after the 1.0 each small weight rounds away, so every
c_j is 1.0 and every draw picks index 0. Summed in any other order, e.g. chunks of 32 whose
totals are then added (:func:`chunked_pick`, a parallel scan's shape), the small weights add
up first, the total reaches ~1 + 4.2e-5, and a draw with u above ~1 - 3e-5 lands far past
index 0. The random cases of the sampling tests cannot tell the orders apart (they differ
by ulps); this one can."""

from __future__ import annotations

import numpy as np

from nexusrt.reference.sampling import SamplingParams, uniform

VOCAB = 4096
SEED = 77
CHUNK = 32


def logits() -> np.ndarray:
    x = np.full(VOCAB, -40.0, dtype=np.float32)  # never among the 1,024 candidates
    x[0] = 0.0
    x[1:1024] = -17.0  # equal: candidate rank = index
    return x


def params() -> SamplingParams:
    return SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=SEED)


def step() -> int:
    """The first step whose draw has u >= 1 - 2e-5."""
    for s in range(2_000_000):
        if uniform(SEED, s) >= 1.0 - 2e-5:
            return s
    raise AssertionError("no step with a draw that high")  # u has 53 random bits: not reached


def chunked_pick(x: np.ndarray, p: SamplingParams, s: int) -> int:
    """The pick were c summed in chunks of CHUNK (sequential inside a chunk, then the chunks'
    totals sequentially as offsets): what the spec does NOT do."""
    order = np.lexsort((np.arange(x.size), -x))[:1024]
    z = x[order] / np.float32(p.temperature)
    w = np.exp(z - z[0]).astype(np.float32)
    local = np.cumsum(w.reshape(-1, CHUNK), axis=1, dtype=np.float32)  # 1,024 = 32 chunks
    offset = np.zeros(local.shape[0], np.float32)
    offset[1:] = np.cumsum(local[:-1, -1], dtype=np.float32)
    c = (offset[:, None] + local).reshape(-1)
    target = uniform(p.seed, s) * float(c[-1])
    hits = np.flatnonzero(c.astype(np.float64) > target)
    return int(order[hits[0] if hits.size else c.size - 1])
