"""Chunked prefill over a fixed set of chunk sizes (buckets), so every prompt length reuses
the same few captured graphs. Plain logic: no driver, tested on the CPU.

A prompt of ``n`` tokens becomes chunks of bucket sizes; only the last chunk may be padded
(its extra rows are computed and discarded: they write K/V past the prompt, at positions
the next decode step or chunk overwrites before anything reads them, since attention
only reads keys at or before a row's own position). Padding is accepted when it costs at
most an eighth of the real rows, or when only the smallest bucket is left.
"""

from __future__ import annotations

BUCKETS = (64, 256, 1024, 2048, 4096, 8192)
MAX_PAD_FRACTION = 1 / 8


def buckets_for(max_context: int, buckets: tuple[int, ...] = BUCKETS) -> tuple[int, ...]:
    """The buckets a runner of ``max_context`` tokens needs: all below it and the first at or
    above it (a chunk never needs to be longer than the context)."""
    if max_context < 1:
        raise ValueError(f"max_context must be >= 1, got {max_context}")
    out = []
    for b in sorted(buckets):
        out.append(b)
        if b >= max_context:
            break
    return tuple(out)


def plan_chunks(n: int, buckets: tuple[int, ...], start: int = 0, capacity: int | None = None) -> list[tuple[int, int]]:
    """``(bucket, real_rows)`` per chunk for ``n`` tokens starting at position ``start``.

    ``capacity`` is how many positions the cache can hold (rows of a padded chunk land there
    too); the smallest bucket must always fit: ``start + n + min(buckets) - 1 <= capacity``.
    """
    if n < 1:
        raise ValueError(f"a prefill needs at least one token, got {n}")
    bs = sorted(buckets)
    if not bs or bs[0] < 1:
        raise ValueError(f"buckets must be positive sizes, got {buckets}")
    capacity = start + n + bs[0] - 1 if capacity is None else capacity
    if start + n + bs[0] - 1 > capacity:
        raise ValueError(f"{n} tokens at position {start} padded to a {bs[0]}-row chunk need "
                         f"{start + n + bs[0] - 1} cache positions; the cache has {capacity}")
    chunks, pos, left = [], start, n
    while left:
        fits = [b for b in bs if pos + b <= capacity]
        above = [b for b in fits if b >= left]
        below = [b for b in fits if b <= left]
        if above and (above[0] - left <= left * MAX_PAD_FRACTION or not below):
            b = above[0]
        else:
            b = below[-1]
        real = min(b, left)
        chunks.append((b, real))
        pos += real
        left -= real
    return chunks
