"""KV pruning (``sink-window``) on the CUDA batch runner against the CPU backend, the oracle of the
pruning policy. No torch here, so compute-sanitizer runs it quickly.

1. The runners alone, teacher-forced: three sequences of the shipped model through
   ``CudaBatchRunner`` and ``CpuBatchRunner`` with the same rows, pruned to a budget after every
   step with the same kept slots (prompt chunks and decode rows whose RoPE position runs ahead of
   their cache slot, batched and alone). Each logits row's error is held to what the same drive
   without pruning shows (bf16 KV against fp32), and clear greedy picks must agree: a position
   taken for a slot, or a slot compacted wrongly, moves logits by far more.
2. The engine end to end: ``nrt.LLM`` on CUDA with ``kv_policy="sink-window"`` and a budget small
   enough that it evicts gives the CPU engine's greedy ids, alone and as a batch; h2o is refused
   at submission; no KV block or batch buffer is left after close.
"""

from __future__ import annotations

import numpy as np
import pytest

import nexusrt as nrt
from nexusrt.backends.base import Rows
from nexusrt.kvcache.blocks import blocks_for
from nexusrt.serving import KvPolicy
from nexusrt.serving.pruning import keep_slots

pytestmark = pytest.mark.gpu

MODEL = "nexusrt:stdlib-tiny"


def _runners(max_context=256, num_blocks=64):
    from nexusrt.backends.cpu.batch import CpuBatchRunner
    from nexusrt.backends.cpu.model import CpuRunner
    from nexusrt.backends.cuda.batch import CudaBatchRunner
    from nexusrt.backends.cuda.runner import CudaRunner
    from nexusrt.models.loader import load_model

    model = load_model(MODEL)
    base = CudaRunner(model, nrt.firmware.runtime(), max_context=max_context)
    cuda = CudaBatchRunner(base, num_blocks, max_batch=8, max_chunk=64)  # 3 chunks of 24 ids: two ragged passes
    cpu = CpuBatchRunner(CpuRunner(model.weights, max_context).decoder, num_blocks, max_context)
    return base, cuda, cpu


def _drive(runners, policy, seqs, prompt_lens, tables, chunk=24):
    """Every sequence's prompt in chunks of ``chunk`` ids, then one id per step, all together (so the
    longest runs its last steps alone), pruning each to ``policy`` after every step on every runner
    alike. Returns, per runner, the logits rows of every step (a list), and the ids evicted."""
    out = [[] for _ in runners]
    done = [0] * len(seqs)
    positions = [np.zeros(0, np.int64) for _ in seqs]  # the position of each filled slot
    evicted = 0
    while any(d < len(s) for d, s in zip(done, seqs)):
        rows, who = [], []
        for i, s in enumerate(seqs):
            if done[i] >= len(s):
                continue
            n = min(chunk, prompt_lens[i] - done[i]) if done[i] < prompt_lens[i] else 1
            slots = len(positions[i])
            rows.append(Rows(np.asarray(s[done[i]:done[i] + n], np.int32), slots, tables[i][:blocks_for(slots + n)],
                             logits=True, position=done[i]))
            who.append(i)
        for k, r in enumerate(runners):
            out[k] += r.run(rows)
        for i, row in zip(who, rows):
            positions[i] = np.concatenate([positions[i], np.arange(done[i], done[i] + len(row.token_ids))])
            done[i] += len(row.token_ids)
            keep = keep_slots(policy, positions[i], None)
            if len(keep) < len(positions[i]):
                for r in runners:
                    r.compact(tables[i], keep)
                evicted += len(positions[i]) - len(keep)
                positions[i] = positions[i][keep]
    return [np.stack(o) for o in out], evicted


def test_pruned_steps_on_cuda_match_the_cpu_runner(gpu_rt):
    rng = np.random.default_rng(6)
    lens, prompt_lens = [110, 80, 95], [70, 33, 50]
    seqs = [rng.integers(8, 4000, n).tolist() for n in lens]
    base, cuda, cpu = _runners()
    perm = rng.permutation(cuda.num_blocks).tolist()
    tables = [perm[i * 8:(i + 1) * 8] for i in range(len(seqs))]  # scattered blocks, disjoint
    try:
        worst = {}
        for name, policy in (("full", KvPolicy("sink-window", budget=1000)),
                             ("pruned", KvPolicy("sink-window", budget=40, sinks=4))):
            (got, ref), evicted = _drive([cuda, cpu], policy, seqs, prompt_lens, tables)
            assert (evicted > 0) == (name == "pruned")
            diff = np.abs(got - ref).max(axis=-1)
            scale = np.abs(ref).max(axis=-1)
            worst[name] = float((diff / scale).max())
            top2 = np.sort(ref, axis=-1)[:, -2:]
            clear = (top2[:, 1] - top2[:, 0]) > 2 * diff
            assert (got.argmax(-1) == ref.argmax(-1))[clear].all(), f"{name}: a clear greedy pick differs"
        # bf16 KV against fp32 shows in both; a wrong position or a bad compaction would be O(1).
        assert worst["pruned"] <= max(2 * worst["full"], 0.02), worst
    finally:
        cuda.close()
        base.close()
    assert nrt.memory.stats()["by_tag"].get("batch", 0) == 0


PROMPTS = ["# Copyright 2001 Python Software Foundation\n\"\"\"Utilities for", "def read_config(path):\n",
           "import re\n", "if __name__ == '__main__':\n"]
PRUNE = dict(kv_policy="sink-window", kv_budget=40, kv_sinks=4)


def test_the_engine_on_cuda_prunes_as_the_cpu_engine_does(gpu_rt):
    runs = {}
    for backend in ("cpu", "cuda"):
        llm = nrt.LLM(MODEL, backend=backend, max_context=512, max_batch=4)
        try:
            alone = llm.generate(PROMPTS[0], max_new_tokens=96, temperature=0, **PRUNE)  # a lone pruned decode
            together = llm.generate(PROMPTS, max_new_tokens=96, temperature=0, **PRUNE)  # batched pruned decodes
            runs[backend] = [alone] + together
            if backend == "cuda":
                with pytest.raises(ValueError, match="kv_policy='h2o'"):
                    llm.submit(PROMPTS[1], max_new_tokens=8, kv_policy="h2o", kv_budget=40)
            engine = llm.engine.engine
            assert engine.metrics.kv_evicted > 0
            assert engine.blocks.num_used == 0
            engine.blocks.audit()
        finally:
            llm.close()
    for i, (ref, got) in enumerate(zip(runs["cpu"], runs["cuda"])):
        assert got.kv["tokens_evicted"] == ref.kv["tokens_evicted"], i
        first = next((k for k, (a, b) in enumerate(zip(got.token_ids, ref.token_ids)) if a != b), None)
        assert got.token_ids == ref.token_ids, f"run {i}: first differs at id {first}"
    assert nrt.memory.stats()["by_tag"].get("batch", 0) == 0
