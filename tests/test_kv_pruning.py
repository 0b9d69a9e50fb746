"""KV pruning (``full``, ``sink-window``, ``h2o``) in the serving engine and the CPU decoder: the
choice of slots, compaction, scores from the attention itself, exactness within budget, blocks
back to the pool, the prefix cache left intact, and bad options refused before any work."""

from __future__ import annotations

import time

import numpy as np
import pytest

import nexusrt as nrt
from conftest import engine_is_empty
from nexusrt.backends.base import Rows
from nexusrt.kvcache.blocks import BLOCK_SIZE, blocks_for, compact_tokens
from nexusrt.serving.pruning import KvPolicy, keep_slots

PROMPT = "import os\nimport sys\n\ndef main(argv):\n    "


def test_sink_window_keeps_the_sinks_and_the_newest():
    pol = KvPolicy("sink-window", budget=10, sinks=4)
    keep = keep_slots(pol, np.arange(100, 130), None)
    assert list(keep) == [0, 1, 2, 3] + list(range(24, 30))
    assert list(keep_slots(pol, np.arange(10), None)) == list(range(10))  # within budget: all


def test_h2o_keeps_sinks_window_and_heaviest_scores():
    pol = KvPolicy("h2o", budget=8, sinks=2, window=2)
    scores = np.zeros(20)
    scores[[5, 9, 11, 12]] = [3.0, 9.0, 1.0, 5.0]
    keep = keep_slots(pol, np.arange(20), scores)
    assert list(keep) == [0, 1, 5, 9, 11, 12, 18, 19]
    protected = KvPolicy("h2o", budget=8, sinks=2, window=2, protect=((6, 8),))
    assert list(keep_slots(protected, np.arange(20), scores)) == [0, 1, 6, 7, 9, 12, 18, 19]


def test_protected_tokens_that_overfill_the_budget_squeeze_the_rest():
    pol = KvPolicy("sink-window", budget=6, sinks=1, protect=((0, 5),))
    keep = keep_slots(pol, np.arange(12), None)
    assert list(keep) == [0, 1, 2, 3, 4, 11]


@pytest.mark.parametrize("kw, match", [
    (dict(policy="lru", budget=8), "kv_policy must be one of"),
    (dict(policy="h2o", budget=-1), "kv_budget must be an integer >= 0"),
    (dict(policy="h2o", budget=4, sinks=4), r"kv_budget \(4\) must exceed kv_sinks \(4\)"),
    (dict(policy="h2o", budget=8, sinks=4, window=6), "exceed kv_budget"),
    (dict(policy="sink-window"), "needs kv_budget"),
])
def test_bad_policies_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        KvPolicy(**kw)


def test_compaction_moves_kept_slots_to_the_front():
    pool = np.arange(4 * 1 * BLOCK_SIZE * 2, dtype=np.float32).reshape(4, 1, BLOCK_SIZE, 2)
    table = [2, 0, 3]
    before = pool[[2, 0, 3]].transpose(1, 0, 2, 3).reshape(1, -1, 2)[0]  # slot -> value
    keep = [0, 1, 17, 18, 40]
    compact_tokens(pool, table, keep)
    after = pool[[2, 0, 3]].transpose(1, 0, 2, 3).reshape(1, -1, 2)[0]
    assert np.array_equal(after[:5], before[keep])


def test_the_attention_mass_is_the_softmax_the_decoder_computed(tiny_llm):
    runner = tiny_llm.engine.engine.runner
    cfg = runner.config
    ids = np.asarray(tiny_llm.tokenizer.encode(PROMPT), np.int32)
    scores = np.zeros(len(ids))
    runner.run([Rows(ids, 0, [0, 1, 2], True, scores=scores)])
    # every row's softmax sums to 1 per head: rows x heads x layers in all; the first key sees every row
    assert scores.sum() == pytest.approx(len(ids) * cfg.num_attention_heads * cfg.num_hidden_layers)
    assert scores[0] == scores.max() and np.all(scores > 0)


@pytest.mark.parametrize("policy", ["sink-window", "h2o"])
def test_a_budget_that_holds_the_context_is_exactly_full(tiny_llm, policy):
    full = tiny_llm.generate(PROMPT, max_new_tokens=24, temperature=0)
    pruned = tiny_llm.generate(PROMPT, max_new_tokens=24, temperature=0, kv_policy=policy, kv_budget=256)
    assert pruned.token_ids == full.token_ids
    assert pruned.kv["tokens_evicted"] == 0 and pruned.kv["policy"] == policy
    assert full.kv["policy"] == "full" and full.kv["tokens_evicted"] == 0
    assert engine_is_empty(tiny_llm)


