"""The persistent decode kernel against the graph path on the GPU (sm_90): the same runner, the
same synthetic weights, NEXUSRT_DECODE=graph vs persistent. Teacher-forced logits after every
decode step agree within a tight tolerance (the two paths differ only in fp32 summation order
and attention split points), and greedy and seeded sampled generation (temperature, top-k,
top-p) give the same ids, for several steps in a row across KV-block boundaries (16 tokens per
block), on llama (tied, Llama-3 RoPE scaling), qwen2 (QKV bias), qwen3 (q/k norm, head_dim
128) and mistral (untied, 4 query heads per KV head). The kernel's fault record stays empty and
its epoch counts the steps it ran."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from nexusrt.backends.cuda import persistent as P
from nexusrt.models.presets import preset

pytestmark = pytest.mark.gpu

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             vocab_size=384, num_hidden_layers=2)
VARIANTS = {
    "llama": dict(tie_word_embeddings=True, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2_bias": dict(architecture="Qwen2ForCausalLM", attention_bias=True),
    "qwen3_norms_d128": dict(architecture="Qwen3ForCausalLM", qk_norm=True, head_dim=128, tie_word_embeddings=True),
    # The fourth family, untied, and four query heads per KV head (the GM = 4 kernels; the rest run GM = 2).
    "mistral_g4": dict(architecture="MistralForCausalLM", hidden_size=512, num_attention_heads=8,
                       num_key_value_heads=2, tie_word_embeddings=False),
}
# A vocabulary above K_MAX = 1024: the sampled steps' grid-wide top-K has a real cut (at 384 every
# logit is a candidate), so the pool path is what the sampled test checks there.
WIDE_VOCAB = {"llama_v5000": dict(VARIANTS["llama"], vocab_size=5000)}
# Weights large enough that every SM streams several times its weight ring's pages in a step
# (~68 MB over 132 SMs: ~125 pages an SM against ~40 slots), with rows of half a page
# (K = 1,024: 2 KB) and of two pages, the second short (K = 4,000: 8,000 bytes).
RING = {"llama_ring": dict(VARIANTS["llama"], hidden_size=1024, intermediate_size=4000, num_attention_heads=16,
                           num_key_value_heads=4, vocab_size=5000, tie_word_embeddings=False)}
PROMPT = (np.arange(13, dtype=np.int32) * 29 + 5) % 384  # 13 tokens: decoding crosses 16, 32, 48
STEPS = 40
RTOL = 2e-3  # of the largest |logit|; bf16 weights/KV put the paths' common error near 1e-2


def _model(variant):
    from nexusrt.models.loader import LoadedModel
    from nexusrt.models.synthetic import SyntheticWeights
    from nexusrt.models.tokenizer import ByteTokenizer

    cfg = dataclasses.replace(preset("tiny"), **{**SHAPE, **{**VARIANTS, **WIDE_VOCAB, **RING}[variant]})
    return LoadedModel(f"synthetic:{variant}", cfg, SyntheticWeights(cfg, seed=3), ByteTokenizer())


def _runners(variant, rt, monkeypatch):
    from nexusrt.backends.cuda.runner import CudaRunner

    model = _model(variant)
    monkeypatch.delenv(P.ENV, raising=False)
    graph = CudaRunner(model, rt, max_context=128)
    monkeypatch.setenv(P.ENV, "persistent")
    try:
        pers = CudaRunner(model, rt, max_context=128)
    except BaseException:
        graph.close()
        raise
    assert graph._persistent is None and pers._persistent is not None
    return graph, pers


def _fault(runner):
    return runner._persistent.fault_record() if runner._persistent is not None else None


@pytest.mark.parametrize("variant", VARIANTS)
def test_teacher_forced_logits_equal_the_graph_path(variant, gpu_rt, monkeypatch):
    graph, pers = _runners(variant, gpu_rt, monkeypatch)
    try:
        forced = (np.arange(STEPS) * 37 + 11) % 384
        for r in (graph, pers):
            r.reset()
            r.prefill(PROMPT)
        first = graph.last_logits()  # the prefill is the graph path's in both (cuBLASLt plans tuned per runner)
        assert np.abs(pers.last_logits() - first).max() <= RTOL * np.abs(first).max()
        for step, tok in enumerate(forced):
            graph.decode(int(tok))
            pers.decode(int(tok))
            want, got = graph.last_logits(), pers.last_logits()
            assert np.all(np.isfinite(got)), (step, _fault(pers))
            err = np.abs(got - want).max()
            assert err <= RTOL * np.abs(want).max(), f"step {step} (position {len(PROMPT) + step}): max error {err}"
            top2 = np.sort(want)[-2:]
            if top2[1] - top2[0] > 2 * err:
                assert int(np.argmax(got)) == int(np.argmax(want)), f"step {step}"
        _, _, _, epoch = pers._persistent.program(False)
        assert int(epoch.to_numpy()[0]) == STEPS and int(epoch.to_numpy()[1]) == 0
        assert _fault(pers) is None
    finally:
        graph.close()
        pers.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_generation_equals_the_graph_path(variant, gpu_rt, monkeypatch):
    from nexusrt.reference.sampling import SamplingParams

    graph, pers = _runners(variant, gpu_rt, monkeypatch)
    try:
        ids = {}
        for name, r in (("graph", graph), ("persistent", pers)):
            for run in range(2):  # twice: the counters carry on from the first run without a reset
                out = []
                n = r.generate_tokens(PROMPT, STEPS, SamplingParams(temperature=0.0), lambda t: out.append(t) and False)
                assert n == STEPS
                ids.setdefault(name, []).append(out)
        assert ids["graph"][0] == ids["graph"][1]
        assert ids["persistent"][0] == ids["persistent"][1] == ids["graph"][0], _fault(pers)
        _, _, _, epoch = pers._persistent.program(True)
        assert int(epoch.to_numpy()[0]) == 2 * (STEPS - 1)  # the first token of each run is the prefill's
    finally:
        graph.close()
        pers.close()


SAMPLED = {"t0.7_p0.9": dict(temperature=0.7, top_p=0.9), "t0.8_k20": dict(temperature=0.8, top_k=20),
           "t1.2_k5_p0.8": dict(temperature=1.2, top_k=5, top_p=0.8)}


@pytest.mark.parametrize("sampling", SAMPLED)
@pytest.mark.parametrize("variant", [*VARIANTS, *WIDE_VOCAB])
def test_seeded_sampled_generation_equals_the_graph_path(variant, sampling, gpu_rt, monkeypatch):
    """Temperature / top-k / top-p with a seed: the persistent kernel's grid-wide top-K ends in the
    graph path's sort and draw on the same candidates at the same step, so the ids agree token for
    token (llama_v5000: a vocabulary above K_MAX, so the cut is real).
    Both seeds replay one captured persistent launch (the parameters are a device struct), and a
    greedy run after them shows the struct was rewritten, not baked into the graph. (Sampled
    picks can only differ where the two paths' logits differ in the last bits AND the draw
    lands within that of a boundary; the logits test above bounds that difference.)"""
    from nexusrt.reference.sampling import SamplingParams

    graph, pers = _runners(variant, gpu_rt, monkeypatch)
    try:
        for seed in (5, 2**63 + 17):
            params = SamplingParams(seed=seed, **SAMPLED[sampling])
            ids = {}
            for name, r in (("graph", graph), ("persistent", pers)):
                out = []
                assert r.generate_tokens(PROMPT, STEPS, params, lambda t: out.append(t) and False) == STEPS
                ids[name] = out
            assert ids["persistent"] == ids["graph"], (seed, _fault(pers))
            assert len(set(ids["graph"])) > 1
        greedy = [[], []]
        for out, r in zip(greedy, (graph, pers)):
            r.generate_tokens(PROMPT, 8, SamplingParams(temperature=0.0), lambda t, out=out: out.append(t) and False)
        assert greedy[0] == greedy[1]
        assert ("persistent", True) in pers._graphs and not any(k[0] == "decode" for k in pers._graphs)
        _, _, _, epoch = pers._persistent.program(True)
        assert int(epoch.to_numpy()[0]) == 2 * (STEPS - 1) + 7 and _fault(pers) is None
        assert not pers.buffers.sampler.topk_hist.to_numpy().any()  # every sampled finish cleared it
    finally:
        graph.close()
        pers.close()


@pytest.mark.parametrize("mode", ["1", "loader"])
def test_the_weight_ring_refills_its_slots_and_keeps_the_bits_of_the_loads(gpu_rt, monkeypatch, mode):
    """The bulk-copy weight ring (cu/persistent_ring.cuh; NEXUSRT_PERSISTENT_RING=1: its readers refill
    it, =loader: a loader warpgroup does) against the same kernel loading its weights with 16-byte
    loads (the default): every GEMV row sums in the same order, so the logits are equal to the bit
    after every teacher-forced step, and greedy generation gives the graph path's ids. The shape
    makes each SM's step stream more than twice its ring's slots, so every slot is refilled while
    later tiles' copies are in flight."""
    from nexusrt.backends.cuda.runner import CudaRunner
    from nexusrt.kernels.ops import persistent as pk
    from nexusrt.reference.sampling import SamplingParams

    monkeypatch.setenv(P.RING_ENV, mode)
    graph, ring = _runners("llama_ring", gpu_rt, monkeypatch)
    monkeypatch.setenv(P.RING_ENV, "0")
    try:
        loads = CudaRunner(_model("llama_ring"), gpu_rt, max_context=128)
    except BaseException:
        graph.close()
        ring.close()
        raise
    try:
        cfg = ring.config
        prog, spec, _, _ = ring._persistent.program(False)
        table, offsets = prog.pack()
        starts = pk.ring_page_starts(table, offsets, hidden=cfg.hidden_size, inter=cfg.intermediate_size,
                                     q_width=cfg.q_size)
        lead = pk.shared_bytes(cfg.hidden_size, cfg.intermediate_size, cfg.q_size, int(np.diff(offsets).max()))
        slots = (spec.shared - lead) // pk.RING_PAGE_BYTES
        # The last row of each SM is the sampler's (no pages), so its start is the SM's total.
        per_sm = starts[offsets[1:] - 1]
        assert slots >= 8 and per_sm.min() > 2 * slots, (slots, per_sm.min())
        assert ring._persistent.ring == mode and loads._persistent.ring == "0"
        assert loads._persistent.program(False)[1].shared == lead  # no ring there
        assert spec.block[0] == pk.THREADS + (pk.LOADER_THREADS if mode == "loader" else 0)
        assert spec.name == pk.kernel_name(cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads,
                                           loader=mode == "loader")
        forced = (np.arange(12) * 37 + 11) % cfg.vocab_size
        for r in (graph, ring, loads):
            r.reset()
            r.prefill(PROMPT)
        for step, tok in enumerate(forced):
            for r in (graph, ring, loads):
                r.decode(int(tok))
            got, same, want = ring.last_logits(), loads.last_logits(), graph.last_logits()
            assert np.array_equal(got, same), f"step {step}: ring and loads differ by {np.abs(got - same).max()}"
            assert np.abs(got - want).max() <= RTOL * np.abs(want).max(), f"step {step}"
        ids = []
        for r in (graph, ring):
            out = []
            r.generate_tokens(PROMPT, 24, SamplingParams(temperature=0.0), lambda t, out=out: out.append(t) and False)
            ids.append(out)
        assert ids[0] == ids[1] and _fault(ring) is None and _fault(loads) is None
    finally:
        graph.close()
        ring.close()
        loads.close()
