"""Free intervals kept sorted and merged: the free slots of the page table, the holes of a slab."""

from __future__ import annotations

from bisect import bisect_right


class Extents:
    """Disjoint, non-touching free intervals ``(start, length)``, lowest start first.

    Giving an interval back merges it with its neighbours, so space freed in any order
    ends as one interval again; an overlap with free space means a double free and
    raises AssertionError.
    """

    def __init__(self, start: int, length: int):
        self._starts: list[int] = [start] if length else []
        self._lens: list[int] = [length] if length else []

    def __iter__(self):
        return iter(zip(self._starts, self._lens))

    def largest(self) -> int:
        return max(self._lens, default=0)

    def total(self) -> int:
        return sum(self._lens)

    def first_fit(self, n: int) -> int | None:
        """Take ``n`` units from the lowest interval that holds them; its start, or None."""
        for s, ln in zip(self._starts, self._lens):
            if ln >= n:
                self.take(s, n)
                return s
        return None

    def take(self, start: int, n: int) -> None:
        """Remove ``[start, start+n)``, which must lie inside one free interval."""
        i = bisect_right(self._starts, start) - 1
        if i < 0 or start + n > self._starts[i] + self._lens[i]:
            raise AssertionError(f"[{start}, {start + n}) is not free")
        s, ln = self._starts[i], self._lens[i]
        del self._starts[i], self._lens[i]
        if s + ln > start + n:
            self._starts.insert(i, start + n)
            self._lens.insert(i, s + ln - (start + n))
        if start > s:
            self._starts.insert(i, s)
            self._lens.insert(i, start - s)

    def give(self, start: int, n: int) -> None:
        """Add ``[start, start+n)`` back, merging with the intervals it touches."""
        i = bisect_right(self._starts, start)
        if (i > 0 and self._starts[i - 1] + self._lens[i - 1] > start) or (
                i < len(self._starts) and start + n > self._starts[i]):
            raise AssertionError(f"[{start}, {start + n}) overlaps free space: freed twice?")
        left = i > 0 and self._starts[i - 1] + self._lens[i - 1] == start
        right = i < len(self._starts) and self._starts[i] == start + n
        if left and right:
            self._lens[i - 1] += n + self._lens[i]
            del self._starts[i], self._lens[i]
        elif left:
            self._lens[i - 1] += n
        elif right:
            self._starts[i] = start
            self._lens[i] += n
        else:
            self._starts.insert(i, start)
            self._lens.insert(i, n)

    def verify(self) -> list[str]:
        """Intervals that are empty, unsorted, overlapping or touching (should be merged)."""
        problems, prev_end = [], None
        for s, ln in self:
            if ln <= 0 or (prev_end is not None and s <= prev_end):
                problems.append(f"interval ({s}, {ln}) is empty, unsorted or touches the previous one")
            prev_end = s + ln
        return problems
