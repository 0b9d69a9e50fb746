"""The arena's page table: what each page slot of the reserved range holds. Pure logic.

A slot is one page of virtual addresses. It is *mapped* (a physical page of some kind is
behind it) or not, and *used* (part of a live run or a slab) or not. Used slots are
always mapped. The unused slots are kept as sorted extents so that finding a
contiguous run is a walk over a few extents, not over every slot.
"""

from __future__ import annotations

from .extents import Extents


class PageTable:
    """Slot states for ``n_slots`` pages plus the free (unused) extents."""

    def __init__(self, n_slots: int):
        self.n_slots = n_slots
        self.handle: list = [None] * n_slots  # physical page mapped at the slot
        self.kind: list = [None] * n_slots  # its kind ("plain"/"compressed") while mapped
        self.used = bytearray(n_slots)
        self.free = Extents(0, n_slots)  # the unused slots
        self.mapped_count = 0
        self.used_count = 0
        self.mapped_high = 0  # no slot at or above this was ever mapped: scans start below it

    # -- mapping -----------------------------------------------------------------------
    def set_mapped(self, slot: int, handle, kind: str) -> None:
        assert self.handle[slot] is None, f"slot {slot} is already mapped"
        self.handle[slot], self.kind[slot] = handle, kind
        self.mapped_count += 1
        self.mapped_high = max(self.mapped_high, slot + 1)

    def clear_mapped(self, slot: int):
        """Forget the page at ``slot``; returns its handle."""
        assert not self.used[slot], f"slot {slot} is in use"
        handle = self.handle[slot]
        assert handle is not None, f"slot {slot} is not mapped"
        self.handle[slot] = self.kind[slot] = None
        self.mapped_count -= 1
        return handle

    def mapped_slots(self) -> list[int]:
        return [i for i, h in enumerate(self.handle[:self.mapped_high]) if h is not None]

    # -- free extents ------------------------------------------------------------------
    def extents(self) -> list[tuple[int, int]]:
        """The unused extents as (start, length), lowest address first."""
        return list(self.free)

    def largest_free(self) -> int:
        return self.free.largest()

    def take(self, start: int, n: int) -> None:
        """Mark ``[start, start+n)`` used; it must lie inside one free extent and be mapped."""
        if any(self.handle[slot] is None for slot in range(start, start + n)):
            raise AssertionError(f"slots [{start}, {start + n}) taken while unmapped")
        self.free.take(start, n)
        self.used[start:start + n] = b"\x01" * n
        self.used_count += n

    def give(self, start: int, n: int) -> None:
        """Mark ``[start, start+n)`` unused again, merging with neighbouring extents."""
        self.free.give(start, n)
        self.used[start:start + n] = bytes(n)
        self.used_count -= n

    def unused_mapped_from_top(self):
        """Unused but mapped slots, highest first (the ones to give back first)."""
        for s, ln in reversed(list(self.free)):
            # Runs are placed first-fit, so mapped pages sit low in a large range: start
            # below the highest slot ever mapped instead of walking the whole range.
            for slot in range(min(s + ln, self.mapped_high) - 1, s - 1, -1):
                if self.handle[slot] is not None:
                    yield slot

    def verify(self) -> list[str]:
        """Invariant violations (empty when consistent); for tests and debugging."""
        problems = self.free.verify()
        free = bytearray(self.n_slots)
        for s, ln in self.free:
            free[s:s + ln] = b"\x01" * ln
        for slot in range(self.n_slots):
            if bool(free[slot]) == bool(self.used[slot]):
                problems.append(f"slot {slot}: used={self.used[slot]} but free-extent={free[slot]}")
            if self.used[slot] and self.handle[slot] is None:
                problems.append(f"slot {slot} is used but unmapped")
        if self.mapped_count != sum(h is not None for h in self.handle):
            problems.append("mapped_count disagrees with the slots")
        if self.used_count != sum(self.used):
            problems.append("used_count disagrees with the slots")
        return problems
