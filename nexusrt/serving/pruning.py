"""KV pruning policies: which cached tokens a sequence keeps when its cache passes its budget.

Three policies, chosen per request (:class:`KvPolicy`):

- ``full`` (default): keep everything; nothing here runs, and results are the unpruned ones.
- ``sink-window`` (StreamingLLM): the first ``sinks`` tokens plus the most recent
  ``budget - sinks``.
- ``h2o`` (H2O): the ``sinks``, a protected recent ``window``, and among the rest the tokens
  with the highest *accumulated attention mass* (softmax weight summed over every query row
  that saw the token, every head and every layer), which the runner adds up while it computes
  attention (``Rows.scores``; on CUDA the decode attention kernels' scores twins): no extra pass
  over the KV.

Tokens are never re-positioned. A key was rotated by RoPE at its own position when it was
written and keeps that rotation; a new query is rotated at its true absolute position. So
the relative distance a query sees to every kept key is the true one, and a kept token's K/V
are bit-identical to the unpruned run's. StreamingLLM instead re-rotates keys to their slot
in the cache so positions never exceed the trained range; our models' contexts fit their
RoPE range, and re-rotation would change kept keys' K on every eviction, so we do not offer it.

``protect`` lists position ranges ``[lo, hi)`` that are never evicted (the layered
context's L0-L2: :class:`~nexusrt.engine.context.Context`). Protected tokens count against
the budget; a budget they fill leaves only them, the sinks and the newest token.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgument

POLICIES = ("full", "sink-window", "h2o")
DEFAULT_SINKS = 4  # StreamingLLM's sink count


@dataclass(frozen=True)
class KvPolicy:
    """A request's pruning policy. ``budget``: most tokens kept in the cache (None: no cap, only
    with ``full``); ``sinks``: leading tokens always kept; ``window``: the recent tokens always
    kept (``sink-window``: ``budget - sinks``, fixed; ``h2o``: default ``budget // 2 - sinks // 2``)."""

    policy: str = "full"
    budget: int | None = None
    sinks: int = DEFAULT_SINKS
    window: int | None = None
    protect: tuple = ()

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise InvalidArgument("kv_policy", f"kv_policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        for name in ("budget", "sinks", "window"):
            v = getattr(self, name)
            if isinstance(v, numbers.Integral) and not isinstance(v, bool) and type(v) is not int:
                v = int(v)  # a NumPy integer
                object.__setattr__(self, name, v)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise InvalidArgument(f"kv_{name}", f"kv_{name} must be an integer >= 0, got {v!r}")
        if self.policy == "full":
            return
        if self.budget is None:
            raise InvalidArgument("kv_budget", f"kv_policy {self.policy!r} needs kv_budget (tokens kept)")
        if self.budget <= self.sinks:
            raise InvalidArgument("kv_budget", f"kv_budget ({self.budget}) must exceed kv_sinks ({self.sinks}): "
                             "the sinks alone would fill it")
        if self.window is not None and self.policy != "h2o":  # sink-window's window is budget - sinks
            raise InvalidArgument("kv_window", f"kv_window applies to kv_policy 'h2o'; with {self.policy!r} the "
                                               "window is kv_budget - kv_sinks")
        if self.window is not None and self.sinks + self.window > self.budget:
            raise InvalidArgument("kv_window", f"kv_sinks + kv_window ({self.sinks} + {self.window}) exceed "
                                               f"kv_budget ({self.budget})")
        for r in self.protect:
            if not (isinstance(r, tuple) and len(r) == 2 and 0 <= r[0] <= r[1]):
                raise InvalidArgument("kv_protect", f"protected ranges must be (lo, hi) with 0 <= lo <= hi, got {r!r}")

    @property
    def prunes(self) -> bool:
        return self.policy != "full"

    @property
    def recent(self) -> int:
        """Recent tokens always kept."""
        if self.policy == "sink-window":
            return self.budget - self.sinks
        return self.budget // 2 - self.sinks // 2 if self.window is None else self.window

    @property
    def stable_prefix(self) -> int:
        """Leading positions this policy never evicts (the sinks and a protected range from 0):
        the KV blocks wholly inside them may be shared through the prefix cache."""
        end = self.sinks
        for lo, hi in sorted(self.protect):
            if lo <= end:
                end = max(end, hi)
        return end


def keep_slots(policy: KvPolicy, positions: np.ndarray, scores: np.ndarray | None) -> np.ndarray:
    """The cache slots to keep (ascending) of a cache holding tokens at ``positions`` (ascending,
    one per slot), at most ``policy.budget`` of them; ``scores`` (``h2o``) are their accumulated
    attention mass. All slots when the cache is within budget."""
    n = len(positions)
    if not policy.prunes or n <= policy.budget:
        return np.arange(n)
    keep = np.zeros(n, bool)
    keep[:policy.sinks] = True
    keep[n - min(policy.recent, n):] = True
    for lo, hi in policy.protect:
        keep |= (positions >= lo) & (positions < hi)
    room = policy.budget - int(keep.sum())
    if room > 0 and policy.policy == "h2o":
        rest = np.flatnonzero(~keep)
        # stable sort on -score: ties keep the older token, so the choice is deterministic
        best = rest[np.argsort(-scores[rest], kind="stable")[:room]]
        keep[best] = True
    elif room < 0:  # protected ranges overfill the budget: drop the oldest unprotected tokens kept
        prot = np.zeros(n, bool)
        prot[:policy.sinks] = prot[-1] = True
        for lo, hi in policy.protect:
            prot |= (positions >= lo) & (positions < hi)
        keep[np.flatnonzero(keep & ~prot)[:-room]] = False
    return np.flatnonzero(keep)


def prune(policy: KvPolicy, positions: np.ndarray, scores: np.ndarray | None, compact) -> tuple:
    """Evict a cache down to ``policy.budget``: ``compact(keep)`` moves the kept slots to the
    front (the runner's K/V); returns the kept ``positions``, ``scores`` and the count dropped.
    The serving engine and ``nexusrt-bench --stage kv`` both prune through this."""
    keep = keep_slots(policy, positions, scores)
    if len(keep) == len(positions):
        return positions, scores, 0
    compact(keep)
    return positions[keep], None if scores is None else scores[keep], len(positions) - len(keep)
