"""A progress bar on stderr for loads that take longer than a second.

``ProgressBar`` is the ``progress(done_bytes, total_bytes)`` callable the loader takes.
It draws nothing for the first ``delay`` seconds (short loads stay quiet), nothing when
the stream is not a terminal (logs and pipes stay clean), and nothing when disabled
(``--json``). It redraws at most ten times a second.
"""

from __future__ import annotations

import sys
import time

WIDTH = 30


class ProgressBar:
    """``bar(done, total)`` while loading, ``bar.close()`` after (ends the line if one was drawn)."""

    def __init__(self, label: str = "loading", *, stream=None, enabled: bool = True, delay: float = 1.0,
                 clock=time.monotonic):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(enabled and isatty is not None and isatty())
        self.delay, self.clock = delay, clock
        self.start = clock()
        self._last = -1.0
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        elapsed = now - self.start
        if elapsed < self.delay or (now - self._last < 0.1 and done < total):
            return
        self._last = now
        frac = done / total if total else 1.0
        fill = int(frac * WIDTH)
        rate = done / elapsed / 1e9 if elapsed > 0 else 0.0
        self.stream.write(f"\r{self.label} [{'#' * fill}{'.' * (WIDTH - fill)}] {frac:6.1%} "
                          f"{done / 1e9:.2f}/{total / 1e9:.2f} GB {rate:.2f} GB/s")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
