"""The persistent kernel's grid-wide exact top-K sampler (cu/sampling_grid.cuh), on the CPU through
its NumPy model (megakernel/topk.py, which the interpreter runs): its pick is
reference/sampling.sample's for many parameters, seeds, steps, vocabularies and chunkings
(ties at the cut, all-equal logits, NaN, +-inf, -0), whatever order the chunks reach the pool;
both of its paths (the pool, and all logits when the pool would overflow) are taken; and in the
interpreted program the new waits are needed (removing one is caught) and a greedy step's gathers
skip theirs."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from nexusrt.backends.cuda.megakernel import topk
from nexusrt.backends.cuda.megakernel.instructions import Op
from nexusrt.backends.cuda.megakernel.interpret import Interpreter, UnwrittenReadError
from nexusrt.backends.cuda.megakernel.lower import check, lower, skeleton
from nexusrt.reference.sampling import SamplingParams, candidates, sample
from tests.test_megakernel_plan import PROMPT, TABLE, tiny_case  # noqa: F401


def _logits(rng, vocab, kind):
    if kind == "normal":
        return (rng.standard_normal(vocab) * 3).astype(np.float32)
    if kind == "peaked":
        x = rng.standard_normal(vocab).astype(np.float32)
        x[rng.integers(0, vocab, 5)] += 20
        return x
    if kind == "ties":  # coarse values: exact ties everywhere, also at the top-k cut
        return (np.round(rng.standard_normal(vocab) * 4) / 2).astype(np.float32)
    if kind == "equal":  # one value: the candidates are the lowest indices
        return np.full(vocab, 1.25, np.float32)
    if kind == "signed_zero":  # -0 and +0 are one key; ties by index
        return rng.choice(np.array([0.0, -0.0, 0.5, -3.0], np.float32), vocab)
    if kind == "inf":  # +inf wins (z - z0 is NaN there: the spec's n = 1), -inf never reached
        x = rng.standard_normal(vocab).astype(np.float32)
        x[rng.integers(0, vocab, 3)] = np.inf
        x[rng.integers(0, vocab, 3)] = -np.inf
        return x
    if kind == "nan":  # NaN sorts below every number (reference and device); fewer than V - K of them
        x = rng.standard_normal(vocab).astype(np.float32)
        x[rng.integers(0, vocab, max(1, vocab // 50))] = np.nan
        return x
    if kind == "narrow":  # a 1e-3 spread: everything in one or two buckets, the pool overflows
        return (10 + rng.standard_normal(vocab) * 1e-3).astype(np.float32)
    if kind == "flat":  # uniform: the K-th key's bucket is crowded, the pool may exceed the bucket sort
        return rng.uniform(0, 64, vocab).astype(np.float32)
    raise ValueError(kind)


KINDS = ["normal", "peaked", "ties", "equal", "signed_zero", "inf", "nan", "narrow", "flat"]


def _bounds(rng, vocab):
    """Chunks of a random size (not a divisor of vocab in general), like the LM-head chunks."""
    size = int(rng.integers(1, max(2, vocab // 3) + 1))
    return [(a, min(a + size, vocab)) for a in range(0, vocab, size)]


def _cases(n=160):
    rng = np.random.default_rng(15)
    fixed = [  # (vocab, kind, temperature, top_k, top_p)
        (128256, "normal", 0.7, 0, 0.9), (128256, "normal", 0.7, 1024, 1.0), (128256, "ties", 1.0, 1024, 1.0),
        (151936, "normal", 1.0, 1, 1.0), (32000, "peaked", 0.6, 0, 0.95), (4097, "ties", 0.8, 0, 1.0),
        (5000, "equal", 1.0, 0, 1.0), (5000, "equal", 1.0, 7, 0.5), (1000, "signed_zero", 1.0, 20, 1.0),
        (3000, "inf", 0.9, 0, 0.9), (3000, "nan", 1.1, 50, 0.8), (1, "normal", 1.0, 0, 1.0),
        (50, "normal", 1.0, 0, 1.0), (1024, "ties", 1.0, 1024, 1e-6), (128256, "normal", 0.5, 0, 1e-6),
        (20000, "narrow", 1.0, 0, 0.9), (1025, "nan", 1.0, 0, 1.0),
    ]
    out = [(v, k, t, tk, tp, int(rng.integers(0, 2**64, dtype=np.uint64)), int(rng.integers(0, 5000)))
           for v, k, t, tk, tp in fixed]
    for _ in range(n - len(out)):
        out.append((int(rng.choice([2, 7, 100, 1000, 1024, 1025, 4097, 32000, 128256])), str(rng.choice(KINDS)),
                    float(rng.choice([0.3, 0.7, 1.0, 1.5])), int(rng.choice([0, 1, 2, 20, 1023, 1024, 3000])),
                    float(rng.choice([1.0, 0.95, 0.9, 0.5, 1e-6])), int(rng.integers(0, 2**64, dtype=np.uint64)),
                    int(rng.integers(0, 5000))))
    return out


def _spec_defined(logits, params):
    """The reference draws from the top K only when they hold no NaN (NaN is the smallest key;
    with fewer than K numbers its candidate set is empty): the cases it defines."""
    k = min(params.top_k or 1024, 1024, logits.shape[0])
    return k >= logits.shape[0] or np.count_nonzero(~np.isnan(logits)) >= k


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the spec's inf - inf (kind "inf")
def test_the_grid_sampler_picks_the_reference_token():
    paths = {}
    for i, (vocab, kind, temp, top_k, top_p, seed, step) in enumerate(_cases()):
        rng = np.random.default_rng(i)
        logits = _logits(rng, vocab, kind)
        params = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, seed=seed)
        if not _spec_defined(logits, params):
            continue
        bounds = _bounds(rng, vocab)
        want = sample(logits, params, step)
        for order in (None, rng.permutation(len(bounds))):  # the pool's order follows the CTAs'
            token, path = topk.run_chunks(logits, params, step, bounds, order)
            assert token == want, (i, vocab, kind, params, step, path)
            paths.setdefault(path, set()).add(kind)
    assert "normal" in paths["pool"] and "narrow" in paths["all logits"], paths


def test_the_pool_is_a_superset_of_the_candidates_in_candidate_order():
    """What the device's finish relies on: the pool holds every one of the spec's K candidates, and
    sorting its 64-bit keys descending puts them first, in the spec's order (value, then index)."""
    rng = np.random.default_rng(3)
    for kind in ("normal", "ties", "equal", "signed_zero", "inf"):
        logits = _logits(rng, 20000, kind)
        for k in (1, 20, 1024):
            grid = topk.GridTopK(20000, SamplingParams(temperature=1.0, top_k=k, seed=1))
            bounds = _bounds(rng, 20000)
            for b in bounds:
                grid.partial(logits, *b)
            plans = {grid.gather(logits, *b) for b in bounds}
            assert len(plans) == 1  # every gather finds the same bucket by itself
            (plan,) = plans
            if not plan.fits:
                assert grid.pooled() == 0
                continue
            pool = np.sort(np.concatenate(grid.pool))[::-1]
            assert pool.size == plan.above + plan.in_bucket and plan.above < k <= pool.size
            idx = 0xFFFFFFFF - (pool[:k] & np.uint64(0xFFFFFFFF)).astype(np.int64)
            assert np.array_equal(idx, candidates(logits, k)), (kind, k)


