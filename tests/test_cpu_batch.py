"""The CPU backend's batched step under the serving engine: exact batch invariance (a request's
ids alone, among 31 others, chunked, after a prefix hit or a preemption), real prefix reuse."""

from __future__ import annotations

import numpy as np
import pytest

from nexusrt.backends.base import BatchRunner, generate_tokens
from nexusrt.backends.cpu.batch import CpuBatchRunner, blocks_for_bytes
from nexusrt.backends.cpu.decoder import TILE_ROWS, tiled_linear
from nexusrt.backends.cpu.model import CpuRunner
from nexusrt.models.loader import load_model
from nexusrt.reference.sampling import SamplingParams
from nexusrt.serving import Engine, KvPolicy, SchedulerConfig, Sequence


@pytest.fixture(scope="module")
def oracle():
    model = load_model("synthetic:tiny")
    runner = CpuRunner(model.weights, max_context=512)
    yield runner
    runner.close()
    model.weights.close()


def engine(oracle, num_blocks=256, max_running=32, budget=256, caching=True):
    return Engine(CpuBatchRunner(oracle.decoder, num_blocks, oracle.max_context),
                  SchedulerConfig(max_running, budget), prefix_caching=caching)


def requests(n=32):
    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        prompt = [int(t) for t in rng.integers(3, 500, size=int(rng.integers(1, 70)))]
        params = SamplingParams() if i % 2 else SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=i)
        out.append((prompt, params, int(rng.integers(1, 24))))
    return out


def run(e, reqs, max_context=512):
    seqs = [Sequence(p, params, m, max_context) for p, params, m in reqs]
    for s in seqs:
        e.add(s)
    e.run_until_done()
    e.blocks.audit()
    assert e.blocks.num_used == 0
    return [s.output_ids for s in seqs]


def test_a_row_of_a_tiled_linear_does_not_depend_on_its_neighbours():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 96)).astype(np.float32)
    x = rng.standard_normal((40, 96)).astype(np.float32)
    whole = tiled_linear(x, w)
    for i in (0, 7, TILE_ROWS, 39):
        assert np.array_equal(tiled_linear(x[i:i + 1], w)[0], whole[i])
        assert np.array_equal(tiled_linear(x[i:], w)[0], whole[i])
    assert np.allclose(whole, x @ w.T, rtol=1e-5, atol=1e-5)


def test_32_requests_together_give_each_the_ids_it_gets_alone(oracle):
    assert isinstance(CpuBatchRunner(oracle.decoder, 4, 64), BatchRunner)
    reqs = requests()
    together = run(engine(oracle), reqs)
    for (prompt, params, m), got in zip(reqs, together):
        ids: list[int] = []
        generate_tokens(oracle, prompt, m, params, lambda t: ids.append(t) or False)
        assert got == ids  # the single-sequence oracle, one request at a time
    # Small budgets cut prompts into other chunks and mix them with decodes differently.
    assert run(engine(oracle, max_running=5, budget=7), reqs) == together


def test_a_prefix_hit_reuses_the_cached_kv_and_changes_no_id(oracle):
    system = list(range(10, 90))  # 80 ids: 5 full blocks
    reqs = [(system + [100 + i, 7], SamplingParams(temperature=0.7, seed=i), 6) for i in range(4)]
    cold = engine(oracle, caching=False)
    ref = run(cold, reqs)
    warm = engine(oracle)
    run(warm, reqs[:1])
    before = warm.metrics.computed_tokens
    assert run(warm, reqs[1:]) == ref[1:]
    assert warm.blocks.hits == 3 * 5
    # each of the three computes 2 new prompt ids + 5 decodes, not 82 + 5
    assert warm.metrics.computed_tokens - before == 3 * (2 + 5)


def test_preemption_by_recompute_changes_no_id(oracle):
    reqs = [([3 + i] * 20, SamplingParams(temperature=0.8, seed=i), 40) for i in range(6)]
    roomy = run(engine(oracle), reqs)
    tight = engine(oracle, num_blocks=12, max_running=6, budget=64)  # 6 x 4 blocks wanted, 12 there
    assert run(tight, reqs) == roomy
    assert tight.scheduler.preemptions > 0


def test_preemption_by_swap_recomputes_nothing_and_changes_no_id(oracle):
    reqs = [([3 + i] * 20, SamplingParams(temperature=0.8, seed=i), 40) for i in range(6)]
    roomy = engine(oracle)
    want = run(roomy, reqs)
    swap = Engine(CpuBatchRunner(oracle.decoder, 12, oracle.max_context, host_blocks=12), SchedulerConfig(6, 64))
    assert run(swap, reqs) == want
    assert swap.scheduler.preemptions > 0 and swap.swap.swapped_out > 0 and swap.swap.num_used == 0
    assert swap.metrics.computed_tokens == roomy.metrics.computed_tokens  # no id computed twice


def test_a_pruned_sequence_swapped_out_keeps_its_cache(oracle):
    # Under sink-window a recompute prunes in other places, so its ids may differ; a swap restores
    # the very cache it had, so every id is the one it gets with room for all.
    policy = KvPolicy("sink-window", budget=40, sinks=4)
    reqs = [Sequence([3 + i] * 20, SamplingParams(temperature=0.8, seed=i), 40, 512, kv=policy) for i in range(6)]
    roomy = engine(oracle)
    for s in reqs:
        roomy.add(s)
    roomy.run_until_done()
    again = [Sequence(s.prompt_ids, s.params, 40, 512, kv=policy) for s in reqs]
    swap = Engine(CpuBatchRunner(oracle.decoder, 10, oracle.max_context, host_blocks=16), SchedulerConfig(6, 64))
    for s in again:
        swap.add(s)
    swap.run_until_done()
    swap.blocks.audit()
    assert swap.swap.swapped_out > 0 and swap.scheduler.preemptions == swap.swap.swapped_out
    assert [s.output_ids for s in again] == [s.output_ids for s in reqs]
    assert swap.blocks.num_used == 0 and swap.swap.num_used == 0


def test_swap_blocks_refuses_a_block_outside_its_pool(oracle):
    r = CpuBatchRunner(oracle.decoder, 4, oracle.max_context, host_blocks=2)
    with pytest.raises(ValueError, match="outside"):
        r.swap_blocks([(0, 2)], [])
    # A bad swap-in is refused before the (valid) swap-out is copied: nothing is half done.
    r._pools[0][0][0] = 7.0
    with pytest.raises(ValueError, match="swap-in pair"):
        r.swap_blocks([(0, 1)], [(1, 9)])
    assert not np.any(r._host[0][0][1] == 7.0)
    # One destination twice is refused too (the GPU runs a direction's copies as one batch, in any order).
    with pytest.raises(ValueError, match="block 1 is the destination of two swap-out pairs"):
        r.swap_blocks([(0, 1), (2, 1)], [])
    assert not np.any(r._host[0][0][1] == 7.0)
    with pytest.raises(ValueError, match="host_blocks"):
        CpuBatchRunner(oracle.decoder, 4, oracle.max_context, host_blocks=-1)


def test_the_kv_memory_sets_the_pool(oracle):
    cfg = oracle.config
    per_block = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 16 * cfg.head_dim * 4
    assert blocks_for_bytes(cfg, 10 * per_block + 5) == 10
    with pytest.raises(ValueError, match="num_blocks"):
        CpuBatchRunner(oracle.decoder, 0, 64)
