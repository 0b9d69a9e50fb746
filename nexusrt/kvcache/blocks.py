"""Paged KV cache bookkeeping: which physical KV block holds each logical block of a sequence.

Plain logic, no device. A *KV block* holds :data:`BLOCK_SIZE` consecutive tokens of one
layer's K (or V) for every KV head ("block" as in vLLM; "page" is kept for the 2 MiB VMM
pages of :mod:`nexusrt.memory`). A layer's cache is a pool ``[num_blocks, Hkv, BLOCK_SIZE,
D]``; a sequence's block table maps logical block ``t // BLOCK_SIZE`` to a physical block and
token ``t`` sits in slot ``t % BLOCK_SIZE`` of it. The same table serves every layer, so one
:class:`BlockPool` hands out block *indices* valid in all layers' pools at once.

The kernels (rope_append, attention_*) read the table as int32 from device memory; the
runner uploads :meth:`SequenceBlocks.table` whenever :meth:`SequenceBlocks.ensure` grew it.
:func:`scatter_tokens` / :func:`gather_tokens` are the NumPy meaning of that layout, used
by tests and by the CPU side to check a cache.
"""

from __future__ import annotations

import numpy as np

from ..errors import OutOfMemory

BLOCK_SIZE = 16  # tokens per KV block; the kernels' NRT_PAGE_SIZE (cu/common.cuh) must equal it


def check_count(value, name: str, minimum: int = 0) -> int:
    """``value`` as an int of at least ``minimum``: TypeError for a bool, float or str (``1.5``
    blocks must not quietly become 1, nor ``True`` become 1), ValueError below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {'positive' if minimum == 1 else f'>= {minimum}'}, got {value}")
    return int(value)


def block_indices(values, name: str) -> list[int]:
    """``values`` as a list of ints (NumPy integers converted); TypeError naming ``name`` for a
    float or bool among them (``0.7`` must not free block 0)."""
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"{name} must be an iterable of block indices, got {type(values).__name__}") from None
    # One pass over the types in C; the per-element check runs only when something is not an int.
    if set(map(type, values)) - {int}:
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must hold ints (block indices), got {type(v).__name__} {v!r}")
        values = [int(v) for v in values]
    return values


def blocks_for(tokens: int) -> int:
    """KV blocks needed to hold ``tokens`` tokens."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return -(-tokens // BLOCK_SIZE)


def pair_runs(pairs) -> list[tuple[int, int, int]]:
    """``(source, destination)`` block pairs as ``(source, destination, count)`` copies, in the given
    order: a pair that continues the last run on both sides joins it, so consecutive blocks going
    to consecutive blocks are one copy per layer and K/V, not one per block."""
    out: list[list[int]] = []
    for src, dst in pairs:
        src, dst = int(src), int(dst)
        if out and src == out[-1][0] + out[-1][2] and dst == out[-1][1] + out[-1][2]:
            out[-1][2] += 1
        else:
            out.append([src, dst, 1])
    return [tuple(r) for r in out]


