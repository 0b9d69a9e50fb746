"""Where a step's prompt chunks sit in the ragged prefill's rows (:mod:`.ragged`). Plain logic,
no driver: tested on the CPU.

Every chunk of a step runs through each GEMM together: chunk ``j``'s rows start at a row
offset and follow each other; the rows after the last chunk, up to a row-count bucket, are
padding. For the rows kernels (``rope_append_rows``) each row carries ``meta = (RoPE position,
cache slot, table row, 0)``; a padding row points at the all-scratch table row, so its K and
V land in the runner's scratch block, as the batched decode's padding rows do. Attention runs
per chunk on its slice, with the chunk's table row and its first cache slot (``starts[j]``):
the causal mask and the keys a row sees are counted in slots. The RoPE position is the slot
plus the tokens KV pruning evicted before it (``Rows.position``), and only RoPE reads it.

Offsets are consecutive: the tensor-core attention reads row ``m`` of its ``q`` and ``out``
slices at ``(m * Hq + head) * D`` and stores only ``m < M`` (cu/attention_prefill_mma.cu), so a
slice may start at any row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_ROWS = 64  # the smallest bucket: below it the GEMMs cost the same anyway (weights-bound)


def row_buckets(max_rows: int) -> tuple[int, ...]:
    """Row counts the ragged GEMMs are planned for, up to ``max_rows``: every 64 rows up to 1,024,
    then eight per doubling (pads at most 63 rows, or 1/8 above 512), and ``max_rows`` last.

    Eight per doubling, not the one-sequence prefill's 64/256/1,024/2,048: a step's prompt rows
    are one GEMM, so a 1,100-row step must not pay for 2,048 rows; each bucket costs four cuBLASLt
    plans (QKV, O, gate/up, down) made when the runner is built."""
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}")
    out, b = [], MIN_ROWS
    while b < max_rows:
        out.append(b)
        b += max(MIN_ROWS, (1 << (b.bit_length() - 1)) // 8)
    out.append(max_rows)
    return tuple(out)


def bucket_for_rows(rows: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket of at least ``rows`` rows (ValueError past the largest): a ragged
    prompt pass's row bucket, or a batched decode step's batch bucket."""
    for b in buckets:
        if b >= rows:
            return b
    raise ValueError(f"{rows} rows exceed the largest bucket ({buckets[-1]})")


@dataclass(frozen=True)
class Piece:
    """A run of one step entry's ids that goes through the ragged rows as one slice:
    ``ids[first:first + count]`` of entry ``owner``, at cache slot ``start`` and RoPE position
    ``start + evicted`` (``evicted``: the entry's tokens pruned from its cache, 0 if none)."""

    owner: int
    first: int
    count: int
    start: int
    evicted: int = 0


def cut_pieces(entries, max_rows: int) -> list[Piece]:
    """Each entry (``token_ids``, ``start``, ``position``) as pieces of at most ``max_rows`` ids, in
    order (an entry longer than the largest bucket is split; its pieces may share a pass:
    RoPE/append of a layer runs over all rows before any piece's attention)."""
    out = []
    for j, e in enumerate(entries):
        n = len(e.token_ids)
        evicted = e.first_position - int(e.start)
        for first in range(0, n, max_rows):
            out.append(Piece(j, first, min(max_rows, n - first), int(e.start) + first, evicted))
    return out


def group_passes(pieces: list[Piece], max_rows: int) -> list[list[Piece]]:
    """Consecutive pieces grouped into passes whose rows fit ``max_rows`` (greedy, in
    order). The engine's token budget keeps a step to one pass; more happen only when a caller
    gives more ids than the runner's ``max_chunk``."""
    passes, cur, rows = [], [], 0
    for p in pieces:
        need = rows + p.count
        if cur and need > max_rows:
            passes.append(cur)
            cur, rows = [], 0
            need = p.count
        cur.append(p)
        rows = need
    if cur:
        passes.append(cur)
    return passes


@dataclass
class Staging:
    """Host arrays a pass is staged into (pinned in the runner, plain NumPy in tests):
    ``ids`` int32 [R], ``meta`` int32 [R, 4], ``tables`` int32 [S, W], ``starts`` int32 [S]."""

    ids: np.ndarray
    meta: np.ndarray
    tables: np.ndarray
    starts: np.ndarray


@dataclass(frozen=True)
class Layout:
    """One pass: ``offsets[j]`` and ``lengths[j]`` of piece ``j``'s rows, ``rows`` up to the end of
    the last piece, ``bucket`` the padded row count the GEMMs run."""

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]
    rows: int
    bucket: int

    @property
    def last_rows(self) -> tuple[int, ...]:
        """Each piece's last row (the one whose logits a sampling chunk needs)."""
        return tuple(o + n - 1 for o, n in zip(self.offsets, self.lengths))


def lay_out(entries, pieces: list[Piece], buckets: tuple[int, ...], scratch: int, scratch_row: int,
            out: Staging, *, fixed_bucket: bool = False) -> Layout:
    """Stage one pass of ``pieces`` (of ``entries``: ``token_ids``, ``start``, ``table``) into ``out``
    and return where each piece's rows are.

    Writes ``out.ids[0:bucket]`` (padding ids 0), ``out.meta[0:bucket]`` (piece ``j``'s row ``r``:
    ``(start + evicted + r, start + r, j, 0)``; padding rows ``(0, 0, scratch_row, 0)``), ``out.tables[j]``
    (the entry's table, then ``scratch`` to the width) and ``out.starts[j]``. ``fixed_bucket``:
    always the largest bucket (deterministic mode: every step runs the same GEMM kernels, so a
    row's result does not depend on the rows beside it).
    """
    if not pieces:
        raise ValueError("a ragged pass needs at least one piece")
    if len(pieces) > len(out.starts) or scratch_row >= len(out.tables) or scratch_row < len(pieces):
        raise ValueError(f"{len(pieces)} pieces do not fit {len(out.starts)} table rows below the "
                         f"scratch row {scratch_row}")
    offsets, lengths, row = [], [], 0
    for p in pieces:
        offsets.append(row)
        lengths.append(p.count)
        row += p.count
    bucket = buckets[-1] if fixed_bucket else bucket_for_rows(row, buckets)
    if row > bucket:
        raise ValueError(f"{row} prompt rows exceed the largest ragged bucket ({bucket})")
    ids, meta = out.ids, out.meta
    ids[:bucket] = 0
    meta[:bucket] = (0, 0, scratch_row, 0)
    width = out.tables.shape[1]
    for j, (p, off) in enumerate(zip(pieces, offsets)):
        e = entries[p.owner]
        ids[off:off + p.count] = e.token_ids[p.first:p.first + p.count]
        slots = np.arange(p.start, p.start + p.count, dtype=np.int32)
        meta[off:off + p.count, 0] = slots + p.evicted  # RoPE position
        meta[off:off + p.count, 1] = slots  # cache slot
        meta[off:off + p.count, 2] = j
        meta[off:off + p.count, 3] = 0
        table = e.table
        if len(table) > width:
            raise ValueError(f"a block table of {len(table)} blocks exceeds the width {width}")
        out.tables[j, :len(table)] = table
        out.tables[j, len(table):] = scratch
        out.starts[j] = p.start
    return Layout(tuple(offsets), tuple(lengths), row, bucket)
