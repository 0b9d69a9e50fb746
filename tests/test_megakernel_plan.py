"""The persistent decode kernel's host half (issue 15), on the CPU: the lowering of the real decode
stage chain (built through the launchers with a fake runtime, as tests/test_cuda_step_cpu.py
does) into per-SM instruction lists, run by the NumPy interpreter in random interleavings and
compared with the CPU decoder (logits, and the picked token: greedy, or sampled with temperature,
top-k, top-p and a seed, equal to reference/sampling.py's pick); broken programs are caught; the
byte balance is measured."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from nexusrt.backends.base import Rows
from nexusrt.backends.cpu.decoder import PagedDecoder
from nexusrt.backends.cuda import step as steps
from nexusrt.backends.cuda.buffers import RunnerBuffers
from nexusrt.backends.cuda.chunks import buckets_for
from nexusrt.backends.cuda.megakernel.instructions import ROW_WORDS, Op, unpack
from nexusrt.backends.cuda.megakernel.interpret import DeadlockError, Interpreter, UnwrittenReadError
from nexusrt.backends.cuda.megakernel.lower import check, lower, skeleton
from nexusrt.models.presets import preset
from nexusrt.models.synthetic import SyntheticWeights
from nexusrt.reference.sampling import SamplingParams, sample
from tests.fakes import FakeRuntime
from tests.test_cuda_step_cpu import VARIANTS, _config, _device_weights, no_occupancy_query  # noqa: F401

PLANS = [(1, 1), (3, 2), (7, 1), (132, 4)]  # (SMs, attention splits along the KV length)
TABLE = [3, 1, 4, 0]  # physical KV blocks of the sequence, deliberately out of order
PROMPT = np.array([5, 17, 300, 42, 9, 77, 1], np.int32)


def _real_programs(cfg, plans=PLANS, sample_stages=True):
    """Lower the chain ``decode_stages`` builds through the real launchers, once per plan."""
    rt, weights = FakeRuntime(), _device_weights(cfg)
    buckets = buckets_for(64)
    buffers = RunnerBuffers(rt, cfg, 64, buckets[-1], positions=64 + buckets[0] - 1)
    try:
        stages = steps.decode_stages(rt, cfg, weights, buffers, sample=sample_stages)
        return [lower(stages, cfg, sms, 16, attn_splits=splits) for sms, splits in plans]
    finally:
        buffers.free()
        weights.free()


def _prefilled(cfg):
    """Synthetic weights, the CPU decoder and its pools after PROMPT."""
    weights = SyntheticWeights(cfg)
    dec = PagedDecoder(weights)
    pools = dec.new_pools(6)
    dec.forward([Rows(PROMPT, 0, TABLE)], pools)
    return weights, dec, pools


def _reference(dec, pools, token, pos):
    """The CPU decoder's logits of ``token`` at ``pos`` and its pools afterwards."""
    pools = copy.deepcopy(pools)
    return dec.logits(dec.forward([Rows(np.array([token], np.int32), pos, TABLE)], pools))[0], pools


