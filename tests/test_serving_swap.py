"""The serving engine's host tier: preemption by swap (the victim's blocks copied to host
blocks and back, nothing recomputed), its fall-back to recompute, failures and cancels.

The fake runner's "KV" is the ids themselves, and it wipes a device block a swap-out copied
(without the prefix cache, where no block is shared):
a swap-in that restored the wrong block, or a sequence that read its old blocks after they
were given back, gives different ids."""

from __future__ import annotations

import pytest

from nexusrt.reference.sampling import SamplingParams
from nexusrt.serving import Engine, SchedulerConfig, Sequence, State
from nexusrt.serving.swap import HostSwap
from serving_fakes import FakeRunner

GREEDY = SamplingParams()


def make(num_blocks=10, host_blocks=0, max_running=4, budget=64, caching=False, **kw):
    kw.setdefault("wipe_swapped", not caching)
    return Engine(FakeRunner(num_blocks, host_blocks=host_blocks, **kw), SchedulerConfig(max_running, budget),
                  prefix_caching=caching)


def four(**kw):
    # Four sequences that each grow from 1 block to 3 over 10 device blocks: they cannot all keep running.
    return [Sequence(list(range(100 * i + 1, 100 * i + 15)), GREEDY, 30, 4096, **kw) for i in range(4)]


def until_swapped():
    """An engine with a host tier, stepped over :func:`four` until one of them is swapped out."""
    e, seqs = make(host_blocks=12), four()
    for s in seqs:
        e.add(s)
    while not any(s.host_table for s in seqs):
        e.step()
    return e, seqs


def run(e, seqs):
    for s in seqs:
        e.add(s)
    e.run_until_done()
    e.blocks.audit()
    assert e.blocks.num_used == 0 and not e.has_work
    if e.swap is not None:
        assert e.swap.num_used == 0, "a host block leaked"
    return [s.output_ids for s in seqs]


def test_preemption_by_swap_recomputes_nothing_and_gives_the_same_ids():
    roomy = make(num_blocks=64)
    want = run(roomy, four())
    recompute = make()
    assert run(recompute, four()) == want and recompute.scheduler.preemptions > 0
    swap = make(host_blocks=12)
    seqs = four()
    assert run(swap, seqs) == want
    assert swap.scheduler.preemptions > 0 and swap.swap.swapped_out == swap.scheduler.preemptions
    assert swap.swap.swapped_in == swap.swap.swapped_out and sum(s.swaps for s in seqs) == swap.swap.swapped_out
    # Nothing is computed twice: the swapped engine computes what the roomy one does; recompute more.
    assert swap.metrics.computed_tokens == roomy.metrics.computed_tokens < recompute.metrics.computed_tokens
    outs = [o for o, _ in swap.runner.swaps]
    ins = [i for _, i in swap.runner.swaps]
    assert sum(map(len, outs)) == swap.swap.blocks_out == sum(map(len, ins)) == swap.swap.blocks_in > 0


def test_a_host_tier_too_small_for_the_victim_falls_back_to_recompute():
    longer = lambda: [Sequence(list(range(100 * i + 1, 100 * i + 41)), GREEDY, 40, 4096) for i in range(4)]
    e = make(num_blocks=12, host_blocks=2)  # a victim past its prompt holds at least 3 filled blocks
    want = run(make(num_blocks=64), longer())
    assert run(e, longer()) == want
    assert e.swap.swapped_out < e.scheduler.preemptions  # some victims did not fit: recomputed


def test_the_copies_of_a_step_run_outs_first_and_name_each_block_once():
    e = make(host_blocks=12)
    for s in four():
        e.add(s)
    while e.has_work:
        e.step()
        for outs, ins in e.runner.swaps:
            assert len({h for _, h in outs}) == len(outs) and len({d for d, _ in outs}) == len(outs)
            assert len({d for _, d in ins}) == len(ins)
    assert e.runner.swaps


def test_a_failed_swap_ends_the_swapped_in_and_recomputes_the_swapped_out():
    e = make(host_blocks=12, fail_swap=2)
    seqs = four()
    want = run(make(num_blocks=64), four())
    run(e, seqs)
    failed_outs, failed_ins = e.runner.swaps[1]
    assert failed_outs or failed_ins
    errors = [s for s in seqs if s.finish_reason == "error"]
    assert len(errors) == bool(failed_ins) * len(errors)  # only swap-ins of that step end
    for s, ids in zip(seqs, want):
        if s.finish_reason != "error":
            assert s.output_ids == ids  # a swapped-out victim recomputed: same ids
    assert all(not s.host_table for s in seqs)


def test_cancelling_a_swapped_out_sequence_frees_its_host_blocks():
    e, seqs = until_swapped()
    victim = next(s for s in seqs if s.host_table)
    assert victim.state is State.WAITING and e.swap.num_used == len(victim.host_table)
    e.cancel(victim)
    assert not victim.host_table and e.swap.num_used == 0
    e.run_until_done()
    e.blocks.audit()
    assert e.blocks.num_used == 0 and e.swap.num_used == 0


