"""Tensor parallelism on the CPU: TP=2 and TP=4 against TP=1 on tiny checkpoints of all four
families (8 query / 4 KV heads so both degrees divide them), through both CPU runners."""

from __future__ import annotations

import numpy as np
import pytest

from nexusrt.backends.base import Rows
from nexusrt.backends.cpu.batch import CpuBatchRunner
from nexusrt.backends.cpu.model import CpuRunner
from nexusrt.backends.cpu.sharded import ShardedDecoder
from nexusrt.backends.base import iter_tokens
from nexusrt.models.loader import load_model
from nexusrt.reference.sampling import SamplingParams

from helpers_hf import LLAMA3_ROPE, build_checkpoint, compare_greedy, rel_err

FAMILIES = {  # the shapes tests/helpers_hf.py VARIANTS exercise, with 8 / 4 heads
    "llama": dict(arch="llama", tie=True, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "mistral": dict(arch="mistral", sliding_window=16),  # shorter than the prompt: the window acts
    "qwen2": dict(arch="qwen2"),  # q/k/v biases split with their rows
    "qwen3": dict(arch="qwen3", tie=True, head_dim=32),  # per-head q/k norms, replicated
}
IDS = [3, 17, 250, 9, 44, 101, 7, 7, 300, 12, 64, 128, 5, 77, 200, 31, 2, 90, 11, 150]
# fp32 partial sums of O and down (and the LM head's BLAS blocking) are split differently
TOL = 1e-5


@pytest.fixture(scope="module", params=list(FAMILIES))
def weights(request, tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp(request.param), heads=8, kv_heads=4, seed=11,
                            **FAMILIES[request.param])
    w = load_model(str(path)).weights
    yield w
    w.close()


@pytest.fixture(scope="module")
def reference(weights):
    runner = CpuRunner(weights, 64)
    logits = runner.forward_all(IDS)
    tokens = list(iter_tokens(runner, IDS, 12, SamplingParams()))
    runner.close()
    return logits, tokens


@pytest.mark.parametrize("n", [2, 4])
def test_tp_logits_equal_tp1_up_to_fp32_summation_order(weights, reference, n):
    runner = CpuRunner(weights, 64, decoder=ShardedDecoder(weights, n))
    logits = runner.forward_all(IDS)
    err = rel_err(logits, reference[0])
    print(f"{weights.config.architecture} TP={n}: norm-wise rel err {err:.2e}")
    assert 0 < err < TOL  # nonzero: the ranks really split the sums (a replicated run would be exact)


@pytest.mark.parametrize("n", [2, 4])
def test_tp_greedy_tokens_equal_tp1(weights, reference, n):
    runner = CpuRunner(weights, 64, decoder=ShardedDecoder(weights, n))
    tokens = list(iter_tokens(runner, IDS, 12, SamplingParams()))
    ref_logits = CpuRunner(weights, 64).forward_all(IDS + reference[1][:-1])[len(IDS) - 1:]
    outcome = compare_greedy(tokens, reference[1], ref_logits, tie_tol=1e-4)
    assert "mismatch_at" not in outcome, outcome


def test_tp_batch_runner_matches_the_one_sequence_runner(weights):
    """Two sequences through CpuBatchRunner over a TP=2 decoder, one chunked, give the logits
    the one-sequence TP=2 runner gives each alone (the shared block pool is split per rank)."""
    decoder = ShardedDecoder(weights, 2)
    alone = [CpuRunner(weights, 64, decoder=decoder).forward_all(s)[-1] for s in (IDS[:9], IDS[5:])]
    batch = CpuBatchRunner(decoder, num_blocks=8, max_context=64)
    first = batch.run([Rows(IDS[:9], 0, [0], logits=True), Rows(IDS[5:10], 0, [2, 3])])
    second = batch.run([Rows(IDS[10:], 5, [2, 3], logits=True)])
    assert np.array_equal(first[0], alone[0]) and first[1] is None
    assert np.array_equal(second[0], alone[1])


def test_tp_pools_hold_each_rank_its_kv_heads(weights):
    decoder = ShardedDecoder(weights, 4)
    ks, vs = decoder.new_pools(2)
    layers = weights.config.num_hidden_layers
    assert len(ks) == len(vs) == 4 * layers and ks[0].shape[1] == 1  # 4 KV heads over 4 ranks


@pytest.mark.parametrize("n", [2, 4])
def test_tied_lm_head_is_a_view_of_the_one_embedding_table(weights, reference, n):
    """Tied models: every rank's LM head is its vocab rows of the shared embedding table (no
    second read), untied ones load their own; the logits still equal TP=1's."""
    decoder = ShardedDecoder(weights, n)
    embed = decoder.ranks[0].embed
    vocab = weights.config.vocab_size // n
    for r, d in enumerate(decoder.ranks):
        assert d.embed is embed
        tied = weights.config.tie_word_embeddings
        assert np.shares_memory(d.lm_head, embed) == tied
        if tied:
            assert np.array_equal(d.lm_head, embed[r * vocab:(r + 1) * vocab])
    err = rel_err(CpuRunner(weights, 64, decoder=decoder).forward_all(IDS), reference[0])
    assert 0 < err < TOL


def test_rank_decoder_lm_head_shares_its_embedding(weights):
    """The SPMD rank (a worker process's decoder) takes the same view of its own table."""
    from nexusrt.backends.cpu.sharded import RankDecoder
    from nexusrt.parallel import ShardPlan, shard

    plan = ShardPlan(weights.config, 2)
    for r in range(2):
        d = RankDecoder(shard(weights, plan, r), comm=None, config=weights.config).decoder
        assert np.shares_memory(d.lm_head, d.embed) == weights.config.tie_word_embeddings
