"""The ragged prefill's layout (:mod:`nexusrt.backends.cuda.ragged_layout`), plain logic: row
buckets, pieces and passes, and what one pass stages (ids, per-row meta, padding rows on the
scratch table row, tables, start words)."""

from __future__ import annotations

import numpy as np
import pytest

from nexusrt.backends.cuda.ragged_layout import (Piece, Staging, bucket_for_rows, cut_pieces, group_passes, lay_out,
                                                 row_buckets)
from tests.test_cuda_ragged_cpu import _entries


def _staging(rows=256, slots=8, width=23):
    """Host arrays filled with -7, so an entry the layout did not write shows."""
    return Staging(np.full(rows, -7, np.int32), np.full((rows, 4), -7, np.int32),
                   np.full((slots + 1, width), -7, np.int32), np.full(slots, -7, np.int32))


def test_row_buckets_pad_little_and_end_at_the_largest():
    b = row_buckets(2048)
    assert b[:3] == (64, 128, 192) and b[15:18] == (1024, 1152, 1280) and b[-1] == 2048 and len(b) == 24
    for n in range(1, 2049):
        pad = bucket_for_rows(n, b) - n
        assert 0 <= pad <= max(63, n // 8), n
    assert row_buckets(256) == (64, 128, 192, 256) and row_buckets(40) == (40,) and row_buckets(100) == (64, 100)
    with pytest.raises(ValueError, match="exceed the largest"):
        bucket_for_rows(2049, b)
    for bad in (0, True, 64.0):
        with pytest.raises(ValueError, match="max_rows"):
            row_buckets(bad)


def test_layout_of_mixed_chunks():
    entries = _entries([2, 37, 90, 2, 5], [0, 16, 3, 200, 31])
    pieces = cut_pieces(entries, 512)
    out = _staging(rows=512)
    lay = lay_out(entries, pieces, row_buckets(512), scratch=41, scratch_row=8, out=out)
    want_offsets, row = [], 0
    for e in entries:
        want_offsets.append(row)
        row += len(e.token_ids)
    assert lay.offsets == tuple(want_offsets) and lay.lengths == (2, 37, 90, 2, 5) and lay.rows == row
    assert lay.bucket == 192 == bucket_for_rows(row, row_buckets(512))
    real = np.zeros(lay.bucket, bool)
    for j, (e, off) in enumerate(zip(entries, lay.offsets)):
        n = len(e.token_ids)
        real[off:off + n] = True
        assert (out.ids[off:off + n] == e.token_ids).all()
        pos = np.arange(e.start, e.start + n)
        assert (out.meta[off:off + n, 0] == pos).all() and (out.meta[off:off + n, 1] == pos).all()
        assert (out.meta[off:off + n, 2] == j).all() and (out.meta[off:off + n, 3] == 0).all()
        assert out.tables[j, :len(e.table)].tolist() == e.table and (out.tables[j, len(e.table):] == 41).all()
        assert out.starts[j] == e.start
        assert lay.last_rows[j] == off + n - 1
    # Padding: id 0, slot 0 of the all-scratch table row.
    assert (out.ids[:lay.bucket][~real] == 0).all()
    assert (out.meta[:lay.bucket][~real] == (0, 0, 8, 0)).all()
    assert (~real).sum() == lay.bucket - sum(lay.lengths)
    assert (out.ids[lay.bucket:] == -7).all() and (out.starts[5:] == -7).all()  # nothing past the pass
    assert (out.tables[8] == -7).all()  # the scratch row is the runner's, written once at start


def test_fixed_bucket_and_refusals():
    entries = _entries([2, 3], [0, 0])
    out = _staging()
    assert lay_out(entries, cut_pieces(entries, 256), row_buckets(256), 41, 8, out, fixed_bucket=True).bucket == 256
    assert lay_out(entries, cut_pieces(entries, 256), row_buckets(256), 41, 8, out).bucket == 64
    with pytest.raises(ValueError, match="table rows"):
        lay_out(_entries([2] * 9, [0] * 9), cut_pieces(_entries([2] * 9, [0] * 9), 256), row_buckets(256), 41, 8,
                _staging())
    with pytest.raises(ValueError, match="exceed"):
        lay_out(_entries([200, 100], [0, 0]), cut_pieces(_entries([200, 100], [0, 0]), 256), row_buckets(256), 41,
                8, _staging())


def test_long_chunks_are_cut_and_passes_fit():
    entries = _entries([300, 10, 250, 2], [5, 0, 0, 40])
    pieces = cut_pieces(entries, 256)
    assert pieces[:3] == [Piece(0, 0, 256, 5), Piece(0, 256, 44, 261), Piece(1, 0, 10, 0)]
    assert sum(p.count for p in pieces) == 562
    passes = group_passes(pieces, 256)
    assert [[(p.owner, p.count) for p in g] for g in passes] == [[(0, 256)], [(0, 44), (1, 10)], [(2, 250), (3, 2)]]


def test_a_pruned_entry_ropes_at_its_position_and_writes_its_slots():
    """KV pruning: an entry's RoPE position runs ahead of its cache slot by the tokens evicted; each
    piece of it keeps that shift, meta carries both, the start word stays the slot."""
    entries = _entries([300, 5], [20, 7])
    entries[0].position = 20 + 45
    pieces = cut_pieces(entries, 256)
    assert pieces == [Piece(0, 0, 256, 20, 45), Piece(0, 256, 44, 276, 45), Piece(1, 0, 5, 7, 0)]
    out = _staging(rows=256)
    lay = lay_out(entries, pieces[1:], row_buckets(256), scratch=41, scratch_row=8, out=out)
    assert out.meta[:44, 0].tolist() == list(range(276 + 45, 320 + 45))  # RoPE positions
    assert out.meta[:44, 1].tolist() == list(range(276, 320))  # cache slots
    assert out.meta[44:49, :2].tolist() == [[7 + i, 7 + i] for i in range(5)]
    assert out.starts[:2].tolist() == [276, 7] and lay.rows == 49