def test_swap_with_the_prefix_cache_on_gives_the_same_ids():
    shared = list(range(500, 532))  # two full blocks every request shares
    reqs = lambda: [Sequence(shared + [600 + i, 601 + i], GREEDY, 40, 4096) for i in range(4)]
    want = run(make(num_blocks=64, caching=True), reqs())
    e = make(num_blocks=12, host_blocks=16, caching=True)
    assert run(e, reqs()) == want and e.swap.swapped_out > 0
    # The shared blocks a swapped-in request still finds in the cache are taken, not copied back.
    assert e.swap.blocks_reused > 0 and e.swap.blocks_in + e.swap.blocks_reused == e.swap.blocks_out
    assert sum(len(i) for _, i in e.runner.swaps) == e.swap.blocks_in


def test_host_swap_bookkeeping_refuses_double_frees():
    h = HostSwap(4)
    s = Sequence([1, 2, 3], GREEDY, 4, 64)
    s.block_table, s.num_computed = [7], 3
    assert h.fits(s)
    h.out(s)
    assert h.num_used == 1 and h.take()[0] == [(7, s.host_table[0])]
    h.drop(s)
    h.drop(s)  # nothing left: harmless
    assert h.num_used == 0
    with pytest.raises(ValueError):
        h.pool.free([0])


def test_engine_tiers_cap_the_device_pool_and_size_the_host_tier():
    from types import SimpleNamespace

    from nexusrt.engine.requests import engine_tiers
    from nexusrt.kvcache.tiers import KvBudgetError

    cfg = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=1, head_dim=8)
    unit = 2 * 2 * 1 * 16 * 8 * 2  # layers x K/V x heads x block x head_dim x bf16
    # 4 sequences of 64 tokens: 16 blocks. No budget: no host tier, the pool as asked.
    assert engine_tiers(cfg, 4, 64, None, None) == (16, 0)
    assert engine_tiers(cfg, 4, 64, 5 * unit, None) == (5, 0)
    # A budget caps the pool; the host tier holds the rest of the demand, at most half of what is available.
    assert engine_tiers(cfg, 4, 64, None, 6 * unit + 1, available=1 << 40) == (6, 10)
    assert engine_tiers(cfg, 4, 64, 3 * unit, 6 * unit, available=1 << 40) == (3, 13)
    assert engine_tiers(cfg, 4, 64, None, 6 * unit, available=8 * unit) == (6, 4)
    assert engine_tiers(cfg, 4, 64, None, 99 * unit, available=1 << 40) == (16, 0)
    with pytest.raises(KvBudgetError, match="holds no KV block"):
        engine_tiers(cfg, 4, 64, None, unit - 1)


def test_the_host_tier_gauges_render_for_prometheus():
    from nexusrt.serving.metrics import EngineMetrics, render, swap_gauges

    assert swap_gauges(None) == {}
    e, seqs = until_swapped()
    text = render(EngineMetrics(), swap_gauges(e.swap))
    used = sum(len(s.host_table) for s in seqs)
    assert f"nexusrt_kv_host_blocks_used {used}\n" in text and "nexusrt_kv_host_blocks_total 12\n" in text
    assert "# TYPE nexusrt_swapped_out_total counter" in text and "nexusrt_swapped_out_total 1\n" in text


def test_make_loop_gives_the_cuda_engine_the_host_tier_of_its_budget(monkeypatch):
    from types import SimpleNamespace

    from nexusrt.backends.cuda import batch
    from nexusrt.engine.requests import make_loop

    made = []

    def fake(base, num_blocks, max_batch, **kw):
        made.append((num_blocks, kw["host_blocks"]))
        return FakeRunner(num_blocks, host_blocks=kw["host_blocks"])

    monkeypatch.setattr(batch, "CudaBatchRunner", fake)
    cfg = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=1, head_dim=8)
    unit = 2 * 2 * 16 * 8 * 2
    runner = SimpleNamespace(config=cfg, max_context=64)
    loops = [make_loop(runner, "cuda", 4, None, 16, kv_gpu_budget=6 * unit), make_loop(runner, "cuda", 4, None, 16)]
    try:
        assert made == [(6, 10), (16, 0)]
        assert loops[0].engine.swap.num_blocks == 10 and loops[1].engine.swap is None
    finally:
        for loop in loops:
            loop.stop()


def test_a_results_kv_report_counts_its_preemptions(cpu_rt):
    import nexusrt as nrt
    from nexusrt.models.shipped import DEFAULT_MODEL

    from nexusrt.models.loader import model_config

    cfg = model_config(DEFAULT_MODEL)
    fp32_block = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 16 * cfg.head_dim * 4
    # 12 blocks of KV for four requests that each grow to ~8 blocks.
    llm = nrt.LLM(DEFAULT_MODEL, backend="cpu", max_context=512, max_batch=4, kv_memory=12 * fp32_block)
    try:
        prompts = [f"def f{i}(x):\n    return x * {i} + " + "1 + " * 20 for i in range(4)]
        results = llm.generate(prompts, max_new_tokens=60, temperature=0.0)
        kv = [r.kv for r in results]
        assert sum(k["preemptions"] for k in kv) == llm.engine.engine.scheduler.preemptions > 0
        assert all(k["preemptions_swapped"] == 0 for k in kv)  # the CPU engine has no host tier
        single = llm.generate(prompts[0], max_new_tokens=4)
        assert single.kv["preemptions"] == single.kv["preemptions_swapped"] == 0
    finally:
        llm.close()


def test_engine_tiers_refuse_a_kv_memory_below_one_block():
    from types import SimpleNamespace

    from nexusrt.engine.requests import engine_tiers

    cfg = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="kv_memory=100 bytes holds no KV block"):
        engine_tiers(cfg, 4, 64, 100, None)