def _close(logits, ref) -> bool:
    return bool(np.all(np.isfinite(logits)) and np.abs(logits - ref).max() <= 1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("variant", VARIANTS)
def test_interpreted_step_equals_the_cpu_decoder(variant, cpu_rt, no_occupancy_query):
    cfg = _config(variant)
    weights, dec, pools = _prefilled(cfg)
    token, pos = 123, len(PROMPT)
    ref, ref_pools = _reference(dec, pools, token, pos)
    blk, slot = TABLE[pos // 16], pos % 16
    for prog in _real_programs(cfg):
        interp = Interpreter(prog, weights)
        runs = []
        for seed in range(3):
            mine = copy.deepcopy(pools)
            r = interp.step(token, pos, *mine, TABLE, seed=seed)
            assert _close(r.logits, ref), (prog.num_sms, seed, np.abs(r.logits - ref).max())
            for li in range(cfg.num_hidden_layers):  # the new K and V slot, and nothing else, written
                for got, want in ((mine[0][li], ref_pools[0][li]), (mine[1][li], ref_pools[1][li])):
                    np.testing.assert_allclose(got[blk, :, slot], want[blk, :, slot], atol=1e-5)
                    assert np.array_equal(np.delete(got[blk], slot, axis=1), np.delete(want[blk], slot, axis=1))
            assert r.token == sample(r.logits, SamplingParams(temperature=0.0), 0) == int(np.argmax(ref))
            assert sorted(i for _, i in r.trace) == list(range(len(prog.instructions)))
            runs.append(r)
        # Tiles are computed whole from finished inputs, so the interleaving changes no bit.
        assert all(np.array_equal(r.logits, runs[0].logits) for r in runs)
        if prog.num_sms > 1:
            assert len({tuple(r.trace) for r in runs}) == 3, "the seeds did not interleave differently"


SAMPLED = [SamplingParams(temperature=0.7, top_p=0.9, seed=11), SamplingParams(temperature=1.0, top_k=5, seed=3),
           SamplingParams(temperature=0.5, top_k=40, top_p=0.5, seed=2**64 - 1),
           SamplingParams(temperature=2.0, seed=123456789)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_interpreted_sampled_step_picks_the_reference_token(variant, cpu_rt, no_occupancy_query):
    """One program for every parameter set: with temperature > 0 the finish draws from all the
    logits, and its pick is reference/sampling.py's on the CPU decoder's logits, for several
    parameters, seeds and step indices of the draw, in several interleavings and SM counts."""
    cfg = _config(variant)
    weights, dec, pools = _prefilled(cfg)
    token, pos = 123, len(PROMPT)
    ref, _ = _reference(dec, pools, token, pos)
    for prog in _real_programs(cfg, [(3, 2), (132, 4)]):
        interp = Interpreter(prog, weights)
        for params in SAMPLED:
            picks = []
            for draw_step in range(6):
                r = interp.step(token, pos, *copy.deepcopy(pools), TABLE, seed=draw_step, sampling=params,
                                draw_step=draw_step)
                assert _close(r.logits, ref)
                assert r.token == sample(r.logits, params, draw_step) == sample(ref, params, draw_step)
                picks.append(r.token)
            if params.top_k != 1:
                assert len(set(picks)) > 1, f"{params}: six draws gave one token; is it sampling?"
    with pytest.raises(ValueError, match="concrete seed"):
        interp.step(token, pos, *copy.deepcopy(pools), TABLE, sampling=SamplingParams(temperature=0.7))


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0), SAMPLED[0], SAMPLED[1]],
                         ids=["greedy", "t0.7_p0.9", "t1_k5"])
def test_interpreter_decodes_several_positions_across_a_block_boundary(params, cpu_rt, no_occupancy_query):
    """Decoding for five steps from a 14-token prompt (the cache crosses into a second block),
    each step's token fed back, gives the CPU decoder's logits and reference/sampling.py's ids
    (the draw of step i for the i-th token) at every step."""
    cfg = _config("qwen3_norms_d128")
    weights = SyntheticWeights(cfg)
    dec = PagedDecoder(weights)
    prompt = np.arange(3, 17, dtype=np.int32) * 7
    ref_pools, pools = dec.new_pools(6), dec.new_pools(6)
    for p in (ref_pools, pools):
        dec.forward([Rows(prompt, 0, TABLE)], p)
    (prog,) = _real_programs(cfg, [(7, 3)])
    interp = Interpreter(prog, weights)
    token = sample(dec.logits(dec.forward([Rows(prompt, 0, TABLE)], dec.new_pools(6)))[-1], params, 0)
    for step in range(5):
        pos = len(prompt) + step
        ref = dec.logits(dec.forward([Rows(np.array([token], np.int32), pos, TABLE)], ref_pools))[0]
        r = interp.step(token, pos, *pools, TABLE, seed=step, sampling=params, draw_step=step + 1)
        assert _close(r.logits, ref) and r.token == sample(ref, params, step + 1)
        token = r.token


@pytest.mark.parametrize("variant", VARIANTS)
def test_skeleton_lowers_exactly_as_the_real_chain(variant, cpu_rt, no_occupancy_query):
    cfg = _config(variant)
    real = _real_programs(cfg)
    for (sms, splits), prog in zip(PLANS, real):
        plan = lower(skeleton(cfg), cfg, sms, 16, attn_splits=splits)
        assert plan.instructions == prog.instructions and plan.lists == prog.lists
        assert plan.counters == prog.counters
    (no_sample,) = _real_programs(cfg, [(3, 1)], sample_stages=False)
    assert not any(i.op in (Op.SAMPLE_PARTIAL, Op.SAMPLE_FINISH) for i in no_sample.instructions)
    r = Interpreter(no_sample, SyntheticWeights(cfg)).step(7, 0, *PagedDecoder(SyntheticWeights(cfg)).new_pools(1),
                                                           [0])
    assert r.token is None and np.all(np.isfinite(r.logits))