def test_the_bucket_sort_orders_and_selects_like_a_full_sort():
    """bucket_sort_top (its model; the device's sort of the candidates): the top `keep` keys in
    descending order for keys spread over any range (one key, a handful, 2,048, the full uint32
    range, adjacent keys), or None (-> bitonic) when one bucket holds more than CROWDED keys."""
    rng = np.random.default_rng(5)
    spreads = [rng.standard_normal(2048) * 4, rng.standard_normal(300) * 1e-3 + 5, rng.uniform(-1e30, 1e30, 2048),
               np.array([3.0]), np.array([-np.inf, np.inf, 0.0, -0.0, 1.0]), rng.standard_normal(31),
               np.concatenate([rng.standard_normal(1000), [np.nan] * 3])]
    for x in spreads:
        keys = topk.order_keys(x.astype(np.float32))
        cand = topk.candidate_keys(keys, rng.permutation(keys.size))
        for keep in sorted({1, min(50, keys.size), min(1024, keys.size), keys.size}):
            got = topk.bucket_sort_top(cand, keep)
            if got is not None:
                assert np.array_equal(got, np.sort(cand)[::-1][:keep]), (x[:3], keep)
    adjacent = np.arange(2**31 - 1000, 2**31 + 1000, dtype=np.uint32)  # one ulp apart: 2 per bucket
    cand = topk.candidate_keys(adjacent, np.arange(adjacent.size))
    assert np.array_equal(topk.bucket_sort_top(cand, 1024), np.sort(cand)[::-1][:1024])
    extremes = np.array([0, 1, 2**31, 2**32 - 2, 2**32 - 1], np.uint32)
    assert list(topk.sort_buckets(extremes)) == [1023, 1023, 512, 0, 0]
    crowded = topk.candidate_keys(np.full(65, 7, np.uint32), np.arange(65))  # 65 ties: one bucket
    assert topk.bucket_sort_top(crowded, 10) is None
    assert topk.bucket_sort_top(crowded[:64], 10) is not None
    with pytest.raises(ValueError, match="at most 2048"):
        topk.bucket_sort_top(np.zeros(2049, np.uint64), 1)


