"""The default bound on blocking host waits (barriers, doorbells).

A wait on work that can never finish (a doorbell nobody rings, a hung kernel) used to block
forever by default. Now every such wait gives up after :func:`default_timeout_ms` and raises
an error naming what it waited for. ``NEXUSRT_WAIT_TIMEOUT_S`` changes the default (``inf``
waits forever); an explicit ``timeout_ms`` argument always wins.
"""

from __future__ import annotations

import math
import os

DEFAULT_TIMEOUT_S = 300.0  # far above any single step of real work, far below "hung forever"


def default_timeout_ms() -> float:
    """``NEXUSRT_WAIT_TIMEOUT_S`` in ms, else :data:`DEFAULT_TIMEOUT_S`; a bad value is an error."""
    raw = os.environ.get("NEXUSRT_WAIT_TIMEOUT_S", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S * 1e3
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (value > 0):  # also rejects nan
        raise ValueError(f"NEXUSRT_WAIT_TIMEOUT_S must be a positive number of seconds or inf, got {raw!r}")
    return value * 1e3


def deadline_ms(timeout_ms: float | None, now_s: float) -> float | None:
    """The absolute deadline (seconds, same clock as ``now_s``) for ``timeout_ms``, None for never.

    ``None`` means the default; ``math.inf`` means no limit.
    """
    if timeout_ms is None:
        timeout_ms = default_timeout_ms()
    if timeout_ms < 0 or math.isnan(timeout_ms):
        raise ValueError(f"timeout_ms must be non-negative, inf or None, got {timeout_ms}")
    return None if math.isinf(timeout_ms) else now_s + timeout_ms / 1e3