def test_waits_are_at_the_granularity_of_the_data_read():
    cfg = _config("qwen3_norms_d128")  # 8 q heads, 2 KV heads of 128: 4 q heads per group
    prog = lower(skeleton(cfg), cfg, 132, 16, attn_splits=4)
    check(prog)
    d, g, hq = cfg.head_dim, 4, cfg.num_attention_heads
    ins, signalled = prog.instructions, {}
    for i in ins:
        signalled.setdefault(i.signal, []).append(i)
    ropes = [i for i in ins if i.op == Op.ROPE_APPEND and i.layer == 1]
    assert [r.start for r in ropes] == [0, 1]
    for r in ropes:
        (c, target), = r.waits
        tiles = signalled[c]
        assert all(t.op == Op.QKV and t.layer == 1 for t in tiles) and target == len(tiles)
        rows = sorted(x for t in tiles for x in range(t.start, t.end))
        kv = r.start
        want = (list(range(kv * g * d, (kv + 1) * g * d)) + list(range(hq * d + kv * d, hq * d + (kv + 1) * d))
                + list(range((hq + 2) * d + kv * d, (hq + 2) * d + (kv + 1) * d)))
        assert rows == want  # q heads of the group, its k head, its v head: nothing more
    for a in (i for i in ins if i.op == Op.ATTENTION):
        (c, _), = a.waits
        assert signalled[c] == [next(r for r in ins if r.op == Op.ROPE_APPEND and r.layer == a.layer
                                     and r.start == a.start)]
    o = next(i for i in ins if i.op == Op.O_PROJ)
    assert o.waits[0][1] == cfg.num_key_value_heads and all(x.op == Op.ATTN_COMBINE for x in signalled[o.waits[0][0]])
    partials = [i for i in ins if i.op == Op.SAMPLE_PARTIAL]
    for p in partials:
        (c, _), = p.waits
        assert sorted(x for t in signalled[c] for x in range(t.start, t.end)) == list(range(p.start, p.end))
    # The partials' chunks cover the whole LM head; each gather has its partial's chunk and waits
    # for every partial (the complete histogram); the finish for every partial and every gather.
    assert sorted(x for p in partials for x in range(p.start, p.end)) == list(range(cfg.vocab_size))
    gathers = [i for i in ins if i.op == Op.SAMPLE_GATHER]
    assert [(g.start, g.end, g.arg) for g in gathers] == [(p.start, p.end, p.arg) for p in partials]
    assert all(g.waits == ((partials[0].signal, len(partials)),) for g in gathers)
    assert len({g.signal for g in gathers}) == 1 and gathers[0].signal != partials[0].signal
    (finish,) = [i for i in ins if i.op == Op.SAMPLE_FINISH]
    assert finish.arg == len(partials)
    assert finish.waits == ((partials[0].signal, len(partials)), (gathers[0].signal, len(gathers)))
    assert ins.index(finish) > max(ins.index(g) for g in gathers) > min(ins.index(g) for g in gathers) > max(
        ins.index(p) for p in partials)  # the global order the deadlock argument needs
    table, offsets = prog.pack()
    assert table.dtype == np.int32 and table.shape == (len(ins), ROW_WORDS) and offsets[-1] == len(ins)
    assert unpack(table, offsets) == prog.sm_instructions()


@pytest.fixture(scope="module")
def tiny_case():
    cfg = _config("llama_tiny")
    weights, dec, pools = _prefilled(cfg)
    ref, _ = _reference(dec, pools, 123, len(PROMPT))
    return cfg, weights, pools, ref


def _run(prog, case, seed):
    _, weights, pools, _ = case
    return Interpreter(prog, weights).step(123, len(PROMPT), *copy.deepcopy(pools), TABLE, seed=seed)


@pytest.mark.parametrize("op, layer", [(Op.O_PROJ, 0), (Op.ROPE_APPEND, 1), (Op.LM_HEAD, 0)])
def test_a_removed_wait_gives_a_wrong_result(op, layer, tiny_case):
    cfg, ref = tiny_case[0], tiny_case[3]
    prog = lower(skeleton(cfg), cfg, 132, 16)
    assert _close(_run(prog, tiny_case, 0).logits, ref)
    prog.instructions = [dataclasses.replace(i, waits=()) if (i.op, i.layer) == (op, layer) else i
                         for i in prog.instructions]
    check(prog)  # still well formed: only running it shows the race
    assert any(not _close(_run(prog, tiny_case, seed).logits, ref) for seed in range(4))


def test_a_sampling_finish_without_its_partials_reads_unwritten_logits(tiny_case):
    """A sampling step's partials histogram their chunk of the logits: without their waits on the
    LM head some interleaving reads unwritten logits."""
    cfg, weights, pools, ref = tiny_case
    prog = lower(skeleton(cfg), cfg, 132, 16)
    run = lambda p, seed: Interpreter(p, weights).step(123, len(PROMPT), *copy.deepcopy(pools), TABLE,  # noqa: E731
                                                       seed=seed, sampling=SAMPLED[0], draw_step=4)
    assert run(prog, 0).token == sample(ref, SAMPLED[0], 4)
    prog.instructions = [dataclasses.replace(i, waits=()) if i.op == Op.SAMPLE_PARTIAL else i
                         for i in prog.instructions]
    check(prog)
    with pytest.raises(UnwrittenReadError, match="a wait is missing"):
        for seed in range(8):
            run(prog, seed)


