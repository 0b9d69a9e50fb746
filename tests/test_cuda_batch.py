"""The CUDA batch runner (the serving engine's step on the GPU) against HF transformers.

Several sequences share one KV pool through shuffled block tables; each step mixes prompt
chunks (prefill graphs) with single-id rows (the batched decode graph, padded to a bucket).
Every logits row a sequence gets is checked against HF fp32 teacher-forced logits of that
sequence with the rule of ``test_cuda_model``: our bf16 error at most 1.5x HF's own bf16
error, greedy picks equal but for reported ties. Both prompt paths: ragged (a step's chunks
through each GEMM together; with ``max_chunk=64`` a step's chunks need several passes) and
per-sequence (each chunk alone through the prefill graphs). Then the engine end to end: batch
invariance in deterministic mode (greedy and seeded sampling, alone vs among 31 others),
and no KV block leaked after cancellations. Last, ``run_tokens``' picks (the batched sampler
on the device) against the reference sampling rule on each step's own logits rows.
"""

from __future__ import annotations

import numpy as np
import pytest

import nexusrt as nrt
from nexusrt.backends.base import Rows
from nexusrt.kvcache.blocks import blocks_for
from tests.test_cuda_model import _check_against_hf, _checkpoint, _hf_refs

pytestmark = pytest.mark.gpu


# prompt path -> (CudaBatchRunner's ragged_prefill, max_chunk)
PREFILL = {"ragged": (True, 256), "ragged-passes": (True, 64), "per-sequence": (False, 256)}


def _runner(path, max_context=256, max_batch=8, deterministic=False, num_blocks=200, prefill="ragged"):
    from nexusrt.backends.cuda.batch import CudaBatchRunner
    from nexusrt.backends.cuda.runner import CudaRunner
    from nexusrt.models.loader import load_model

    model = load_model(path)
    base = CudaRunner(model, nrt.firmware.runtime(), max_context=max_context)
    ragged, max_chunk = PREFILL[prefill]
    return base, CudaBatchRunner(base, num_blocks, max_batch, max_chunk=max_chunk, deterministic=deterministic,
                                 ragged_prefill=ragged)


def _drive(batch, seqs, prompt_lens, tables):
    """Prompts as chunks (of up to 40 ids, some of 1), then one id per step, all sequences together;
    returns each sequence's logits rows from its prompt's last id on."""
    got = [[] for _ in seqs]
    done = [0] * len(seqs)
    while any(d < len(s) for d, s in zip(done, seqs)):
        rows, who = [], []
        for i, s in enumerate(seqs):
            if done[i] >= len(s):
                continue
            n = 1 if done[i] >= prompt_lens[i] else min(prompt_lens[i] - done[i], 40 if i % 2 else 1 + done[i] % 23)
            end = done[i] + n
            rows.append(Rows(np.asarray(s[done[i]:end], np.int32), done[i], tables[i][:blocks_for(end)],
                             logits=end >= prompt_lens[i]))
            who.append(i)
            done[i] = end
        for i, out in zip(who, batch.run(rows)):
            if out is not None:
                got[i].append(out)
    return [np.stack(g) for g in got]


@pytest.mark.parametrize("prefill", list(PREFILL))
@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_batched_steps_match_hf(variant, deterministic, prefill, gpu_rt, tmp_path_factory):
    path = _checkpoint(variant, tmp_path_factory)
    rng = np.random.default_rng(11)
    lens = [40, 17, 63, 5, 33]
    prompt_lens = [24, 9, 50, 1, 16]
    seqs = [rng.integers(0, 300, n).tolist() for n in lens]
    base, batch = _runner(path, deterministic=deterministic, prefill=prefill)
    assert (batch.ragged is not None) == PREFILL[prefill][0]
    perm = rng.permutation(batch.num_blocks).tolist()
    tables = [perm[i * 8:(i + 1) * 8] for i in range(len(seqs))]  # scattered blocks, disjoint
    try:
        got = _drive(batch, seqs, prompt_lens, tables)
    finally:
        batch.close()
        base.close()
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        ref, hf_bf16 = _hf_refs(path, s)
        _check_against_hf(got[i], ref[p - 1:], hf_bf16[p - 1:], f"{variant} seq{i} det={deterministic} {prefill}")
    assert nrt.memory.stats()["by_tag"].get("batch", 0) == 0  # the batch runner freed its buffers


def test_engine_is_batch_invariant_in_deterministic_mode(gpu_rt, tmp_path_factory):
    """A request's greedy ids and seeded samples are the same alone and among 31 others."""
    path = _checkpoint("qwen2", tmp_path_factory)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 300, int(n)).tolist() for n in rng.integers(1, 90, 32)]
    llm = nrt.LLM(str(path), backend="cuda", max_context=256, max_batch=32, deterministic=True)
    try:
        tok = llm.tokenizer
        texts = [tok.decode(p) for p in prompts]
        for kwargs in (dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, seed=7)):
            alone = llm.generate(texts[0], max_new_tokens=40, **kwargs)
            together = llm.generate(texts, max_new_tokens=40, **kwargs)
            assert together[0].token_ids == alone.token_ids, kwargs
            again = llm.generate(texts[5], max_new_tokens=40, **kwargs)
            assert together[5].token_ids == again.token_ids, kwargs
        assert llm.engine.engine.blocks.num_used == 0
        llm.engine.engine.blocks.audit()
    finally:
        llm.close()
    assert nrt.memory.stats()["by_tag"].get("batch", 0) == 0


