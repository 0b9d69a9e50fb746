"""The ring variant of the one-token decode GEMV (``cu/gemv_ring.cuh``): each warp's weights are
streamed by the bulk-copy engine (``cp.async.bulk``) into its own slots of shared memory,
``stages`` steps ahead, instead of into registers. sm_90+ only; off unless asked for.

Measured on the H200 it is slower than the register kernels (BENCHMARKS.md, "The bulk-copy
weight ring"), so the GEMV launchers (``gemv.gemv`` for the rows and gate_up kinds,
``qkv_rope.qkv_rope``) take it only with ``NEXUSRT_GEMV_RING=1`` or ``ring=True``, and only where
it applies: one token, x unsplit, K a multiple of 8, an sm_90+ device. It gives the same bits as
the register kernels. The x planes (K * 4 bytes) and every warp's slots share the block's shared
memory; ``NEXUSRT_GEMV_RING_STAGES=<n>`` caps the slots per warp, and with fewer slots more
blocks fit an SM (for comparisons in the same run).
"""

from __future__ import annotations

import os

from .common import cc_at_least, env_int

SOURCE = "gemv_ring"
ENV = "NEXUSRT_GEMV_RING"
STAGES_ENV = "NEXUSRT_GEMV_RING_STAGES"
WARPS = 8  # kWarps of gemv_body.cuh
SLOT_BYTES = 4096  # one step of one warp: RPW * U * 32 chunks of 16 bytes (RPW * U = 8 in every kind)
BARRIER_BYTES = 8
SMEM_OPTIN = 227 * 1024  # sm_90's per-block opt-in
STATIC_RESERVE = 1024  # the kernels' static shared memory (144 bytes) and the driver's per-block share
MIN_STAGES = 2  # one slot being summed, one in flight
MAX_STAGES = 8  # past this the block's first fills outlast any kernel boundary they could hide


def enabled() -> bool:
    """``NEXUSRT_GEMV_RING=1`` asks the launchers for the ring (default: the register kernels)."""
    raw = os.environ.get(ENV, "").strip()
    if raw not in ("", "0", "1"):
        raise ValueError(f"{ENV}={raw!r}: expected 1 (the bulk-copy ring), 0 or unset (the register kernels)")
    return raw == "1"


def shared_bytes(k: int, stages: int) -> int:
    """Dynamic shared memory of one block: the x planes, then each warp's slots and barriers."""
    return k * 4 + WARPS * stages * (SLOT_BYTES + BARRIER_BYTES)


def stages_for(rt, k: int, ring: bool | None = None) -> int | None:
    """Slots per warp for rows of length ``k`` on ``rt``'s device, or None for the register kernel:
    ``ring`` False, or None and ``NEXUSRT_GEMV_RING`` not 1; or where the ring does not apply (not
    sm_90+, K not a multiple of 8, fewer than two slots fit beside x)."""
    if ring is None:
        ring = enabled()
    if not ring or k % 8 or not cc_at_least(rt, (9, 0)):  # the bulk-copy engine is sm_90's
        return None
    optin = int(getattr(getattr(rt, "profile", None), "shared_memory_per_block_optin", 0) or SMEM_OPTIN)
    budget = min(optin, SMEM_OPTIN) - STATIC_RESERVE - k * 4
    cap = env_int(STAGES_ENV, MIN_STAGES, MAX_STAGES) or MAX_STAGES
    stages = min(cap, budget // (WARPS * (SLOT_BYTES + BARRIER_BYTES)))
    return stages if stages >= MIN_STAGES else None
