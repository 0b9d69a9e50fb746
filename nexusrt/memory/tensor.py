"""Tensors: a shape and a dtype over bytes in the arena, in pinned host memory or in NumPy.

A :class:`Tensor` is a contiguous row-major view (``offset`` bytes into its
:class:`Storage`). Slicing along dim 0, ``view`` and ``reshape`` make new tensors over
the same storage without copying; only the tensor that allocated the storage can free
it. Freeing is explicit (``free()`` or ``with``) or happens when the last tensor over
a storage is collected.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidArgumentType
from .copy import copy
from .core import DoubleFree, UseAfterFree
from .dtypes import DType, check_shape, numel_of, resolve


class Storage:
    """The bytes behind a tensor and its views.

    ``owner`` is the runtime's arena for arena and pinned blocks (None for pageable NumPy
    memory); ``host`` is a uint8 NumPy view of the bytes where the host can reach them.
    """

    def __init__(self, owner, block, ptr: int, nbytes: int, *, device: bool, pinned: bool,
                 tag: str | None, host: np.ndarray | None):
        self.owner, self.block = owner, block
        self.ptr, self.nbytes = int(ptr), int(nbytes)
        self.device, self.pinned, self.tag = device, pinned, tag
        self.compressed = bool(getattr(block, "compressed", False))
        self.host = host
        self.pending = None  # Event of an asynchronous copy that reads or writes these bytes
        self.freed = False

    @property
    def live(self) -> bool:
        return not self.freed and (self.block is None or self.block.state == "live")

    def check(self, what: str) -> None:
        if not self.live:
            why = ("was released at shutdown" if self.block is not None and
                   self.block.state == "released_at_shutdown" else "was freed")
            raise UseAfterFree(f"{what}: the tensor's memory ({self.nbytes} bytes, tag {self.tag!r}) {why}")

    def free(self) -> None:
        if self.block is not None and self.block.state == "released_at_shutdown":
            self.freed = True  # the arena already took it back; not the caller's double free
            return
        if self.freed:
            raise DoubleFree(f"tensor memory ({self.nbytes} bytes, tag {self.tag!r}) was already freed")
        self.freed = True
        pending, self.pending = self.pending, None
        if self.owner is not None:
            self.owner.free(self.block, pending)
        self.host = None

    def __del__(self):
        # Collected without free(): hand the block back later, outside whatever code the
        # collector interrupted (it may be in the middle of an arena call).
        if not self.freed and self.owner is not None and self.block is not None and self.block.state == "live":
            self.freed = True
            self.owner.defer_free(self.block, self.pending)


class Tensor:
    """A contiguous n-d array in device or host memory (see the module docstring)."""

    def __init__(self, storage: Storage, shape: tuple[int, ...], dtype: DType, offset: int = 0,
                 base: "Tensor | None" = None):
        self._storage, self._shape, self._dtype = storage, tuple(shape), dtype
        self._offset, self._base = int(offset), base

    # -- what it is ------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> str:
        """The NexusRT dtype name (``"bf16"``, ``"fp32"`` ...)."""
        return self._dtype.name

    @property
    def numpy_dtype(self) -> np.dtype:
        return self._dtype.numpy

    @property
    def itemsize(self) -> int:
        return self._dtype.itemsize

    @property
    def numel(self) -> int:
        return numel_of(self._shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self._dtype.itemsize

    @property
    def ptr(self) -> int:
        """The address of the first element (device address for device tensors)."""
        self._storage.check("tensor.ptr")
        return self._storage.ptr + self._offset

    device = property(lambda self: self._storage.device, doc="True for device (arena) memory.")
    pinned = property(lambda self: self._storage.pinned, doc="True for page-locked host memory.")
    compressed = property(lambda self: self._storage.compressed,
                          doc="True only when the pages really are compressible memory.")
    tag = property(lambda self: self._storage.tag, doc="The accounting tag given at allocation.")

    @property
    def is_view(self) -> bool:
        return self._base is not None

    @property
    def is_live(self) -> bool:
        return self._storage.live

    def __len__(self) -> int:
        if not self._shape:
            raise TypeError("len() of a 0-d tensor")
        return self._shape[0]

    def __repr__(self) -> str:
        where = "device" if self.device else ("pinned" if self.pinned else "host")
        state = "" if self._storage.live else ", freed"
        extra = ", compressed" if self.compressed else ""
        return f"Tensor(shape={self._shape}, dtype={self.dtype}, {where}{extra}, tag={self.tag!r}{state})"

    # -- host access -------------------------------------------------------------------------
    @property
    def array(self) -> np.ndarray:
        """The tensor as a NumPy array over the same bytes (host-reachable memory only)."""
        st = self._storage
        st.check("tensor.array")
        if st.host is None:
            raise ValueError("tensor.array needs host-reachable memory (CPU backend or a pinned/host "
                             "tensor); use tensor.to_numpy() to copy device memory to the host")
        raw = st.host[self._offset:self._offset + self.nbytes]
        return raw.view(self._dtype.numpy).reshape(self._shape)

    def to_numpy(self) -> np.ndarray:
        """A host copy as a NumPy array (bf16 -> ml_dtypes.bfloat16, fp8 -> float8_e4m3fn)."""
        self._storage.check("tensor.to_numpy()")
        if self._storage.host is not None:
            self._sync_pending()
            return self.array.copy()
        out = np.empty(self._shape, dtype=self._dtype.numpy)
        self._storage.owner.read(out.ctypes.data, self.ptr, self.nbytes)
        return out

    def copy_from(self, src, convert: bool = False) -> "Tensor":
        """Copy ``src`` (a NumPy array or a Tensor) in; shapes and dtypes must match.

        ``convert=True`` allows a dtype conversion on the host (e.g. fp32 -> bf16).
        """
        self._storage.check("tensor.copy_from()")
        if isinstance(src, Tensor):
            copy(self, src)
            return self
        a = np.asarray(src)
        if a.shape != self._shape:
            raise ValueError(f"copy_from: src has shape {a.shape}, the tensor has shape {self._shape}")
        if a.dtype != self._dtype.numpy:
            if not convert:
                raise ValueError(f"copy_from: src has dtype {a.dtype}, the tensor is {self.dtype}: "
                                 "pass convert=True to convert")
            a = a.astype(self._dtype.numpy)
        a = np.ascontiguousarray(a)
        if self._storage.host is not None:
            self._sync_pending()
            self.array[...] = a
        else:
            self._storage.owner.write(self.ptr, a.ctypes.data, self.nbytes)
        return self

    def _sync_pending(self) -> None:
        if self._storage.pending is not None:
            self._storage.pending.synchronize()

    # -- lifetime -------------------------------------------------------------------------------
    def free(self) -> None:
        """Give the memory back; a second free raises DoubleFree. Views cannot free their base."""
        if self._base is not None:
            raise ValueError("a view cannot free its base tensor: free the tensor that allocated it")
        self._storage.free()

    def __enter__(self) -> "Tensor":
        return self

    def __exit__(self, *exc) -> None:
        if self._base is None and self._storage.live:
            self.free()

    # -- views ---------------------------------------------------------------------------------
    def _derive(self, shape, dtype: DType, offset: int) -> "Tensor":
        self._storage.check("making a view")
        return Tensor(self._storage, shape, dtype, offset, base=self._base if self._base is not None else self)

    def view(self, dtype) -> "Tensor":
        """The same bytes as another dtype; the last dimension scales by the size ratio."""
        dt = resolve(dtype)
        if dt.itemsize == self.itemsize:
            return self._derive(self._shape, dt, self._offset)
        last = self._shape[-1] if self._shape else 1
        if (last * self.itemsize) % dt.itemsize:
            raise ValueError(f"view: the last dimension ({last} x {self.itemsize} bytes) is not a "
                             f"multiple of {dt.name}'s {dt.itemsize} bytes")
        shape = self._shape[:-1] + (last * self.itemsize // dt.itemsize,)
        return self._derive(shape, dt, self._offset)

    def reshape(self, *shape) -> "Tensor":
        """The same elements in another shape (one dimension may be -1)."""
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            try:
                shape = tuple(shape[0])
            except TypeError:
                raise InvalidArgumentType("shape", f"reshape: shape must be ints or a tuple of ints, "
                                                   f"got {shape[0]!r}") from None
        # Types before the -1 arithmetic below, which would otherwise fail inside on a str.
        for i, d in enumerate(shape):
            if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
                raise InvalidArgumentType("shape", f"reshape: shape[{i}] must be an int, got {d!r} in shape={shape!r}")
        if sum(1 for d in shape if d == -1) > 1:
            raise ValueError(f"reshape: only one dimension may be -1, got {shape}")
        if -1 in shape:
            known = numel_of(tuple(d for d in shape if d != -1))
            if known <= 0 or self.numel % known:
                raise ValueError(f"reshape: cannot infer -1 in {shape} for {self.numel} elements")
            shape = tuple(self.numel // known if d == -1 else d for d in shape)
        shape = check_shape(shape)
        if numel_of(shape) != self.numel:
            raise ValueError(f"reshape: shape {shape} has {numel_of(shape)} elements, "
                             f"the tensor has {self.numel}")
        return self._derive(shape, self._dtype, self._offset)

    def __getitem__(self, index) -> "Tensor":
        """``t[i]`` or ``t[a:b]`` along dim 0 (step 1): a view, no copy."""
        if not self._shape:
            raise IndexError("a 0-d tensor cannot be indexed")
        n, row = self._shape[0], numel_of(self._shape[1:]) * self.itemsize
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                raise ValueError("tensor slicing supports step 1 only (views stay contiguous)")
            if stop <= start:
                raise ValueError(f"slice {index} of a dimension of {n} is empty")
            return self._derive((stop - start,) + self._shape[1:], self._dtype, self._offset + start * row)
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            i = int(index) + n if index < 0 else int(index)
            if not 0 <= i < n:
                raise IndexError(f"index {index} is out of range for dimension 0 of size {n}")
            return self._derive(self._shape[1:], self._dtype, self._offset + i * row)
        raise TypeError(f"tensors index along dim 0 with an int or a slice, got {type(index).__name__}")