@pytest.mark.parametrize("policy", ["sink-window", "h2o"])
def test_pruning_evicts_to_the_budget_and_returns_blocks(tiny_llm, policy):
    r = tiny_llm.generate(PROMPT, max_new_tokens=80, temperature=0, kv_policy=policy, kv_budget=40, kv_sinks=4)
    n = r.prompt_tokens + len(r.token_ids) - 1
    assert r.kv["tokens_kept"] == 40 and r.kv["tokens_evicted"] == n - 40
    assert r.kv["blocks_used"] <= blocks_for(41) < blocks_for(n)
    assert r.kv["pages_host"] == 0 and r.kv["blocks_host"] == 0 and r.kv["host_tier"].startswith("off:")
    assert tiny_llm.engine.engine.metrics.kv_evicted == n - 40
    assert engine_is_empty(tiny_llm)


def test_pruned_requests_leave_the_prefix_cache_intact(tiny_llm):
    system = "You are a careful assistant for Python's standard library; you answer with code. " * 3
    ctx = nrt.Context(system=system, working="Read a gzip file line by line.")
    ref = tiny_llm.generate([ctx], max_new_tokens=12, temperature=0)[0]
    tiny_llm.engine.engine.blocks.clear_cache()
    blocks = tiny_llm.engine.engine.blocks
    pruned = tiny_llm.generate(ctx, max_new_tokens=60, temperature=0, kv_policy="h2o", kv_budget=48,
                           kv_protect=["system"])
    assert pruned.kv["tokens_evicted"] > 0 and pruned.kv["protected_tokens"] >= 32
    hits = blocks.hits
    again = tiny_llm.generate([ctx], max_new_tokens=12, temperature=0)[0]
    assert blocks.hits > hits  # the protected system blocks were shared
    assert again.token_ids == ref.token_ids  # and were not overwritten by compaction
    assert engine_is_empty(tiny_llm)


def test_a_cancelled_pruned_request_frees_everything(tiny_llm):
    req = tiny_llm.submit(PROMPT, max_new_tokens=300, temperature=0, kv_policy="sink-window", kv_budget=24)
    deadline = time.monotonic() + 30
    while tiny_llm.engine.engine.metrics.kv_evicted == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert tiny_llm.engine.engine.metrics.kv_evicted > 0 and not req.ended.is_set()
    req.cancel()
    with pytest.raises(Exception, match="cancelled"):
        req.result(timeout=30)
    assert engine_is_empty(tiny_llm)


@pytest.mark.parametrize("kw, err, match", [
    (dict(kv_policy="h2o", kv_budget=3), ValueError, r"must exceed kv_sinks"),
    (dict(kv_policy="h2o", kv_budget=-5), ValueError, "kv_budget must be an integer >= 0"),
    (dict(kv_policy="lru", kv_budget=8), ValueError, "kv_policy must be one of"),
    (dict(kv_policy="h2o", kv_budget=64, kv_protect=["system"]), ValueError, "must be an nrt.Context"),
    (dict(kv_budget_tokens=64), TypeError, "unexpected keyword argument 'kv_budget_tokens'"),
    (dict(kv_policy=False), ValueError, "kv_policy must be one of .*got False"),  # not taken as "full"
    (dict(kv_budget=8), ValueError, "kv_budget applies to a pruning policy, and kv_policy is 'full'"),  # was ignored
    (dict(kv_policy="full", kv_window=4), ValueError, "kv_window applies to a pruning policy"),
    (dict(kv_policy="h2o", kv_budget=64, kv_protect=5), TypeError, "kv_protect must be a context layer's name"),
    (dict(kv_policy="h2o", kv_budget=64, kv_protect={"system": 1}), TypeError, "kv_protect must be"),
])
def test_bad_kv_options_fail_before_any_work(tiny_llm, kw, err, match):
    with pytest.raises(err, match=match):
        tiny_llm.generate(PROMPT, **kw)
    with pytest.raises(ValueError, match="unknown context layer 'scratch'"):
        tiny_llm.generate(nrt.Context(working="x"), kv_policy="h2o", kv_budget=64, kv_protect=["scratch"])
    assert tiny_llm._loop is None  # nothing reached the engine
