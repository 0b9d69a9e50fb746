"""The serving engine's host tier on the GPU: with ``kv_gpu_budget`` below what the requests
need at once, the engine swaps the sequences it preempts to pinned host memory and back
(``CudaBatchRunner.swap_blocks``), and every request's ids are the ones it gets with room for
all (deterministic mode: a request's ids do not depend on the batch around it), with no
prompt recomputed and nothing left held. The shipped model, no torch: quick under
compute-sanitizer. Bookkeeping and copies on the CPU: ``test_serving_swap``,
``test_cuda_host_swap_cpu``."""

from __future__ import annotations

import numpy as np
import pytest

import nexusrt as nrt
from nexusrt.kvcache.tiers import block_bytes

pytestmark = pytest.mark.gpu


def _generate(budget_blocks: int | None, prompts, **kwargs):
    from nexusrt.models.shipped import DEFAULT_MODEL

    llm = nrt.LLM(DEFAULT_MODEL, backend="cuda", max_context=256, max_batch=16, deterministic=True,
                  kv_gpu_budget=None if budget_blocks is None else budget_blocks * _unit(DEFAULT_MODEL))
    try:
        results = llm.generate(prompts, max_new_tokens=48, **kwargs)
        out = [r.token_ids for r in results]
        engine = llm.engine.engine
        assert sum(r.kv["preemptions"] for r in results) == engine.scheduler.preemptions
        engine.blocks.audit()
        assert engine.blocks.num_used == 0
        swap = engine.swap.counts() if engine.swap is not None else None
        if swap is not None:
            # A CUDA 12.8+ driver: each direction's copies of a step go in one cuMemcpyBatchAsync.
            from nexusrt.memory.copy import copy_batch_supported

            assert (engine.runner.swapper.memcpy_batch is not None) == copy_batch_supported()
            assert swap["host_blocks_used"] == 0
            assert sum(r.kv["preemptions_swapped"] for r in results) == swap["swapped_out"]
        return out, swap, engine.metrics.computed_tokens
    finally:
        llm.close()


def _unit(path) -> int:
    from nexusrt.models.loader import model_config

    cfg = model_config(path)
    return block_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, seed=5)],
                         ids=["greedy", "seeded"])
def test_preempted_requests_swap_to_the_host_and_keep_their_ids(gpu_rt, kwargs):
    rng = np.random.default_rng(4)
    words = ["def", "return", "self", "import", "class", "value", "for", "in", "if", "else"]
    prompts = [" ".join(rng.choice(words, int(n))) for n in rng.integers(20, 120, 16)]
    roomy, none, computed = _generate(None, prompts, **kwargs)
    assert none is None
    # 16 requests of up to ~170 tokens (11 blocks) each, 40 blocks on the device: most are preempted.
    tight, swap, swapped_computed = _generate(40, prompts, **kwargs)
    assert tight == roomy
    assert swap["swapped_out"] > 0 and swap["swapped_in"] == swap["swapped_out"], swap
    assert swap["blocks_swapped_in"] == swap["blocks_swapped_out"] > 0
    assert swapped_computed == computed  # nothing recomputed
    assert not [a for a in nrt.memory.audit() if a.get("tag") == "kv_swap"]
