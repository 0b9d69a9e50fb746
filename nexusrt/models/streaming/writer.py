"""Our own safetensors writer, streaming: the header first, then each tensor's bytes in order.

The header is computed from names, dtypes and shapes alone, so a 16 GB checkpoint is
written tensor by tensor without ever holding more than one tensor (or one piece of
one) in memory. The JSON header is padded with spaces to a multiple of 8 bytes, as the
reference library does, so every tensor starts 8-byte aligned.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from ...errors import ModelError
from ..safetensors import DTYPES

# Every entry is (name, safetensors dtype, shape).
Entry = tuple[str, str, tuple[int, ...]]


def entry_nbytes(entry: Entry) -> int:
    _, dtype, shape = entry
    return math.prod(shape) * DTYPES[dtype].itemsize


def header_bytes(entries: list[Entry], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the padded JSON header for ``entries`` laid out in list order."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for entry in entries:
        name, dtype, shape = entry
        if dtype not in DTYPES:
            raise ValueError(f"tensor {name!r}: unknown safetensors dtype {dtype!r}")
        if name in header:
            raise ValueError(f"tensor {name!r} appears twice")
        n = entry_nbytes(entry)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """``with SafetensorsWriter(path, entries) as w: w.write(name, bytes_like) ...`` in entry order.

    A tensor may be written in several calls (pieces in order). ``close`` checks every
    byte arrived and, with ``sync=True``, flushes the file to the disk.
    """

    def __init__(self, path: str | Path, entries: list[Entry], metadata: dict[str, str] | None = None,
                 sync: bool = True):
        self.path = Path(path)
        self.entries = list(entries)
        self.sync = sync
        self._k, self._left = 0, entry_nbytes(self.entries[0]) if self.entries else 0
        self._f = open(self.path, "wb", buffering=0)
        self._write(header_bytes(self.entries, metadata))

    def _write(self, data) -> None:
        view = _byte_view(data)
        while view.nbytes:
            n = self._f.write(view)
            view = view[n:]

    def write(self, name: str, data) -> None:
        """The next bytes of tensor ``name`` (which must be the tensor being written)."""
        while self._k < len(self.entries) and self._left == 0:
            self._advance()
        if self._k >= len(self.entries):
            raise ValueError(f"{self.path}: tensor {name!r} written after every tensor was complete")
        expected = self.entries[self._k][0]
        if name != expected:
            raise ValueError(f"{self.path}: tensors must be written in header order: got {name!r}, "
                             f"expected {expected!r}")
        data = _byte_view(data)
        n = data.nbytes
        if n > self._left:
            raise ValueError(f"{self.path}: tensor {name!r}: {n} bytes written, only {self._left} left")
        self._write(data)
        self._left -= n

    def _advance(self) -> None:
        self._k += 1
        if self._k < len(self.entries):
            self._left = entry_nbytes(self.entries[self._k])

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            while self._k < len(self.entries) and self._left == 0:
                self._advance()
            if self._k < len(self.entries):
                raise ModelError(f"{self.path}: closed with tensor {self.entries[self._k][0]!r} incomplete "
                                 f"({self._left} bytes missing)")
            if self.sync:
                os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()


def _byte_view(data) -> memoryview:
    """Raw bytes of a bytes-like object or a NumPy array (bf16 arrays have no buffer format)."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return memoryview(data).cast("B")
