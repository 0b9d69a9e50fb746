"""Checks on device tensors as the kernel launchers receive them.

A launcher accepts a tensor (anything with ``.ptr``, and ideally ``.shape``/``.dtype``) or a
raw device address (an int). Shapes are checked whenever the argument carries one; raw
addresses can only be checked for alignment, so callers passing ints own the shapes. These
live with the tensors so that the KV cache's pool checks (:mod:`nexusrt.kvcache`) and the
launchers (:mod:`nexusrt.kernels.ops`) share them from below.
"""

from __future__ import annotations

from .dtypes import resolve


def dtype_name(dtype) -> str:
    """The memory layer's dtype name (``bf16``, ``fp32``, ``int32``...) for any spelling."""
    try:
        return resolve(getattr(dtype, "name", dtype) if not isinstance(dtype, str) else dtype).name
    except (ValueError, TypeError):
        return str(dtype)


def ptr(t) -> int:
    """The device address of a tensor, an int address as is, 0 for None."""
    if t is None:
        return 0
    p = getattr(t, "ptr", t)
    if not isinstance(p, int):
        p = int(p)
    return p


def check_tensor(t, name: str, shape: tuple[int, ...] | None, dtype: str | None) -> None:
    """Raise ValueError if ``t`` (when it carries shape/dtype) does not match."""
    if t is None:
        raise ValueError(f"{name} is required")
    if ptr(t) == 0:
        raise ValueError(f"{name} is a null device address")
    tshape = getattr(t, "shape", None)
    if shape is not None and tshape is not None:
        tshape = tuple(int(s) for s in tshape)
        if _numel(tshape) != _numel(shape) or (len(tshape) == len(shape) and tshape != tuple(shape)):
            raise ValueError(f"{name} has shape {tshape}, expected {tuple(shape)}")
    tdtype = getattr(t, "dtype", None)
    if dtype is not None and tdtype is not None and dtype_name(tdtype) != dtype:
        raise ValueError(f"{name} has dtype {dtype_name(tdtype)}, expected {dtype}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
