"""``CudaBatchRunner``'s two prompt paths in a step, on the CPU over the fake GPU of
``tests/cuda_batch_fakes.py``: the ragged path (``ragged_prefill=True``, every chunk through each
GEMM together; its layout and launches in detail: ``test_cuda_ragged_cpu``) and the per-sequence
path (each chunk alone through the prefill graphs and the LM-head graph). Checks which work a
mixed step enqueues on each, where each chunk's ids, table and start go, that each chunk's logits
land in row ``bmax`` + its index among the chunks, and that each pick is read from its own row.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.cuda_batch_fakes import chunk, dev, no_occupancy_query, one, row_table  # noqa: F401


def _mixed(rng):
    def rows(n, start, logits=True):
        table = rng.permutation(40)[:-(-(start + n) // 16)].tolist()
        return chunk(rng.integers(1, 250, n), start, table, logits=logits)
    # chunk (37 ids), decode, chunk (2 ids, mid-prompt: no logits), decode, chunk (5 ids)
    return [rows(37, 0), rows(1, 40), rows(2, 64, logits=False), rows(1, 100), rows(5, 130)]


@pytest.mark.parametrize("ragged", [True, False], ids=["ragged", "per-sequence"])
def test_a_mixed_step_enqueues_its_prompt_path_and_reads_each_pick_from_its_row(dev, ragged):
    r = dev.runner(ragged=ragged)
    cfg, bb, pre, bmax = r.config, r.bb, r.pre, r.bb.bmax
    h, vocab, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    batch = _mixed(np.random.default_rng(1))
    assert r.run_tokens(batch) == dev.expected(batch)
    # Chunks j = 0, 1, 2 have rows bmax + j (the mid-prompt one picks nothing); decodes rows 0 and 1.
    assert r._row_of == {0: bmax, 1: 0, 3: 1, 4: bmax + 2}
    work = dev.work()
    attention = [e for e in dev.kinds("launch") if e[1].startswith("attention_prefill_mma")]
    gemms = dev.kinds("gemm")
    if ragged:  # 44 ids as one 64-row pass, three attention launches per layer, the LM head of 4 rows
        buf = r.ragged.buf
        assert [e[1] for e in dev.kinds("replay")] == ["batch2"]
        assert work.index("batch2") > max(i for i, w in enumerate(work) if w == "gemm")
        assert len(attention) == 3 * layers and [a[3][6] for a in attention[:3]] == [37, 2, 5]
        assert [g[1][0] for g in gemms] == [64] * 4 * layers + [4] and gemms[-1][2] == bb.logits[bmax].ptr
        assert [c[3] for c in (dev.copy_to(pre.ids) + dev.copy_to(buf.meta) + dev.copy_to(buf.tables)
                               + dev.copy_to(buf.starts))] == [4 * 64, 16 * 64, 4 * r.width * 3, 4 * 3]
        assert buf.h_starts.array[:3].tolist() == [0, 64, 130]
        # Each chunk's last row (36, 38, 43) gathered for the LM head.
        assert dev.kinds("d2d") == [("d2d", bb.hidden[j].ptr, pre.hidden[row].ptr, 4 * h)
                                    for j, row in enumerate((36, 38, 43))]
    else:  # each chunk alone through a 64-row prefill graph, the LM-head graph for the two that pick
        assert [e[1] for e in dev.kinds("replay")] == ["prefill64", "logits", "prefill64", "prefill64", "logits",
                                                      "batch2"]
        assert attention == [] and gemms == []
        to_rows = [e for e in dev.kinds("d2d") if e[2] == pre.logits.ptr]
        assert to_rows == [("d2d", bb.logits[bmax + j].ptr, pre.logits.ptr, 4 * vocab) for j in (0, 2)]
    assert work[-2:] == ["sample_rows_partial", "sample_rows_finish"]  # the chunks' picks, after the step's work
    assert dev.log[-1][0] == "d2h" and not dev.overwritten


def _replay_inputs(dev, r, name):
    """For each replay of graph ``name``: the ids last copied to ``pre.ids`` and the last position set."""
    ids = pos = None
    out = []
    for e in dev.log:
        if e[0] == "h2d" and e[1] == r.pre.ids.ptr:
            ids = e[4].tolist()
        elif e[0] == "set" and e[1] == r.pre.pos.ptr:
            pos = e[2]
        elif e == ("replay", name):
            out.append((ids, pos))
    return out


def test_per_sequence_chunks_keep_their_own_staging(dev):
    r = dev.runner(ragged=False)
    pre, bb, bmax, h = r.pre, r.bb, r.bb.bmax, r.config.hidden_size
    first, second = np.arange(1, 71), np.arange(200, 209)
    batch = [one(5, 20, [1, 2], logits=True), chunk(first, 16, [3, 4, 9, 10, 12, 13], logits=True),
             chunk(second, 0, [20], logits=True), one(6, 40, [5, 6, 7], logits=True)]
    assert r.run_tokens(batch) == dev.expected(batch)
    # 70 ids from slot 16 as chunks of 64 and 6 (padded to 64), then 9 ids padded to 64, each at its own offset.
    assert bb.h_prompt.array[:192].tolist() == first.tolist() + [0] * 58 + second.tolist() + [0] * 55
    assert [(c[2] - bb.h_prompt.ptr) // 4 for c in dev.copy_to(pre.ids)] == [0, 64, 128]
    assert _replay_inputs(dev, r, "prefill64") == [(first[:64].tolist(), 16), (first[64:].tolist() + [0] * 58, 80),
                                                   (second.tolist() + [0] * 55, 0)]
    # Each chunk's table from its own slot of the pinned tables, before its first replay.
    tables = dev.copy_to(pre.block_table)
    assert [c[2] for c in tables] == [bb.h_pre_tables.ptr, bb.h_pre_tables.ptr + 4 * r.width]
    assert [c[4].tolist() for c in tables] == [row_table(r, [3, 4, 9, 10, 12, 13]), row_table(r, [20])]
    replays = [i for i, e in enumerate(dev.log) if e == ("replay", "prefill64")]
    assert dev.log.index(tables[0]) < replays[0] and replays[1] < dev.log.index(tables[1]) < replays[2]
    # The chunk's last real row to row 0 before the LM-head graph, its logits to row bmax + j after it.
    logits = [i for i, e in enumerate(dev.log) if e == ("replay", "logits")]
    for j, (i, last) in enumerate(zip(logits, (5, 8))):
        assert dev.log[i - 1] == ("d2d", pre.hidden.ptr, pre.hidden[last].ptr, 4 * h)
        assert dev.log[i + 1] == ("d2d", bb.logits[bmax + j].ptr, pre.logits.ptr, 4 * r.config.vocab_size)
    assert [e[1] for e in dev.kinds("replay")][-1] == "batch2" and not dev.overwritten


def test_a_ragged_step_over_the_rows_runs_in_passes(dev):
    r = dev.runner()
    batch = [chunk(np.arange(1, 101), 0, range(7), logits=True), one(7, 5, [9], logits=True),
             chunk(np.arange(300, 360), 3, [10, 11, 12, 13], logits=True)]
    assert r.run_tokens(batch) == dev.expected(batch)
    # 160 ids over 128 rows: pieces (100, 28) | (32): the second pass restages after a synchronize.
    assert [c[3] // 4 for c in dev.copy_to(r.pre.ids)] == [128, 64] and not dev.overwritten


def test_a_deterministic_ragged_step_pads_to_the_largest_buckets(dev):
    r = dev.runner(deterministic=True)
    batch = [chunk(np.arange(1, 10), 0, [3], logits=True), chunk(np.arange(20, 23), 20, [4, 5], logits=True)]
    assert r.run_tokens(batch) == dev.expected(batch)
    assert {g[1][0] for g in dev.kinds("gemm")} == {128, 4}  # all rows; the LM head of max_batch rows