def test_engine_cancellations_free_every_block(gpu_rt, tmp_path_factory):
    path = _checkpoint("llama", tmp_path_factory)
    llm = nrt.LLM(str(path), backend="cuda", max_context=256, max_batch=8)
    try:
        reqs = [llm.submit("hello " * (3 + i), max_new_tokens=200) for i in range(12)]
        for r in reqs[::2]:
            r.cancel()
        for r in reqs[1::2]:
            assert len(r.result(timeout=120).token_ids) > 0
        for r in reqs[::2]:
            r.ended.wait(60)
        engine = llm.engine.engine
        assert engine.blocks.num_used == 0
        engine.blocks.audit()
    finally:
        llm.close()


@pytest.mark.parametrize("prefill", list(PREFILL))
@pytest.mark.parametrize("deterministic", [False, True])
def test_batch_runner_agrees_with_the_one_sequence_runner_on_the_shipped_model(deterministic, prefill, gpu_rt):
    """No torch here (so compute-sanitizer runs it quickly): the batched steps of three sequences
    against the one-sequence runner's teacher-forced logits of each, on the trained model."""
    from nexusrt.models.shipped import DEFAULT_MODEL as path

    rng = np.random.default_rng(4)
    lens, prompt_lens = [70, 33, 50], [60, 1, 20]
    seqs = [rng.integers(8, 4000, n).tolist() for n in lens]
    base, batch = _runner(path, deterministic=deterministic, prefill=prefill)
    perm = rng.permutation(batch.num_blocks).tolist()
    tables = [perm[i * 8:(i + 1) * 8] for i in range(len(seqs))]
    try:
        got = _drive(batch, seqs, prompt_lens, tables)
        for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
            ref = base.forward_all(np.asarray(s, np.int32))[p - 1:]
            diff = np.abs(got[i] - ref).max(axis=-1)
            scale = np.abs(ref).max(axis=-1)
            assert (diff <= 0.05 * scale).all(), f"seq {i}: worst logit difference {diff.max():.3f}"
            top2 = np.sort(ref, axis=-1)[:, -2:]
            clear = (top2[:, 1] - top2[:, 0]) > 2 * diff
            assert (got[i].argmax(-1) == ref.argmax(-1))[clear].all(), f"seq {i}: a clear greedy pick differs"
    finally:
        batch.close()
        base.close()


@pytest.mark.parametrize("deterministic", [False, True])
def test_run_tokens_samples_every_row_by_the_reference_rule(deterministic, gpu_rt):
    """The batched sampler on the device, as the engine drives it: each step mixes prompt chunks and
    single ids, greedy and seeded sampling rows of different temperature/top_k/top_p/seed/step (and a
    lone decode), and every pick equals ``reference.sampling.sample`` (the CPU engine's rule,
    ``base.sample_rows``) on the very logits row the step left on the device."""
    from nexusrt.backends.base import sample_rows
    from nexusrt.models.shipped import DEFAULT_MODEL as path
    from nexusrt.reference.sampling import SamplingParams

    rng = np.random.default_rng(8)
    lens, prompt_lens = [60, 33, 50, 41, 40], [30, 1, 20, 9, 20]
    seqs = [rng.integers(8, 4000, n).tolist() for n in lens]
    params = [None, SamplingParams(temperature=0.8, top_p=0.9, seed=7),
              SamplingParams(temperature=1.0, top_k=20, seed=2**64 - 1), SamplingParams(temperature=0.3, seed=0),
              SamplingParams(temperature=1.5, top_k=1024, top_p=0.5, seed=123)]
    base, batch = _runner(path, deterministic=deterministic)
    perm = rng.permutation(batch.num_blocks).tolist()
    tables = [perm[i * 8:(i + 1) * 8] for i in range(len(seqs))]
    done, checked = [0] * len(seqs), 0
    try:
        while any(d < len(s) for d, s in zip(done, seqs)):
            rows = []
            for i, s in enumerate(seqs):
                # the last sequence decodes alone at the end: the lone-decode path
                if done[i] >= len(s) or (i == 4 and any(done[j] < len(seqs[j]) for j in range(4))):
                    continue
                n = 1 if done[i] >= prompt_lens[i] else min(prompt_lens[i] - done[i], 1 + done[i] % 23)
                end = done[i] + n
                rows.append(Rows(np.asarray(s[done[i]:end], np.int32), done[i], tables[i][:blocks_for(end)],
                                 logits=end >= prompt_lens[i], params=params[i], step=end * 37 + i))
                done[i] = end
            picks = batch.run_tokens(rows)
            singles = [k for k, r in enumerate(rows) if len(r.token_ids) == 1]
            chunks = [k for k, r in enumerate(rows) if len(r.token_ids) > 1]
            where = {k: j for j, k in enumerate(singles)} | {k: batch.bb.bmax + j for j, k in enumerate(chunks)}
            logits = [batch.bb.logits[where[k]:where[k] + 1].to_numpy().reshape(-1) if r.logits else None
                      for k, r in enumerate(rows)]
            assert picks == sample_rows(rows, logits), [(r.params, r.step) for r in rows]
            checked += sum(p is not None for p in picks)
    finally:
        batch.close()
        base.close()
    assert checked == sum(n - p + 1 for n, p in zip(lens, prompt_lens))  # every pick was checked
