"""Element types and shape checks shared by every tensor NexusRT creates.

``DTYPES`` maps a NexusRT dtype name to its NumPy storage type and item size. bf16 and
fp8 come from ``ml_dtypes`` (NumPy has neither); fp8_e4m3 is storage only here: kernels
read it, the runtime moves it as bytes and converts on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from ..errors import InvalidArgument, InvalidArgumentType

# The largest tensor we describe: byte offsets are passed to kernels as signed 64-bit.
MAX_NBYTES = 2**63 - 1


def _numpy_max_ndim() -> int:
    """The most dimensions a NumPy array may have here (64 from NumPy 2, 32 before)."""
    for n in (64, 32):
        try:
            np.empty((1,) * n, np.uint8)
            return n
        except ValueError:
            continue
    return 32


# A tensor's host side is a NumPy array (``tensor.array``, ``to_numpy``): a shape with more
# dimensions would allocate and then fail at its first read, so it is refused up front.
MAX_NDIM = _numpy_max_ndim()


@dataclass(frozen=True)
class DType:
    """One element type: its name, NumPy dtype and size in bytes."""

    name: str
    numpy: np.dtype
    itemsize: int
    is_float: bool


def _entry(name: str, np_type, is_float: bool) -> DType:
    dt = np.dtype(np_type)
    return DType(name, dt, dt.itemsize, is_float)


DTYPES: dict[str, DType] = {
    "bf16": _entry("bf16", ml_dtypes.bfloat16, True),
    "fp16": _entry("fp16", np.float16, True),
    "fp32": _entry("fp32", np.float32, True),
    "fp8_e4m3": _entry("fp8_e4m3", ml_dtypes.float8_e4m3fn, True),
    "int8": _entry("int8", np.int8, False),
    "uint8": _entry("uint8", np.uint8, False),
    "int32": _entry("int32", np.int32, False),
    "int64": _entry("int64", np.int64, False),
}

# Spellings people type from other frameworks; each names exactly one entry above.
ALIASES = {
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32",
    "float8_e4m3fn": "fp8_e4m3", "fp8": "fp8_e4m3", "e4m3": "fp8_e4m3",
}

_BY_NUMPY = {d.numpy: d for d in DTYPES.values()}


def resolve(dtype, arg: str = "dtype") -> DType:
    """The :class:`DType` for a name, an alias, a :class:`DType` or a NumPy dtype.

    Raises ``ValueError`` naming ``arg`` and listing the valid names otherwise.
    """
    if isinstance(dtype, DType):
        return dtype
    if isinstance(dtype, str):
        key = ALIASES.get(dtype.lower(), dtype.lower())
        if key in DTYPES:
            return DTYPES[key]
    else:
        try:
            found = _BY_NUMPY.get(np.dtype(dtype))
        except TypeError:
            found = None
        if found is not None:
            return found
    raise ValueError(f"unknown {arg} {dtype!r}: valid dtypes are {', '.join(DTYPES)}")


def from_numpy_dtype(np_dtype, arg: str = "array") -> DType:
    """The :class:`DType` that stores ``np_dtype`` unchanged; ``ValueError`` if none does."""
    found = _BY_NUMPY.get(np.dtype(np_dtype))
    if found is None:
        raise ValueError(
            f"{arg} has dtype {np.dtype(np_dtype)}, which NexusRT does not store: pass dtype= "
            f"one of {', '.join(DTYPES)} to convert it"
        )
    return found


def check_shape(shape, arg: str = "shape") -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints; ``ValueError`` naming ``arg`` otherwise.

    An int means a 1-D shape; ``()`` is a scalar of one element.
    """
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    # The type errors are InvalidArgumentType: a TypeError, and a ValueError as they always were.
    try:
        dims = tuple(shape)
    except TypeError:
        raise InvalidArgumentType(arg, f"{arg} must be a tuple of ints, got {shape!r}") from None
    if len(dims) > MAX_NDIM:
        raise InvalidArgument(arg, f"{arg} has {len(dims)} dimensions; at most {MAX_NDIM} are supported "
                                   f"(NumPy's limit, which tensor.array and to_numpy() go through)")
    out = []
    for i, d in enumerate(dims):
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise InvalidArgumentType(arg, f"{arg}[{i}] must be an int, got {d!r} in {arg}={dims!r}")
        if d <= 0:
            raise InvalidArgument(arg, f"{arg}[{i}] is {int(d)}: every dimension must be positive ({arg}={dims!r})")
        out.append(int(d))
    return tuple(out)


def numel_of(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def nbytes_of(shape: tuple[int, ...], dtype: DType, arg: str = "shape") -> int:
    """Bytes of a tensor; ``ValueError`` naming ``arg`` when the size overflows 64 bits."""
    nbytes = numel_of(shape) * dtype.itemsize
    if nbytes > MAX_NBYTES:
        raise ValueError(f"{arg}={shape!r} of {dtype.name} overflows: {nbytes} bytes is more than 2**63-1")
    return nbytes