def test_the_bucket_map_is_monotone():
    """A larger key never lands in a later bucket (fp32 rounding included), over random and
    adversarial key ranges: the ranks the device computes are then the descending order."""
    rng = np.random.default_rng(6)
    for lo, hi in ((0, 2**32 - 1), (2**31, 2**31 + 5000), (123, 2**24 + 17), (2**32 - 3000, 2**32 - 1)):
        keys = np.unique(np.concatenate([rng.integers(lo, hi, 5000, dtype=np.uint64), [lo, hi]])).astype(np.uint32)
        b = topk.sort_buckets(keys)  # keys ascending -> buckets non-increasing
        assert b[0] == topk.SORT_BUCKETS - 1 and b[-1] == 0 and np.all(np.diff(b) <= 0), (lo, hi)


def test_every_sort_path_is_taken_and_draws_the_spec_token():
    """The finish's three ways to order a pool (bucket; bitonic when crowded; the radix select first
    when the pool holds more than BUCKET_SORT_MAX) and the all-logits path, each drawing the
    reference token."""
    rng = np.random.default_rng(8)
    seen = {}
    for kind, vocab, k in (("normal", 20000, 0), ("ties", 20000, 0), ("flat", 50000, 0), ("flat", 32000, 0),
                           ("equal", 3000, 20), ("narrow", 20000, 0), ("normal", 20000, 50)):
        logits = _logits(rng, vocab, kind)
        params = SamplingParams(temperature=0.8, top_k=k, top_p=0.9, seed=3)
        grid = topk.GridTopK(vocab, params)
        bounds = _bounds(rng, vocab)
        for b in bounds:
            grid.partial(logits, *b)
        for b in bounds:
            grid.gather(logits, *b)
        pooled = grid.pooled()
        assert grid.finish(logits, 5) == sample(logits, params, 5), (kind, vocab)
        seen.setdefault((grid.path, grid.sort), []).append((kind, vocab, pooled))
    assert {("pool", "bucket"), ("pool", "bitonic"), ("pool", "select, bucket"),
            ("all logits", "bucket")} <= set(seen), seen


def test_key_logits_invert_order_keys():
    x = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 3e38, np.inf], np.float32)
    back = topk.key_logits(topk.order_keys(x))
    assert np.array_equal(back, np.where(x == 0, np.float32(0), x)) and not np.signbit(back[3])
    assert np.isnan(topk.key_logits(topk.order_keys(np.array([np.nan], np.float32)))[0])


def test_order_keys_follow_the_float_order():
    x = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf, np.nan], np.float32)
    keys = topk.order_keys(x)
    assert keys[-1] == 0 and keys[3] == keys[4] and np.all(np.diff(keys[:-1].astype(np.int64))[[0, 1, 2, 4, 5, 6]] > 0)
    assert topk.order_keys(np.array([-np.inf], np.float32))[0] > 0  # above NaN


