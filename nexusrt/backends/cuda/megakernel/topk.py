"""The persistent kernel's grid-wide exact top-K sampler (``cu/sampling_grid.cuh``) in NumPy: the
interpreter runs a sampled step's SAMPLE_PARTIAL / SAMPLE_GATHER / SAMPLE_FINISH instructions
with it, and tests drive it directly on any logits (ties, NaN, inf, any chunking).

The device words of one step, as the kernel keeps them in global memory:

- ``hist``: the count of keys per bucket, a bucket being the top :data:`BUCKET_BITS` bits of a
  logit's order-preserving key (:func:`order_keys`, ``order_key`` of ``sampling_keys.cuh``);
  every partial adds its chunk's counts;
- ``pool``: candidate keys (:func:`candidate_keys`: key << 32 | ~index, unique per logit, so
  sorting them descending is the spec's order, value descending then index ascending), which
  every gather appends in whatever order the CTAs arrive; its length is the device's cursor.

Each gather finds the bucket of the K-th largest key from the complete histogram by itself
(:func:`threshold_bucket`) and appends every key of that bucket or a higher one: a superset of
the top K. When there would be more than :data:`POOL_MAX` of them (the K-th key's bucket is
crowded: many equal or near-equal logits) no gather writes, and the finish draws from all the
logits instead (the device's ``sample_topk``). Otherwise the finish's top K of the pool are
exactly :func:`nexusrt.reference.sampling.candidates`, and it ends in the spec's own softmax,
top-p and draw (:func:`nexusrt.reference.sampling.pick`). Either way it zeroes the words.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ....reference.sampling import SamplingParams, candidate_count, candidates, pick

BUCKET_BITS = 12  # kBucketBits of sampling_grid.cuh: sign, exponent and 3 mantissa bits
BUCKETS = 1 << BUCKET_BITS
POOL_MAX = 4096  # kPoolMax: the candidates the pool finish takes
SORT_BUCKETS = 1024  # kSortBuckets of sampling_keys.cuh: the bucket sort's slices of the key range
CROWDED = 64  # kCrowded: a bucket holding more keys sends the sort to the bitonic network
BUCKET_SORT_MAX = 2048  # kBucketSortMax: the most candidates the bucket sort takes
_INDEX_MASK = 0xFFFFFFFF


def order_keys(logits: np.ndarray) -> np.ndarray:
    """uint32 keys whose unsigned order is the float order (``order_key``): -0 folded into +0,
    NaN the smallest key (0)."""
    x = np.asarray(logits, np.float32).copy()
    x[x == 0] = 0.0  # -0 -> +0
    u = x.view(np.uint32)
    keys = np.where(u & 0x80000000, ~u, u | 0x80000000).astype(np.uint32)
    keys[np.isnan(x)] = 0
    return keys


def key_logits(keys: np.ndarray) -> np.ndarray:
    """``key_logit`` of sampling_keys.cuh, the inverse of :func:`order_keys` (the device's draw
    takes the candidates' logits from their keys): -0 comes back as +0, NaN's key as a NaN."""
    k = np.asarray(keys, np.uint32)
    return np.where(k & 0x80000000, k & 0x7FFFFFFF, ~k).astype(np.uint32).view(np.float32)


def candidate_keys(keys: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """uint64 ``key << 32 | ~index`` (``candidate_key``)."""
    return (keys.astype(np.uint64) << np.uint64(32)) | (np.uint64(_INDEX_MASK) - indices.astype(np.uint64))


@dataclass(frozen=True)
class PoolPlan:
    """Where the K-th largest key lies: its ``bucket``, the keys in higher buckets (``above``)
    and in it (``in_bucket``)."""

    bucket: int
    above: int
    in_bucket: int

    @property
    def fits(self) -> bool:
        return self.above + self.in_bucket <= POOL_MAX


class IncompleteHistogramError(RuntimeError):
    """The histogram holds fewer than K keys: a gather ran before every partial had added."""


def threshold_bucket(hist: np.ndarray, k: int) -> PoolPlan:
    """The :class:`PoolPlan` of the K-th largest key (the device's ``threshold_bucket``)."""
    desc = hist[::-1].astype(np.int64)
    incl = np.cumsum(desc)
    if incl[-1] < k:
        raise IncompleteHistogramError(f"the histogram holds {int(incl[-1])} keys, fewer than K = {k}")
    r = int(np.searchsorted(incl, k))  # the first descending position whose running count reaches K
    return PoolPlan(BUCKETS - 1 - r, int(incl[r] - desc[r]), int(desc[r]))


class GridTopK:
    """One step of the grid-wide sampler for ``vocab`` logits and ``params`` (temperature > 0).
    ``path`` says how the last finish drew: ``"pool"`` or ``"all logits"`` (overflow); ``sort``
    how it ordered the candidates: ``"bucket"``, ``"bitonic"`` (crowded buckets or too many
    ties), each after ``"select, "`` when the pool held more than :data:`BUCKET_SORT_MAX`."""

    def __init__(self, vocab: int, params: SamplingParams):
        if params.greedy:
            raise ValueError("the grid-wide top-K runs only when sampling (temperature > 0); greedy steps "
                             "take the argmax partials")
        if not isinstance(vocab, (int, np.integer)) or vocab < 1:
            raise ValueError(f"vocab must be a positive int, got {vocab!r}")
        self.vocab, self.params, self.k = int(vocab), params, candidate_count(params, int(vocab))
        self.hist = np.zeros(BUCKETS, np.int64)
        self.pool: list[np.ndarray] = []
        self.path: str | None = None
        self.sort: str | None = None

    def _chunk(self, logits: np.ndarray, a: int, b: int) -> np.ndarray:
        if not 0 <= a < b <= self.vocab or logits.shape != (self.vocab,):
            raise ValueError(f"chunk {a}..{b} of {logits.shape} logits; the sampler was made for {self.vocab}")
        return order_keys(logits[a:b])

    def partial(self, logits: np.ndarray, a: int, b: int) -> None:
        """SAMPLE_PARTIAL of logits[a:b]: its keys per bucket into the histogram."""
        np.add.at(self.hist, self._chunk(logits, a, b) >> (32 - BUCKET_BITS), 1)

    def gather(self, logits: np.ndarray, a: int, b: int) -> PoolPlan:
        """SAMPLE_GATHER of logits[a:b]: its candidates into the pool when the plan fits."""
        plan = threshold_bucket(self.hist, self.k)
        if plan.fits:
            keys = self._chunk(logits, a, b)
            mine = np.flatnonzero((keys >> (32 - BUCKET_BITS)) >= plan.bucket)
            if mine.size:
                self.pool.append(candidate_keys(keys[mine], mine + a))
        return plan

    def _select(self, pool: np.ndarray) -> np.ndarray:
        """The pool's candidates at or above the K-th largest key (all that key's ties kept)."""
        keys = pool >> np.uint64(32)
        kth = np.sort(keys)[::-1][self.k - 1]
        return pool[keys >= kth]

    def pooled(self) -> int:
        """The cursor: how many candidates the pool holds."""
        return sum(p.size for p in self.pool)

    def finish(self, logits: np.ndarray, step: int) -> int:
        """SAMPLE_FINISH: the token at ``step``; the histogram and pool are zeroed afterwards."""
        logits = np.asarray(logits, np.float32)
        count = self.pooled()
        if count == 0:  # the pool overflowed: the draw from all logits
            # The device gathers exactly the K candidates there and sorts them as below.
            c = candidates(logits, self.k)
            self.path, token = "all logits", pick(logits, c, self.params, step)
            top = candidate_keys(order_keys(logits[c]), c)
            self.sort = "bucket" if bucket_sort_top(top, self.k) is not None else "bitonic"
        else:
            if count > POOL_MAX:
                raise AssertionError(f"the pool holds {count} candidates, above {POOL_MAX}: gathers disagreed")
            pool = np.concatenate(self.pool)
            self.sort = "bucket"
            if count > BUCKET_SORT_MAX:  # the device's radix select first keeps the top K (its ties too)
                self.sort, pool = "select, bucket", self._select(pool)
            top = bucket_sort_top(pool, self.k) if pool.size <= BUCKET_SORT_MAX else None
            if top is None:  # too many (ties at the K-th key) or crowded: the device's bitonic sort
                self.sort, top = self.sort.replace("bucket", "bitonic"), np.sort(pool)[::-1][:self.k]
            idx = (np.uint64(_INDEX_MASK) - (top & np.uint64(_INDEX_MASK))).astype(np.int64)
            self.path, token = "pool", pick(logits, idx, self.params, step)
        self.hist[:] = 0
        self.pool = []
        return token


def sort_buckets(keys: np.ndarray) -> np.ndarray:
    """``sort_bucket`` of sampling_sort.cuh for every key (uint32): kSortBuckets equal slices of
    ``[keys.min(), keys.max()]`` in fp32 arithmetic, the largest keys in bucket 0."""
    keys = np.asarray(keys, np.uint32)
    hi = keys.max()
    scale = np.float32(SORT_BUCKETS) / (np.float32(hi - keys.min()) + np.float32(1))
    return np.minimum(SORT_BUCKETS - 1, ((hi - keys).astype(np.float32) * scale).astype(np.int64))


def bucket_sort_top(cand: np.ndarray, keep: int) -> np.ndarray | None:
    """``bucket_sort_top`` of sampling_sort.cuh: the ``keep`` largest candidate keys, descending,
    placed as the device places them (a key's rank = its bucket's first rank + the larger keys
    in its bucket: position in (bucket, key descending) order, keys being unique), or None when
    a bucket holds more than :data:`CROWDED` keys (the device then sorts with its bitonic
    network). Raises if that order is not descending, i.e. if the bucket map were not monotone."""
    cand = np.asarray(cand, np.uint64)
    if cand.size > BUCKET_SORT_MAX:
        raise ValueError(f"{cand.size} candidates: the bucket sort takes at most {BUCKET_SORT_MAX}")
    bucket = sort_buckets((cand >> np.uint64(32)).astype(np.uint32))
    sizes = np.bincount(bucket, minlength=SORT_BUCKETS)
    if sizes.max() > CROWDED:
        return None
    out = cand[np.lexsort((~cand, bucket))]  # by bucket, then larger keys first within one
    if np.any(out[1:] > out[:-1]):
        raise AssertionError("the bucket sort's ranks are not the descending order")
    return out[:keep]


def run_chunks(logits: np.ndarray, params: SamplingParams, step: int, bounds, order=None) -> tuple[int, str]:
    """A whole sampled step over the chunks ``bounds`` ``[(a, b), ...]``: every partial, then every
    gather (in the chunk order ``order``, default as given: the pool's order follows it), then
    the finish. Returns ``(token, path)``."""
    logits = np.asarray(logits, np.float32)
    grid = GridTopK(logits.shape[0], params)
    order = range(len(bounds)) if order is None else order
    for c in order:
        grid.partial(logits, *bounds[c])
    for c in order:
        grid.gather(logits, *bounds[c])
    return grid.finish(logits, step), grid.path
