"""``CudaBatchRunner``'s device sampler on the CPU, over the fake GPU of ``tests/cuda_batch_fakes.py``
(whose sampler kernel picks by the reference rule from the bytes it finds). Checks that every
logits row's params and step are staged at its row (a single's row: its index among the step's
single ids; a chunk's: ``bmax`` + its index among the chunks), copied before the batch decode
graph that samples them, or after the step's work and before the eager sampler when no batch
graph runs; that the sampler runs over the right rows, only the picks come back, and each entry's
pick is the engine's rule on its own logits, params and step, on both prompt paths.
"""

from __future__ import annotations

import numpy as np
import pytest

from nexusrt.errors import NexusRTError
from nexusrt.kernels.ops import sampling as sampling_ops
from nexusrt.reference.sampling import SamplingParams, sample
from tests.cuda_batch_fakes import NAN_PICK, chunk, dev, no_occupancy_query, one  # noqa: F401

SAMPLE_A = SamplingParams(temperature=0.7, top_k=50, top_p=0.9, seed=11)
SAMPLE_B = SamplingParams(temperature=1.3, top_k=0, top_p=1.0, seed=None)  # unset seed: 0, as the reference
GREEDY = SamplingParams(seed=3)


def _mixed():
    """Decodes (rows 0..3) and prompt chunks (rows bmax + 0..2), greedy and sampling, some without logits."""
    return [one(5, 20, [1, 2], logits=True),  # greedy (no params): row 0
            chunk(np.arange(1, 30), 0, [3, 4], logits=True, params=SAMPLE_A, step=0),  # chunk 0: row bmax
            one(6, 40, [5, 6, 7], logits=True, params=SAMPLE_B, step=41),  # row 1
            one(7, 3, [8], params=SAMPLE_A, step=9),  # row 2: no pick
            chunk(np.arange(100, 109), 0, [9], params=SAMPLE_B, step=1),  # chunk 1: no pick
            one(8, 10, [10], logits=True, params=GREEDY, step=2),  # greedy params: row 3
            chunk(np.arange(200, 205), 16, [11, 12], logits=True, params=SAMPLE_B, step=7)]  # chunk 2: bmax + 2


@pytest.mark.parametrize("ragged", [True, False], ids=["ragged", "per-sequence"])
def test_a_mixed_step_samples_every_row_on_the_device(dev, ragged):
    r = dev.runner(ragged=ragged)
    bb, bmax, table = r.bb, r.bb.bmax, dev.table
    batch = _mixed()
    out = r.run_tokens(batch)
    assert out == dev.expected(batch) and [i for i, t in enumerate(out) if t is None] == [3, 4]
    # The rows, params and steps are told apart: another row, params or step would give another id.
    assert out[1] not in (sample(table[29], SAMPLE_A, 1), sample(table[29], SAMPLE_B, 0),
                          sample(table[204], SAMPLE_A, 0), sample(table[29], GREEDY, 0))
    assert out[2] not in (sample(table[6], SAMPLE_B, 42), sample(table[6], GREEDY, 41))
    assert r._row_of == {0: 0, 1: bmax, 2: 1, 5: 3, 6: bmax + 2}
    # Staging: a struct and a step at each sampling row that picks; every other row zero (greedy).
    want = np.zeros_like(bb.h_params.array)
    want[bmax] = sampling_ops.pack_params(0.7, 50, 0.9, 11)
    want[1] = want[bmax + 2] = sampling_ops.pack_params(1.3, 0, 1.0, 0)
    assert (bb.h_params.array == want).all()
    steps = np.zeros(2 * bmax, np.int32)
    steps[[1, bmax + 2]] = 41, 7
    assert bb.h_steps.array.tolist() == steps.tolist()
    # Both arrays go to the device whole, before any work: the batch graph samples rows 0..3.
    for dst, src in ((bb.params, bb.h_params), (bb.steps, bb.h_steps)):
        (copy,) = dev.copy_to(dst)
        assert dev.log.index(copy) < 2 and copy[2:4] == (src.ptr, src.nbytes)
    # Then the eager sampler over the three chunk rows (specs made once), and only the picks come back.
    parts = sampling_ops.num_parts(r.config.vocab_size)
    partial, finish = dev.kinds("launch")[-2:]
    assert (partial[1:3], finish[1:3]) == (("sample_rows_partial", (parts, 3, 1)), ("sample_rows_finish", (3, 1, 1)))
    assert finish[3][0] == bb.logits[bmax].ptr and finish[3][2:4] == (bb.params[bmax].ptr, bb.steps[bmax].ptr)
    assert finish[3][7] == bb.next[bmax].ptr and list(r._samplers) == [(bmax, 3)]
    assert dev.kinds("d2h") == [dev.log[-1]] and dev.log[-1][1:] == (bb.h_next.ptr, bb.next.ptr, bb.h_next.nbytes)
    assert not dev.overwritten
    # run(): the same step, returning the logits row each pick was read from.
    got = r.run(batch)
    for entry, row in zip(batch, got):
        assert (row is None) == (not entry.logits)
        assert row is None or np.array_equal(row, table[entry.token_ids[-1]])