def test_lists_out_of_the_global_order_deadlock(tiny_case):
    cfg = tiny_case[0]
    one = lower(skeleton(cfg), cfg, 1, 16)
    one.lists = [one.lists[0][1:] + one.lists[0][:1]]  # the embedding last: the first QKV tile waits forever
    with pytest.raises(ValueError, match="leaves the global order"):
        check(one)
    with pytest.raises(DeadlockError, match=r"SM 0 at instruction 1 \(QKV layer 0 .* waits for embed at 0 < 1"):
        _run(one, tiny_case, 0)
    three = lower(skeleton(cfg), cfg, 3, 16)
    down = next(i for i, x in enumerate(three.instructions) if x.op == Op.DOWN)
    li = next(li for li in three.lists if down in li)
    first_gu = next(k for k, i in enumerate(li) if three.instructions[i].op == Op.GATE_UP)
    li.remove(down)
    li.insert(first_gu, down)  # a down tile ahead of a gate/up tile it waits for, on the same SM
    for seed in range(3):
        with pytest.raises(DeadlockError, match="layer0.gate_up"):
            _run(three, tiny_case, seed)


def test_a_wait_for_more_signals_than_exist_deadlocks(tiny_case):
    cfg = tiny_case[0]
    prog = lower(skeleton(cfg), cfg, 7, 16)
    k = next(i for i, x in enumerate(prog.instructions) if x.op == Op.GATE_UP)
    (c, t), = prog.instructions[k].waits
    prog.instructions[k] = dataclasses.replace(prog.instructions[k], waits=((c, t + 1),))
    with pytest.raises(ValueError, match="only .* signals precede it"):
        check(prog)
    with pytest.raises(DeadlockError, match="no SM can advance"):
        _run(prog, tiny_case, 0)


def test_the_lowering_refuses_what_it_cannot_lower():
    from nexusrt import scheduler

    cfg = _config("llama_tiny")
    chain = skeleton(cfg)
    renamed = [scheduler.stage(name="decode.layer1.mlp" if s.name == "decode.layer1.gate_up" else s.name)
               for s in chain]
    with pytest.raises(ValueError, match=r"stage 'decode.layer1.mlp' is not one the persistent-kernel lowering knows"):
        lower(renamed, cfg, 4)
    with pytest.raises(ValueError, match=r"'decode.unknown' is not one"):
        lower(chain + [scheduler.stage(name="decode.unknown", depends_on=("sample.finish",))], cfg, 4)
    dropped = [scheduler.stage(name=s.name) for s in chain if s.name != "decode.layer1.down"]
    with pytest.raises(ValueError, match=r"is 'decode.lm_head', expected 'decode.layer1.down'"):
        lower(dropped, cfg, 4)
    deeper = dataclasses.replace(cfg, num_hidden_layers=3)
    with pytest.raises(ValueError, match="does not match 3 layers"):
        lower(chain, deeper, 4)
    with pytest.raises(ValueError, match="tile_rows 48 does not divide head_dim 64"):
        lower(chain, cfg, 4, 48)
    for kwargs, what in ((dict(num_sms=0), "num_sms"), (dict(num_sms=4, tile_rows=0), "tile_rows"),
                         (dict(num_sms=4, attn_splits=0), "attn_splits")):
        with pytest.raises(ValueError, match=f"{what} must be a positive integer"):
            lower(chain, cfg, **kwargs)


@pytest.mark.parametrize("name", ["llama-3.2-1b", "llama-3.1-8b"])
def test_byte_balance_of_the_llama_shapes(name):
    cfg = preset(name)
    prog = lower(skeleton(cfg), cfg, 132, 16, attn_splits=16)
    b = prog.balance()
    assert 1.0 <= b["total"] <= 1.01 and 1.0 <= b["phased"] <= 1.1
    # The step reads every layer weight and the LM head once (of the embedding, one row).
    weights = 2 * (cfg.num_parameters() - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size))
    # Weights dominate; the rest is KV at 4096 tokens and the input vector every tile re-reads,
    # which shrinks as tiles grow.
    wide = lower(skeleton(cfg), cfg, 132, 64, attn_splits=16).balance()
    assert 1.0 <= wide["bytes"] / weights <= 1.1 and wide["bytes"] < b["bytes"] <= 1.25 * weights
    assert lower(skeleton(cfg), cfg, 1, 64).balance()["total"] == 1.0
    assert max(b["per_op"].values()) == b["per_op"]["embed"] == 132.0  # one tiny instruction on one SM
