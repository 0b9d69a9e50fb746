"""KV pruning (``sink-window``, ``h2o``) on the CUDA batch runner against the CPU backend, the oracle
of the pruning policy. No torch here, so compute-sanitizer runs it quickly.

1. The runners alone, teacher-forced: three sequences of the shipped model through
   ``CudaBatchRunner`` and ``CpuBatchRunner`` with the same rows, pruned to a budget after every
   step with the same kept slots (prompt chunks and decode rows whose RoPE position runs ahead of
   their cache slot, batched and alone). Each logits row's error is held to what the same drive
   without pruning shows (bf16 KV against fp32), and clear greedy picks must agree: a position
   taken for a slot, or a slot compacted wrongly, moves logits by far more. With h2o, each
   sequence's accumulated attention mass (``Rows.scores``, prompt rows included) on CUDA against
   the CPU decoder's, step by step.
2. The engine end to end: ``nrt.LLM`` on CUDA with ``kv_policy="sink-window"`` and a budget small
   enough that it evicts gives the CPU engine's greedy ids, alone and as a batch; with ``h2o`` the
   engine over each backend's batch runner gives the CPU engine's greedy ids and kept slots after
   every step; no KV block or batch buffer is left after close.
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


def _drive(runners, policy, seqs, prompt_lens, tables, chunk=24, scores_err=None):
    """Every sequence's prompt in chunks of ``chunk`` ids, then one id per step, all together (so the
    longest runs its last steps alone), pruning each to ``policy`` after every step on every runner
    alike. Returns, per runner, the logits rows of every step (a list), and the ids evicted.
    h2o: each runner adds into its own scores; the last runner's (the CPU's) pick the kept slots
    for all, and ``scores_err`` (a list) gets each step's largest relative difference."""
    out = [[] for _ in runners]
    done = [0] * len(seqs)
    positions = [np.zeros(0, np.int64) for _ in seqs]  # the position of each filled slot
    h2o = policy.policy == "h2o"
    scores = [[np.zeros(0) for _ in seqs] for _ in runners] if h2o else None
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
            if h2o:
                for per in scores:
                    per[i] = np.concatenate([per[i], np.zeros(n)])
        for k, r in enumerate(runners):
            step = rows if not h2o else [Rows(x.token_ids, x.start, x.table, x.logits, x.position, scores[k][i])
                                         for i, x in zip(who, rows)]
            out[k] += r.run(step)
        if h2o:
            scores_err.append(max(float(np.abs(scores[0][i] - scores[-1][i]).max() / scores[-1][i].max()) for i in who))
        for i, row in zip(who, rows):
            positions[i] = np.concatenate([positions[i], np.arange(done[i], done[i] + len(row.token_ids))])
            done[i] += len(row.token_ids)
            keep = keep_slots(policy, positions[i], scores[-1][i] if h2o else None)
            if len(keep) < len(positions[i]):
                for r in runners:
                    r.compact(tables[i], keep)
                evicted += len(positions[i]) - len(keep)
                positions[i] = positions[i][keep]
                if h2o:
                    for per in scores:
                        per[i] = per[i][keep]
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


def test_h2o_scores_on_cuda_match_the_cpu_runner(gpu_rt):
    """Teacher-forced as above with h2o (the CPU's scores pick the kept slots for both): the CUDA
    runner's accumulated mass, prompt chunks (24 ids: replays of 8 rows) and decode rows, stays
    within 2% of the largest score of the CPU decoder's (bf16 KV and fp32 sums against fp32 and
    float64; a mass added to the wrong slot, or a missing layer or row, is O(1)), and clear
    greedy picks agree."""
    rng = np.random.default_rng(8)
    lens, prompt_lens = [110, 80, 95], [70, 33, 50]
    seqs = [rng.integers(8, 4000, n).tolist() for n in lens]
    base, cuda, cpu = _runners()
    perm = rng.permutation(cuda.num_blocks).tolist()
    tables = [perm[i * 8:(i + 1) * 8] for i in range(len(seqs))]
    try:
        err = []
        (got, ref), evicted = _drive([cuda, cpu], KvPolicy("h2o", budget=40, sinks=4), seqs, prompt_lens, tables,
                                     scores_err=err)
        assert evicted > 0
        assert max(err) < 0.02, err
        diff = np.abs(got - ref).max(axis=-1)
        top2 = np.sort(ref, axis=-1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 2 * diff
        assert (got.argmax(-1) == ref.argmax(-1))[clear].all()
    finally:
        cuda.close()
        base.close()
    assert nrt.memory.stats()["by_tag"].get("batch", 0) == 0


def test_the_engine_on_cuda_keeps_what_the_cpu_engine_keeps_with_h2o(gpu_rt):
    """Both backends' batch runners under the engine, h2o with a budget that evicts from the
    first decode on, three prompts (two of them longer than one step's token budget): the same
    greedy ids and, after every step, the same kept positions (on a mismatch the message names
    the first token event whose kept positions differ)."""
    from nexusrt.reference.sampling import SamplingParams
    from nexusrt.serving import Engine, Sequence
    from nexusrt.serving.scheduler import SchedulerConfig

    rng = np.random.default_rng(9)
    prompts = [rng.integers(8, 4000, n).tolist() for n in (70, 33, 50)]
    base, cuda, cpu = _runners()
    runs = {}
    try:
        for name, runner in (("cpu", cpu), ("cuda", cuda)):
            kept = []

            def on_token(seq, token, kept=kept):  # called after the step's pruning
                kept.append((seq.seq_id, seq.kv_positions.tolist()))
                return False

            engine = Engine(runner, SchedulerConfig(max_running=4, token_budget=40))
            seqs = [Sequence(p, SamplingParams(), 48, 256, on_token=on_token,
                             kv=KvPolicy("h2o", budget=32, sinks=4)) for p in prompts]
            for s in seqs:
                engine.add(s)
            while engine.has_work:
                engine.step()
            assert engine.metrics.kv_evicted > 0 and engine.blocks.num_used == 0
            for s in seqs:
                assert s.error is None and len(s.output_ids) == 48
            first = seqs[0].seq_id
            runs[name] = ([s.output_ids for s in seqs], [(i - first, k) for i, k in kept])
        (ids_cpu, kept_cpu), (ids_cuda, kept_cuda) = runs["cpu"], runs["cuda"]
        bad = next((n for n, (a, b) in enumerate(zip(kept_cpu, kept_cuda)) if a != b), None)
        assert bad is None, f"kept slots differ first at token event {bad}: cpu {kept_cpu[bad]} cuda {kept_cuda[bad]}"
        assert ids_cuda == ids_cpu
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
