"""Paged KV cache bookkeeping: which physical page holds each logical page of a sequence.

Plain logic, no device. A layer's cache is a pool ``[num_pages, Hkv, PAGE_SIZE, D]``; a
sequence's page table maps logical page ``t // PAGE_SIZE`` to a physical page and token
``t`` sits in slot ``t % PAGE_SIZE`` of it. The same table serves every layer, so one
:class:`PagePool` hands out page *indices* valid in all layers' pools at once.

The kernels (rope_append, attention_*) read the table as int32 from device memory; the
runner uploads :meth:`SequencePages.table` whenever :meth:`SequencePages.ensure` grew it.
:func:`scatter_tokens` / :func:`gather_tokens` are the NumPy meaning of that layout, used
by tests and by the CPU side to check a cache.
"""

from __future__ import annotations

import numpy as np

from ..errors import OutOfMemory
from ..kernels.ops.common import PAGE_SIZE


def pages_for(tokens: int) -> int:
    """Pages needed to hold ``tokens`` tokens."""
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return -(-tokens // PAGE_SIZE)


def pool_shape(num_pages: int, num_kv_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """The shape of one layer's K (or V) pool."""
    return (num_pages, num_kv_heads, PAGE_SIZE, head_dim)


class PagePool:
    """The free physical pages ``0 .. num_pages-1``.

    ``order`` sets the order pages are handed out (a permutation of ``range(num_pages)``);
    tests pass a shuffled one so a sequence's pages are scattered through the pool.
    """

    def __init__(self, num_pages: int, order=None):
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        self.num_pages = int(num_pages)
        seq = list(range(self.num_pages)) if order is None else [int(p) for p in order]
        if sorted(seq) != list(range(self.num_pages)):
            raise ValueError(f"order must be a permutation of range({self.num_pages})")
        self._free = seq[::-1]  # pop() from the end hands them out in `order`
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        """``n`` free pages; :class:`OutOfMemory` (nothing taken) when fewer are left."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise OutOfMemory(n, len(self._free), "KV page pool (pages)")
        pages = [self._free.pop() for _ in range(n)]
        self._used.update(pages)
        return pages

    def free(self, pages) -> None:
        """Return pages; a page that is not allocated is a bug and raises ValueError."""
        pages = [int(p) for p in pages]
        bad = [p for p in pages if p not in self._used]
        if bad or len(set(pages)) != len(pages):
            raise ValueError(f"freeing pages that are not allocated (or twice): {bad or pages}")
        for p in pages:
            self._used.discard(p)
            self._free.append(p)


class SequencePages:
    """The page table of one sequence, grown on demand from a :class:`PagePool`."""

    def __init__(self, pool: PagePool, max_pages: int):
        if max_pages <= 0:
            raise ValueError(f"max_pages must be positive, got {max_pages}")
        self.pool, self.max_pages = pool, int(max_pages)
        self.pages: list[int] = []

    @property
    def capacity(self) -> int:
        """Tokens the allocated pages hold."""
        return len(self.pages) * PAGE_SIZE

    def ensure(self, tokens: int) -> bool:
        """Make room for positions ``0 .. tokens-1``; True when pages were added."""
        need = pages_for(tokens)
        if need > self.max_pages:
            raise ValueError(f"{tokens} tokens need {need} pages; the table holds {self.max_pages} "
                             f"({self.max_pages * PAGE_SIZE} tokens)")
        if need <= len(self.pages):
            return False
        self.pages += self.pool.alloc(need - len(self.pages))
        return True

    def locate(self, t: int) -> tuple[int, int]:
        """(physical page, slot) of token ``t``."""
        if not 0 <= t < self.capacity:
            raise IndexError(f"token {t} is outside the {self.capacity} allocated positions")
        return self.pages[t // PAGE_SIZE], t % PAGE_SIZE

    def table(self, fill: int = 0) -> np.ndarray:
        """The int32 table ``[max_pages]`` the kernels read; unused entries hold ``fill``
        (never read by a kernel: they lie past the sequence length)."""
        out = np.full(self.max_pages, fill, dtype=np.int32)
        out[:len(self.pages)] = self.pages
        return out

    def release(self) -> None:
        """Give every page back to the pool."""
        self.pool.free(self.pages)
        self.pages = []


def scatter_tokens(pool: np.ndarray, table, start: int, values: np.ndarray) -> None:
    """Write ``values [T, Hkv, D]`` as positions ``start .. start+T-1`` into ``pool``
    ``[num_pages, Hkv, PAGE_SIZE, D]`` through ``table`` (NumPy, in place)."""
    table = np.asarray(table)
    t = np.arange(start, start + values.shape[0])
    pool[table[t // PAGE_SIZE], :, t % PAGE_SIZE, :] = values


def gather_tokens(pool: np.ndarray, table, length: int) -> np.ndarray:
    """Positions ``0 .. length-1`` of ``pool`` through ``table`` as ``[length, Hkv, D]``."""
    table = np.asarray(table)
    t = np.arange(length)
    return pool[table[t // PAGE_SIZE], :, t % PAGE_SIZE, :]
