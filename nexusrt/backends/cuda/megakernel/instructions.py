"""The persistent decode kernel's instruction format: one fixed-width int32 row per instruction.

An instruction is one tile of one op of the decode step. Its row, as the kernel will read it::

    [op, layer, start, end, arg, signal, nwaits, c0, t0, c1, t1, c2, t2, c3, t3, 0]

- ``op``: an :class:`Op`; ``layer``: the decoder layer (0 for ops outside the layers);
- ``start, end``: the half-open range along the op's output dimension (rows of a GEMV, KV
  heads for RoPE/append and attention, LM-head rows for a sampler partial);
- ``arg``: op specific: the KV-length split index of an attention part, the split count of a
  combine, the chunk index of a sampler partial or gather, the partial count of the finish;
- ``signal``: the counter the SM increments (with release semantics) once the tile's results
  are written, -1 for none;
- ``nwaits`` pairs ``(counter, target)``: the SM spins (acquire) until every counter has
  reached its target before it reads anything;
- the last word is 0 here; the runner writes the row's first weight-ring page into it when it
  uploads the program (``kernels/ops/persistent.py`` ``ring_page_starts``).

Sixteen int32 (64 bytes) per row keep every row aligned for one vectorised load.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

MAX_WAITS = 4
ROW_WORDS = 16  # 7 header words + 2 * MAX_WAITS + 1 pad word
_HEADER = 7


class Op(IntEnum):
    """What an instruction computes (see the module docstring for its range and argument)."""

    EMBED = 1  # x = embed[token]
    QKV = 2  # qkv[start:end] = rmsnorm(x) . Wqkv[start:end]^T (+ bias)
    ROPE_APPEND = 3  # KV heads start..end-1: q/k norm, RoPE on q and k, K and V into the pools
    ATTENTION = 4  # KV heads start..end-1 (their q heads), keys 0..pos; arg: split index
    ATTN_COMBINE = 5  # merge the arg splits of KV heads start..end-1 into attn
    O_PROJ = 6  # x[start:end] += attn . Wo[start:end]^T
    GATE_UP = 7  # mlp[start:end] = silu(rmsnorm(x) . Wg^T) * (rmsnorm(x) . Wu^T), rows start:end
    DOWN = 8  # x[start:end] += mlp . Wdown[start:end]^T
    LM_HEAD = 9  # logits[start:end] = rmsnorm(x) . Wlm[start:end]^T (final norm)
    # The sampler (the parameters are the runner's SampleParams, read on the device each step;
    # temperature > 0 runs the grid-wide top-K of cu/sampling_grid.cuh, see megakernel/topk.py):
    SAMPLE_PARTIAL = 10  # greedy: best (value, lowest index) of logits[start:end]; arg: chunk index.
    #                      temperature > 0: the chunk's key histogram, added to the grid's
    SAMPLE_FINISH = 11  # the next token: the best of the arg partials (greedy) or the exact top-K
    #                     draw (temperature / top-k / top-p, seeded) from the gathers' candidate
    #                     pool, or from all logits when the pool overflowed
    SAMPLE_GATHER = 12  # temperature > 0: the candidates of logits[start:end] into the pool (after
    #                     every partial); greedy: nothing, and its waits are skipped (it signals)


@dataclass(frozen=True)
class Instruction:
    """One tile of work; ``waits`` is a tuple of ``(counter, target)`` pairs."""

    op: Op
    layer: int
    start: int
    end: int
    arg: int = 0
    signal: int = -1
    waits: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        if len(self.waits) > MAX_WAITS:
            raise ValueError(f"{self.op.name} layer {self.layer}: {len(self.waits)} waits, the row holds {MAX_WAITS}")
        if self.end <= self.start:
            raise ValueError(f"{self.op.name} layer {self.layer}: empty range {self.start}..{self.end}")

    def row(self) -> np.ndarray:
        """The instruction as its int32 row of :data:`ROW_WORDS` words."""
        r = np.zeros(ROW_WORDS, np.int32)
        r[:_HEADER] = (int(self.op), self.layer, self.start, self.end, self.arg, self.signal, len(self.waits))
        for i, (c, t) in enumerate(self.waits):
            r[_HEADER + 2 * i:_HEADER + 2 * i + 2] = (c, t)
        return r

    @classmethod
    def from_row(cls, r) -> "Instruction":
        """The inverse of :meth:`row`."""
        r = [int(v) for v in r]
        n = r[6]
        waits = tuple((r[_HEADER + 2 * i], r[_HEADER + 2 * i + 1]) for i in range(n))
        return cls(Op(r[0]), r[1], r[2], r[3], r[4], r[5], waits)


def pack(lists: list[list[Instruction]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-SM lists as one ``[n, ROW_WORDS]`` int32 table plus ``offsets [num_sms + 1]``: SM ``s``
    runs rows ``offsets[s] .. offsets[s+1]-1`` in order (CSR, one upload for the whole program)."""
    offsets = np.zeros(len(lists) + 1, np.int32)
    offsets[1:] = np.cumsum([len(li) for li in lists])
    rows = [ins.row() for li in lists for ins in li]
    table = np.stack(rows) if rows else np.zeros((0, ROW_WORDS), np.int32)
    return table, offsets


def unpack(table: np.ndarray, offsets: np.ndarray) -> list[list[Instruction]]:
    """The inverse of :func:`pack`."""
    return [[Instruction.from_row(table[i]) for i in range(offsets[s], offsets[s + 1])]
            for s in range(len(offsets) - 1)]
