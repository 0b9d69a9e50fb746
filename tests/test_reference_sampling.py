"""The sampling algorithm: validation, the counter-based uniform, ties, top-k/top-p, distributions."""

from __future__ import annotations

import numpy as np
import pytest
import sampling_order_case as order_case

from nexusrt.reference.sampling import (
    K_MAX,
    SamplingParams,
    candidates,
    sample,
    uniform,
)

RNG = np.random.default_rng(99)


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"top_k": 2.5}, "top_k"), ({"seed": -3}, "seed"), ({"seed": 2 ** 64}, "seed"),
])
def test_bad_params_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must"):
        SamplingParams(**kwargs)


def test_uniform_is_the_documented_splitmix_draw():
    def reference(seed, step):  # written out again from the docstring
        z = (seed * 0x9E3779B97F4A7C15 + step + 0x9E3779B97F4A7C15) % 2 ** 64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2 ** 64
        return ((z ^ (z >> 31)) >> 11) / 2 ** 53

    for seed, step in [(0, 0), (1, 0), (42, 7), (2 ** 64 - 1, 123456)]:
        assert uniform(seed, step) == reference(seed, step)
    draws = np.array([uniform(7, s) for s in range(20000)])
    assert draws.min() >= 0 and draws.max() < 1 and abs(draws.mean() - 0.5) < 0.01
    assert uniform(7, 0) != uniform(8, 0)


def test_greedy_takes_the_lowest_index_on_ties():
    logits = np.array([0.5, 2.0, -1.0, 2.0], np.float32)
    assert sample(logits, SamplingParams(temperature=0), 0) == 1
    assert sample(logits, SamplingParams(temperature=1.0, top_k=1, seed=3), 5) == 1


def test_candidates_order_and_cut_ties():
    logits = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0], np.float32)
    assert candidates(logits, 7).tolist() == [1, 3, 2, 4, 5, 0, 6]
    assert candidates(logits, 3).tolist() == [1, 3, 2]  # of the three 2.0s the lowest index wins
    big = RNG.standard_normal(5000).astype(np.float32)
    big[[10, 20]] = big.max() + 1
    cand = candidates(big, K_MAX)
    assert cand.size == K_MAX and cand[:2].tolist() == [10, 20]
    assert np.all(np.diff(big[cand]) <= 0)
    assert set(cand.tolist()) == set(np.argsort(-big, kind="stable")[:K_MAX].tolist())


def _frequencies(logits, params, n=20000):
    counts = np.zeros(len(logits))
    for step in range(n):
        counts[sample(logits, params, step)] += 1
    return counts / n


def test_sampling_follows_softmax():
    logits = np.array([2.0, 1.0, 0.5, -1.0, 0.0], np.float32)
    for temperature in (1.0, 0.5):
        p = np.exp(logits / temperature)
        p /= p.sum()
        freq = _frequencies(logits, SamplingParams(temperature=temperature, seed=11))
        np.testing.assert_allclose(freq, p, atol=0.015)


def test_top_p_and_top_k_restrict_the_candidates():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    freq = _frequencies(logits, SamplingParams(temperature=1.0, top_p=0.8, seed=1), 8000)
    assert freq[2] == freq[3] == 0
    np.testing.assert_allclose(freq[:2], [0.625, 0.375], atol=0.02)
    freq = _frequencies(logits, SamplingParams(temperature=1.0, top_k=3, seed=2), 8000)
    assert freq[3] == 0 and freq[2] > 0.1


def test_same_seed_same_tokens():
    logits = RNG.standard_normal(3000).astype(np.float32)
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    a = [sample(logits, params, s) for s in range(50)]
    assert a == [sample(logits, params, s) for s in range(50)]
    assert len(set(a)) > 10
    assert a != [sample(logits, SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1235), s)
                 for s in range(50)]
    assert SamplingParams().resolved().seed is not None


def test_infinite_logits_follow_ieee_without_warnings():
    """+inf makes inf - inf = NaN in the softmax (as on the device): the +inf token is the
    pick, and NumPy is not asked to warn about what the spec means."""
    import warnings

    logits = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    logits[7], logits[3] = np.inf, -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sample(logits, SamplingParams(temperature=0.7, top_p=0.9, seed=1), 0) == 7
        huge = np.random.default_rng(1).standard_normal(100).astype(np.float32)
        huge[5] = 3e38  # z = l / T overflows to inf at a tiny temperature
        assert sample(huge, SamplingParams(temperature=1e-3, seed=1), 0) == 5


def test_the_prefix_sums_are_one_sequential_chain():
    x, params, step = order_case.logits(), order_case.params(), order_case.step()
    assert sample(x, params, step) == 0  # each small weight rounds away against the 1.0
    assert order_case.chunked_pick(x, params, step) >= 32  # summed in chunks first, they count


def test_nan_logits_never_win_and_all_nan_define_no_pick():
    import numpy as np

    from nexusrt.errors import NonFiniteLogits
    from nexusrt.reference.sampling import SamplingParams, sample

    some = np.array([0.5, np.nan, 2.0, -1.0, np.nan], np.float32)
    assert sample(some, SamplingParams(), 0) == 2  # np.argmax alone would say 1, the first NaN
    assert sample(np.array([np.nan, -np.inf, -np.inf], np.float32), SamplingParams(), 0) == 1
    assert sample(some, SamplingParams(temperature=0.7, seed=3), 4) in (0, 2, 3)  # K = 5: every logit
    with pytest.raises(NonFiniteLogits, match="step 4 hold 2 NaN of 5, too many to pick"):
        sample(some, SamplingParams(temperature=0.7, top_k=4, seed=3), 4)  # 3 numbers for K = 4
    for params in (SamplingParams(), SamplingParams(temperature=0.7, top_p=0.9, seed=3)):
        with pytest.raises(NonFiniteLogits, match="hold 3 NaN of 3"):
            sample(np.full(3, np.nan, np.float32), params, 1)
    assert sample(np.array([0.5, np.inf, 2.0], np.float32), SamplingParams(), 0) == 1  # inf: still a pick


def test_a_temperature_fp32_cannot_hold_is_refused():
    from nexusrt.reference.sampling import MIN_TEMPERATURE, SamplingParams

    with pytest.raises(ValueError, match="temperature 1e-320 is below 1.18e-38"):
        SamplingParams(temperature=1e-320)
    assert SamplingParams(temperature=MIN_TEMPERATURE).temperature > 0