def pool_shape(num_blocks: int, num_kv_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """The shape of one layer's K (or V) pool."""
    return (num_blocks, num_kv_heads, BLOCK_SIZE, head_dim)


class BlockPool:
    """The free physical KV blocks ``0 .. num_blocks-1``.

    ``order`` sets the order blocks are handed out (a permutation of ``range(num_blocks)``);
    tests pass a shuffled one so a sequence's blocks are scattered through the pool.
    """

    def __init__(self, num_blocks: int, order=None):
        self.num_blocks = check_count(num_blocks, "num_blocks", 1)
        seq = list(range(self.num_blocks)) if order is None else block_indices(order, "order")
        if sorted(seq) != list(range(self.num_blocks)):
            raise ValueError(f"order must be a permutation of range({self.num_blocks})")
        self._free = seq[::-1]  # pop() from the end hands them out in `order`
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def free_blocks(self) -> frozenset[int]:
        """The blocks not handed out (a copy, for audits)."""
        return frozenset(self._free)

    def alloc(self, n: int) -> list[int]:
        """``n`` free blocks; :class:`OutOfMemory` (nothing taken) when fewer are left."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"n must be an int (blocks), got {type(n).__name__} {n!r}")
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise OutOfMemory(n, len(self._free), "KV block pool", unit="blocks")
        blocks = [self._free.pop() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks) -> None:
        """Return blocks; a block that is not allocated is a bug and raises ValueError."""
        blocks = block_indices(blocks, "blocks")
        bad = [b for b in blocks if b not in self._used]
        if bad or len(set(blocks)) != len(blocks):
            raise ValueError(f"freeing blocks that are not allocated (or twice): {bad or blocks}")
        for b in blocks:
            self._used.discard(b)
            self._free.append(b)


class SequenceBlocks:
    """The block table of one sequence, grown on demand from a :class:`BlockPool`."""

    def __init__(self, pool: BlockPool, max_blocks: int):
        self.pool, self.max_blocks = pool, check_count(max_blocks, "max_blocks", 1)
        self.blocks: list[int] = []

    @property
    def capacity(self) -> int:
        """Tokens the allocated blocks hold."""
        return len(self.blocks) * BLOCK_SIZE

    def ensure(self, tokens: int) -> bool:
        """Make room for positions ``0 .. tokens-1``; True when blocks were added."""
        if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)):
            raise TypeError(f"tokens must be an int, got {type(tokens).__name__} {tokens!r}")
        need = blocks_for(tokens)
        if need > self.max_blocks:
            raise ValueError(f"{tokens} tokens need {need} KV blocks; the table holds {self.max_blocks} "
                             f"({self.max_blocks * BLOCK_SIZE} tokens)")
        if need <= len(self.blocks):
            return False
        self.blocks += self.pool.alloc(need - len(self.blocks))
        return True

    def locate(self, t: int) -> tuple[int, int]:
        """(physical block, slot) of token ``t``."""
        if not 0 <= t < self.capacity:
            raise IndexError(f"token {t} is outside the {self.capacity} allocated positions")
        return self.blocks[t // BLOCK_SIZE], t % BLOCK_SIZE

    def table(self, fill: int = 0) -> np.ndarray:
        """The int32 table ``[max_blocks]`` the kernels read; unused entries hold ``fill``
        (never read by a kernel: they lie past the sequence length)."""
        out = np.full(self.max_blocks, fill, dtype=np.int32)
        out[:len(self.blocks)] = self.blocks
        return out

    def release(self) -> None:
        """Give every block back to the pool."""
        self.pool.free(self.blocks)
        self.blocks = []


def scatter_tokens(pool: np.ndarray, table, start: int, values: np.ndarray) -> None:
    """Write ``values [T, Hkv, D]`` as positions ``start .. start+T-1`` into ``pool``
    ``[num_blocks, Hkv, BLOCK_SIZE, D]`` through ``table`` (NumPy, in place)."""
    table = np.asarray(table)
    t = np.arange(start, start + values.shape[0])
    pool[table[t // BLOCK_SIZE], :, t % BLOCK_SIZE, :] = values


def gather_tokens(pool: np.ndarray, table, length: int) -> np.ndarray:
    """Positions ``0 .. length-1`` of ``pool`` through ``table`` as ``[length, Hkv, D]``."""
    table = np.asarray(table)
    t = np.arange(length)
    return pool[table[t // BLOCK_SIZE], :, t % BLOCK_SIZE, :]


def check_pairs(pairs, src_blocks: int, dst_blocks: int, what: str) -> None:
    """Refuse ``(source, destination)`` block pairs naming a block outside a pool of ``src_blocks``
    (sources) or ``dst_blocks`` (destinations), or one destination twice (the copies of one
    direction may run in any order: the GPU issues them as one batch): every runner's
    ``swap_blocks`` checks this before it copies anything."""
    if not pairs:
        return
    src, dst = (np.asarray(x, np.int64) for x in zip(*pairs))
    if src.min() < 0 or src.max() >= src_blocks or dst.min() < 0 or dst.max() >= dst_blocks:
        raise ValueError(f"swap_blocks: a {what} pair names a block outside its pool "
                         f"({src_blocks} source / {dst_blocks} destination blocks)")
    uniq, counts = np.unique(dst, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"swap_blocks: block {int(uniq[counts > 1][0])} is the destination of two {what} pairs")


def check_keep(table, keep, num_blocks: int) -> np.ndarray:
    """``keep`` as int64 after checking it for a compaction of ``table`` over a pool of ``num_blocks``
    blocks (every runner's ``compact`` checks this before it moves anything): ascending without
    repeats, every kept slot inside the table and every block of the table inside the pool."""
    keep = np.asarray(keep)
    if keep.ndim != 1 or (len(keep) and keep.dtype.kind not in "iu"):
        raise ValueError(f"compact: keep must be a 1-d array of integer slots, got {keep.dtype} {keep.shape}")
    keep = keep.astype(np.int64)
    if len(keep) and (np.any(np.diff(keep) <= 0) or keep[0] < 0):
        raise ValueError("compact: the kept slots must be >= 0 and ascend without repeats")
    blocks = np.asarray(table)
    if len(keep) and ((len(blocks) and (blocks.min() < 0 or blocks.max() >= num_blocks))
                      or keep[-1] >= len(blocks) * BLOCK_SIZE):
        raise ValueError("compact: a kept slot or a block lies outside the table or the pool")
    return keep


def compact_tokens(pool: np.ndarray, table, keep) -> None:
    """Move slots ``keep`` (ascending) of ``pool`` through ``table`` to slots ``0 .. len(keep)-1``.

    Gathered before written, so a slot may move onto one that is itself moving (KV pruning
    compacts a sequence's kept tokens to the front of its blocks; the blocks past them are freed).
    """
    keep = np.asarray(keep, dtype=np.int64)
    scatter_tokens(pool, table, 0, gather_tokens(pool, table, int(keep[-1]) + 1 if len(keep) else 0)[keep])
