"""The persistent kernel's sampler instructions alone on the GPU (sm_90), on the SAME logits as the
graph path's sampler: a hand-built program of SAMPLE_PARTIAL tiles (one per chunk of the
vocabulary, spread over the SMs, no waits), SAMPLE_GATHER tiles (one per chunk, waiting for every
partial) and one SAMPLE_FINISH waiting for both, launched through the real launcher. For every case
of tests/test_kernels_sampling.py (greedy and sampled, ties at the top-k cut, vocabularies from 50
to 151,936) its token is sample_finish's token bit for bit, and the state words and the ring move
as sample_finish moves them. A sampled step takes the grid-wide top-K (the candidate pool), or all
logits when the pool would overflow (megakernel/topk.py says which; both are exercised), and
leaves the histogram, cursor and pool zero for the next step (one workspace serves every case).
This isolates the pick from the tiny logit differences of the two decode paths, which the
end-to-end test cannot."""

from __future__ import annotations

import numpy as np
import pytest

from nexusrt.backends.cuda.megakernel import topk
from nexusrt.backends.cuda.megakernel.instructions import Instruction, Op, pack
from nexusrt.kernels.ops import persistent as pk
from nexusrt.kernels.ops import sampling as ops
from nexusrt.kernels.ops.common import sm_count
from nexusrt.reference.sampling import SamplingParams
from tests.test_kernels_sampling import _cases, _logits

pytestmark = pytest.mark.gpu

RING = 8