WORK = ("replay", "launch", "gemm", "d2d")
STEPS = {  # entries of a step, and whether the batch decode graph samples (staging first)
    "lone decode": ([one(5, 20, [1, 2], logits=True, params=SAMPLE_A, step=7)], False),
    "chunks": ([chunk(np.arange(1, 30), 0, [3, 4], logits=True, params=SAMPLE_B, step=4),
                chunk(np.arange(9, 19), 0, [5], logits=True, params=SAMPLE_A, step=2)], False),
    "lone decode and a chunk": ([chunk(np.arange(1, 30), 0, [3, 4], logits=True, params=SAMPLE_A, step=4),
                                 one(5, 20, [1, 2], logits=True, params=SAMPLE_B, step=1)], False),
    "decodes and a chunk": ([one(5, 20, [1, 2], logits=True, params=SAMPLE_A, step=3),
                             chunk(np.arange(1, 30), 0, [3, 4], logits=True, params=SAMPLE_B, step=4),
                             one(6, 40, [5, 6, 7], logits=True, params=SAMPLE_B, step=8)], True),
}


@pytest.mark.parametrize("ragged", [True, False], ids=["ragged", "per-sequence"])
@pytest.mark.parametrize("name", STEPS)
def test_sampler_inputs_go_first_only_when_the_batch_graph_samples(dev, name, ragged):
    r = dev.runner(ragged=ragged)
    batch, graph_samples = STEPS[name]
    assert r.run_tokens(batch) == dev.expected(batch)
    bb, log = r.bb, dev.log
    copies = [log.index(c) for t in (bb.params, bb.steps) for c in dev.copy_to(t)]
    assert len(copies) == 2
    work = [i for i, e in enumerate(log) if e[0] in WORK and e[1] not in ("sample_rows_partial", "sample_rows_finish")]
    samplers = [i for i, e in enumerate(log) if e[0] == "launch" and e[1].startswith("sample_rows")]
    if graph_samples:  # before anything runs; no eager sampler for the decode rows
        assert max(copies) < min(work) and ("replay", "batch2") in log
    else:  # after the step's work is enqueued, before the eager sampler that reads them
        assert min(work) < max(work) < min(copies) and max(copies) < min(samplers)
    firsts = [log[i][3][0] for i in samplers if log[i][1] == "sample_rows_finish"]
    lone = name.startswith("lone")
    assert firsts == [bb.logits.ptr] * lone + [bb.logits[bb.bmax].ptr] * (name != "lone decode")
    assert not dev.overwritten


def test_deterministic_mode_samples_a_lone_decode_in_the_largest_bucket(dev):
    r = dev.runner(deterministic=True)
    batch = [one(5, 20, [1, 2], logits=True, params=SAMPLE_B, step=1)]
    assert r.run_tokens(batch) == dev.expected(batch)
    assert dev.work() == ["batch4"]  # the sampler is in the graph
    assert max(dev.log.index(c) for c in dev.copy_to(r.bb.params) + dev.copy_to(r.bb.steps)) < 2


def test_a_greedy_step_clears_what_a_sampling_row_left(dev):
    r = dev.runner()
    batch = [one(5, 20, [1, 2], logits=True, params=SAMPLE_A, step=7)]
    assert r.run_tokens(batch) == dev.expected(batch)
    assert r.bb.h_params.array[0].tobytes() == sampling_ops.pack_params(0.7, 50, 0.9, 11).tobytes()
    assert r.bb.h_steps.array[0] == 7
    batch = [one(5, 21, [1, 2], logits=True), one(6, 3, [4], logits=True)]  # the batch graph reads rows 0, 1
    assert r.run_tokens(batch) == dev.expected(batch)
    assert not r.bb.h_params.array.any() and not r.bb.h_steps.array.any()


def test_a_row_of_nan_logits_is_refused_by_name(dev):
    r = dev.runner()
    dev.table[77] = np.nan  # the model's logits after id 77
    with pytest.raises(NexusRTError, match=f"all NaN \\(pick {NAN_PICK}\\)"):
        r.run_tokens([one(5, 20, [1, 2], logits=True), one(77, 3, [4], logits=True)])
    batch = [one(5, 21, [1, 2], logits=True), one(77, 3, [4])]  # no pick from that row: no refusal
    assert r.run_tokens(batch) == dev.expected(batch)
