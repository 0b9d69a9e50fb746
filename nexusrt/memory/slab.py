"""Sub-allocation of small tensors inside one page. Pure logic.

A slab is one arena page cut into blocks aligned to ``ALIGN`` bytes (256: what the
widest vector loads and TMA want). Free space is a sorted list of (offset, size) holes;
freeing merges a block with the holes beside it, so a slab whose blocks are all freed
is one hole again and its page can go back to the pool.
"""

from __future__ import annotations

from .extents import Extents

ALIGN = 256


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Slab:
    """Holes and use of one page; ``slot`` is the page's slot in the arena."""

    def __init__(self, slot: int, kind: str, size: int):
        self.slot, self.kind, self.size = slot, kind, size
        self.holes = Extents(0, size)
        self.used = 0
        self.blocks = 0

    @property
    def largest_hole(self) -> int:
        return self.holes.largest()

    def alloc(self, size: int) -> int | None:
        """Offset of a new block of ``size`` bytes (a multiple of ALIGN), or None when full."""
        off = self.holes.first_fit(size)  # first fit keeps the low end dense and the tail whole
        if off is not None:
            self.used += size
            self.blocks += 1
        return off

    def free(self, off: int, size: int) -> None:
        """Return the block at ``off``; merges with neighbouring holes."""
        self.holes.give(off, size)
        self.used -= size
        self.blocks -= 1

    @property
    def empty(self) -> bool:
        return self.blocks == 0

    def verify(self) -> list[str]:
        problems = [f"slab {self.slot}: {p}" for p in self.holes.verify()]
        if self.holes.total() + self.used != self.size:
            problems.append(f"slab {self.slot}: holes {self.holes.total()} + used {self.used} != {self.size}")
        return problems
