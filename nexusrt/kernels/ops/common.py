"""Helpers shared by the launchers: constants from ``cu/common.cuh``, argument checks, occupancy.

The tensor checks (:func:`check_tensor`, :func:`ptr`, :func:`dtype_name`) live in
:mod:`nexusrt.memory.checks`, beside the tensors, where the KV cache's checks use them too.
"""

from __future__ import annotations

import os

from ...memory.checks import check_tensor, dtype_name, ptr  # noqa: F401  (the launchers' checks)

# Epilogue flags, identical in gemv_body.cuh (gemv.cu, gemv_rope.cu) and gemm.cu.
FLAG_BIAS = 1
FLAG_BIAS_BF16 = 2
FLAG_RESIDUAL = 4
FLAG_NORM = 8


def check_aligned(t, name: str, align: int) -> None:
    if ptr(t) % align:
        raise ValueError(f"{name} at {ptr(t):#x} is not {align}-byte aligned")


def check_positive(**dims: int) -> None:
    for k, v in dims.items():
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{k} must be a positive int, got {v!r}")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def bias_flags(bias, bias_dtype: str | None) -> int:
    """Flags for an optional bias of dtype bf16 or f32 (read off the tensor when it has one)."""
    if bias is None:
        return 0
    name = dtype_name(bias_dtype or getattr(bias, "dtype", None) or "")
    if name == "bf16":
        return FLAG_BIAS | FLAG_BIAS_BF16
    if name == "fp32":
        return FLAG_BIAS
    raise ValueError(f"bias must be bf16 or fp32 (pass bias_dtype= with a raw address), got {name or 'unknown'}")


def epilogue_flags(*, m: int, n: int, k: int, rows: int, bias, bias_dtype: str | None, residual,
                   norm_weight) -> int:
    """Check the optional epilogue operands of a GEMV/GEMM and return the kernel's flags."""
    flags = bias_flags(bias, bias_dtype)
    if bias is not None:
        check_tensor(bias, "bias", (rows,), None)
    if residual is not None:
        check_tensor(residual, "residual", (m, n), "fp32")
        flags |= FLAG_RESIDUAL
    if norm_weight is not None:
        check_tensor(norm_weight, "norm_weight", (k,), "fp32")
        flags |= FLAG_NORM
    return flags


def sm_count(rt) -> int:
    """SMs of the runtime's device (132 on an H100 SXM)."""
    return int(getattr(rt.profile, "sm_count", 0) or 0) or 1


def resident_blocks(kernel, threads: int, shared: int) -> int:
    """Blocks of ``kernel`` one SM holds at once at this block size and dynamic shared memory
    (the driver's occupancy answer; 0 when it cannot hold one)."""
    from ...driver.calls import call

    return int(call("cuOccupancyMaxActiveBlocksPerMultiprocessor", kernel.function, int(threads), int(shared)))


def blocks_per_sm(kernel, threads: int, shared: int) -> int:
    """Resident blocks per SM for ``kernel``, at least 1 (a grid sized by it always launches)."""
    return max(1, resident_blocks(kernel, threads, shared))


def cc_at_least(rt, cc: tuple[int, int]) -> bool:
    """``rt``'s device has compute capability ``cc`` or later (False without a profile)."""
    return tuple(getattr(getattr(rt, "profile", None), "compute_capability", (0, 0))) >= cc


def env_int(name: str, low: int, high: int | None = None) -> int | None:
    """The integer in environment variable ``name`` (None when unset or blank), checked to lie in
    ``[low, high]``; anything else is a ValueError naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    value = int(raw) if raw.lstrip("-").isdigit() else None
    if value is None or value < low or (high is not None and value > high):
        want = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
        raise ValueError(f"{name}={raw!r}: expected {want} or unset")
    return value


def pdl_ok(rt) -> bool:
    """Programmatic dependent launch is available (sm_90+; see cu/pdl.cuh) and not turned off
    with ``NEXUSRT_PDL=0`` (for comparisons and diagnosis)."""
    if os.environ.get("NEXUSRT_PDL", "1") == "0":
        return False
    return cc_at_least(rt, (9, 0))