def test_threshold_bucket_and_its_refusals():
    hist = np.zeros(topk.BUCKETS, np.int64)
    hist[[4000, 3000, 10]] = [5, 10, 100]
    assert topk.threshold_bucket(hist, 5) == topk.PoolPlan(4000, 0, 5)
    assert topk.threshold_bucket(hist, 6) == topk.PoolPlan(3000, 5, 10)
    assert topk.threshold_bucket(hist, 115) == topk.PoolPlan(10, 15, 100)
    with pytest.raises(topk.IncompleteHistogramError, match="115 keys, fewer than K = 116"):
        topk.threshold_bucket(hist, 116)
    assert not topk.PoolPlan(0, 1000, topk.POOL_MAX - 999).fits and topk.PoolPlan(0, 1000, topk.POOL_MAX - 1000).fits
    with pytest.raises(ValueError, match="only when sampling"):
        topk.GridTopK(10, SamplingParams())
    grid = topk.GridTopK(10, SamplingParams(temperature=1.0, seed=0))
    with pytest.raises(ValueError, match="chunk 5..11 of \\(10,\\) logits"):
        grid.partial(np.zeros(10, np.float32), 5, 11)


def test_the_finish_leaves_the_words_zero_for_the_next_step():
    rng = np.random.default_rng(0)
    logits = _logits(rng, 5000, "normal")
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=4)
    grid = topk.GridTopK(5000, params)
    for step in range(3):  # one workspace, three steps: nothing carries over
        for b in ((0, 2500), (2500, 5000)):
            grid.partial(logits, *b)
        for b in ((0, 2500), (2500, 5000)):
            grid.gather(logits, *b)
        assert grid.finish(logits, step) == sample(logits, params, step) and grid.path == "pool"
        assert not grid.hist.any() and grid.pooled() == 0


# -- in the interpreted program ---------------------------------------------------------------
SAMPLED = SamplingParams(temperature=0.7, top_p=0.9, seed=11)


def _step(prog, case, seed, sampling):
    _, weights, pools, _ = case
    return Interpreter(prog, weights).step(123, len(PROMPT), *copy.deepcopy(pools), TABLE, seed=seed,
                                           sampling=sampling, draw_step=4)


def test_a_greedy_step_runs_gathers_without_their_waits(tiny_case):
    """The kernel skips a gather's waits when the step is greedy (it does nothing then): some
    interleaving runs a gather before the LM head is done, and the pick is still the argmax."""
    cfg, ref = tiny_case[0], tiny_case[3]
    prog = lower(skeleton(cfg), cfg, 7, 16)
    early = False
    for seed in range(6):
        r = _step(prog, tiny_case, seed, SamplingParams())
        assert r.token == int(np.argmax(ref))
        pos = {idx: n for n, (_, idx) in enumerate(r.trace)}
        gathers = [pos[i] for i, x in enumerate(prog.instructions) if x.op == Op.SAMPLE_GATHER]
        partials = [pos[i] for i, x in enumerate(prog.instructions) if x.op == Op.SAMPLE_PARTIAL]
        early |= min(gathers) < max(partials)
    assert early
    assert _step(prog, tiny_case, 0, SAMPLED).token == sample(ref, SAMPLED, 4)


@pytest.mark.parametrize("op, which", [(Op.SAMPLE_GATHER, 0), (Op.SAMPLE_FINISH, 1)])
def test_a_removed_sampler_wait_is_caught(op, which, tiny_case):
    """A gather without its wait can read an incomplete histogram; a finish without its wait for
    the gathers can draw from an incomplete pool. Both are well formed for lower.check; running a
    sampled step in a few interleavings catches them."""
    cfg = tiny_case[0]
    prog = lower(skeleton(cfg), cfg, 7, 16)
    prog.instructions = [dataclasses.replace(i, waits=tuple(w for k, w in enumerate(i.waits) if k != which))
                         if i.op == op else i for i in prog.instructions]
    check(prog)
    with pytest.raises(UnwrittenReadError, match="a wait is missing"):
        for seed in range(12):
            _step(prog, tiny_case, seed, SAMPLED)


def test_the_ordering_check_refuses_a_gather_before_the_partials(tiny_case):
    cfg = tiny_case[0]
    prog = lower(skeleton(cfg), cfg, 7, 16)
    ins = prog.instructions
    g = next(i for i, x in enumerate(ins) if x.op == Op.SAMPLE_GATHER)
    p = next(i for i, x in enumerate(ins) if x.op == Op.SAMPLE_PARTIAL)
    ins[p], ins[g] = ins[g], ins[p]  # the gather now precedes the partials it waits for
    with pytest.raises(ValueError, match=r"SAMPLE_GATHER layer 0\) waits for sample.partials"):
        check(prog)