def _bounds(vocab: int, num_sms: int):
    chunk = -(-vocab // num_sms)
    return [(a, min(a + chunk, vocab)) for a in range(0, vocab, chunk)]


def _program(vocab: int, num_sms: int):
    """Partials over ``num_sms`` chunks (counter 0), gathers of the same chunks on the SMs in reverse
    (counter 1, each waiting for every partial), then the finish on SM 0 (counter 2)."""
    bounds = _bounds(vocab, num_sms)
    n = len(bounds)
    lists = [[] for _ in range(num_sms)]
    for ci, (a, b) in enumerate(bounds):
        lists[ci].append(Instruction(Op.SAMPLE_PARTIAL, 0, a, b, ci, 0))
    for ci, (a, b) in enumerate(bounds):
        lists[num_sms - 1 - ci].append(Instruction(Op.SAMPLE_GATHER, 0, a, b, ci, 1, ((0, n),)))
    lists[0].append(Instruction(Op.SAMPLE_FINISH, 0, 0, 1, n, 2, ((0, n), (1, n))))
    table, offsets = pack(lists)
    return table, offsets, np.array([n, n, 1], np.int32)


def _finish_token(rt, logits, vocab, bufs, ring, pos0, step, keep, work):
    """Launch the sampler program once; (token, pos, step) afterwards."""
    from nexusrt import memory

    sms = sm_count(rt)
    table, offsets, totals = _program(vocab, sms)
    t = lambda a: keep.append(memory.from_numpy(np.ascontiguousarray(a))) or keep[-1]  # noqa: E731
    state = t(np.array([pos0, step, -1, 0], np.int32))
    dummy = t(np.zeros(16, np.float32))  # slots the sampler ops never read
    values = {name: dummy for name in pk.SLOTS}
    values.update(logits=logits, sample_params=bufs.params, arg_val=t(np.zeros(sms + 1, np.float32)),
                  arg_idx=t(np.zeros(sms + 1, np.int32)), topk_hist=work[0], topk_pool=work[1], state=state,
                  ring=ring, counters=t(np.zeros(3, np.int32)), totals=t(totals), epoch=t(np.zeros(2, np.int32)),
                  debug=t(np.zeros(8, np.int32)), program=t(table.reshape(-1)), offsets=t(offsets), hidden=64,
                  inter=64, vocab=vocab, hq=1, hkv=1, splits=1, ring_size=RING,
                  slice_rows=int(np.diff(offsets).max()), profile=None, eps=1e-5, scale=1.0)
    block = t(pk.pack_params(values).view(np.int64))
    pk.persistent_decode(rt, block, hidden=64, inter=64, num_q_heads=1, num_kv_heads=1, head_dim=64,
                         splits=1, slice_rows=int(np.diff(offsets).max()), num_sms=sms).launch()
    rt.device.synchronize()
    pos, new_step, token, _ = (int(x) for x in state.to_numpy())
    return token, pos, new_step


# Beyond test_kernels_sampling's cases: logits that crowd the K-th key's bucket (the pool overflows
# and the finish reads every logit), all-equal logits, -0/+0, NaN and +-inf (tests/test_megakernel_topk.py).
EXTRA = [(128256, "narrow", 0.7, 0, 0.9, 21, 3), (20000, "equal", 1.0, 0, 1.0, 22, 1),
         (20000, "equal", 1.0, 7, 0.5, 23, 2), (5000, "signed_zero", 1.0, 20, 1.0, 24, 5),
         (128256, "inf", 0.9, 0, 0.9, 25, 6), (128256, "nan", 1.1, 50, 0.8, 26, 7),
         (1025, "nan", 1.0, 20, 1.0, 27, 8), (128256, "normal", 0.7, 1024, 1.0, 28, 9)]


def _case_logits(i: int, vocab: int, kind: str) -> np.ndarray:
    from tests import test_megakernel_topk

    rng = np.random.default_rng(i)
    return _logits(rng, vocab, kind) if kind in ("normal", "peaked", "ties") else \
        test_megakernel_topk._logits(rng, vocab, kind)


def test_finish_instruction_picks_sample_finish_tokens_on_the_same_logits(gpu_rt):
    from nexusrt import memory
    from nexusrt.backends.cuda.persistent import device_reason

    if device_reason(gpu_rt):
        pytest.skip(device_reason(gpu_rt))
    ring = memory.pinned((RING,), "int32")
    work = (memory.zeros((ops.TOPK_HIST_WORDS,), "int32"), memory.zeros((ops.TOPK_POOL_WORDS,), "int64"))
    keep, differ, paths = [ring, *work], [], set()
    try:
        for i, (vocab, kind, temp, top_k, top_p, seed, step) in enumerate(_cases() + EXTRA):
            logits = memory.from_numpy(_case_logits(i, vocab, kind))
            bufs = ops.alloc_buffers(vocab)
            keep += [logits, bufs]
            bufs.set_params(temp, top_k, top_p, seed)
            words = memory.from_numpy(np.array([100 + i, step, -1], np.int32))
            keep.append(words)
            for spec in ops.sample(gpu_rt, logits, bufs, words[0:1], words[1:2], words[2:3], ring, RING):
                spec.launch()
            gpu_rt.device.synchronize()
            want = int(words.to_numpy()[2])
            ring.array[...] = -1
            token, pos, new_step = _finish_token(gpu_rt, logits, vocab, bufs, ring, 100 + i, step, keep, work)
            assert not work[0].to_numpy().any(), f"case {i}: histogram or cursor left for the next step"
            if temp > 0:  # which path the device took: the CPU model of the same chunks says
                host = logits.to_numpy()
                _, path = topk.run_chunks(host, SamplingParams(temperature=temp, top_k=top_k, top_p=top_p,
                                                               seed=seed), step, _bounds(vocab, sm_count(gpu_rt)))
                paths.add(path)
            assert (pos, new_step) == (101 + i, step + 1), f"case {i}: state not advanced"
            assert int(ring.array[step % RING]) == token, f"case {i}: ring slot differs from the token"
            if token != want:
                differ.append((i, vocab, kind, temp, top_k, top_p, seed, step, token, want))
        assert not differ, differ  # same code, same logits: no exception is allowed
        assert paths == {"pool", "all logits"}, paths
    finally:
        for x in keep:
            x.free()
