"""Our own reader of the safetensors format, with every check a corrupt file needs.

Layout of a ``.safetensors`` file::

    [8 bytes: N, unsigned little-endian][N bytes: JSON header][data buffer]

The header maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the start of the data buffer) plus an optional ``__metadata__``
object of strings. Parsing reads only the header; :class:`TensorInfo` carries the
*absolute* file offset and byte count of each tensor, so a streaming GPU loader can read
the byte range itself. :func:`read_tensor` reads one tensor into a fresh numpy array
(``np.fromfile``: no memory map stays open after a load or a failure).

Sharded checkpoints (``model.safetensors.index.json`` with a ``weight_map``) are one
:class:`SafetensorsIndex` over several files.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import ModelError
from .jsonfile import parse_json, read_json_object
from .paths import CheckpointDir
from .validate import Fields

# Every dtype the format defines (safetensors 0.8's Dtype enum) and its width in bits.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
# The ones a numpy array can hold as stored (the sub-byte F4/F6 are packed: no numpy view).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "C64": np.dtype(np.complex64),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu), "F8_E4M3FNUZ": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "F8_E5M2FNUZ": np.dtype(ml_dtypes.float8_e5m2fnuz),
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit
_MAX_BYTES = 1 << 64  # the reference computes sizes in a u64: a shape whose product overflows it is corrupt


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``offset`` is absolute in ``file``; ``nbytes`` its span."""

    name: str
    dtype: str  # safetensors spelling: "BF16", "F32", ...
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def np_dtype(self) -> np.dtype:
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise ModelError(f"{self.file}: tensor {self.name!r} is {self.dtype}, a packed sub-byte type "
                             "NexusRT cannot read into an array") from None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _checked_nbytes(shape: list[int], bits: int) -> int | None:
    """Bytes of ``shape`` at ``bits`` per element, or None when the product overflows a u64."""
    n = bits
    for dim in shape:
        n *= dim
        if n >= _MAX_BYTES * 8:
            return None
    return n // 8 if n % 8 == 0 else -1


class SafetensorsFile:
    """The parsed header of one file: ``tensors`` (name -> :class:`TensorInfo`) and ``metadata``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metadata: dict = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    def _fail(self, what: str) -> ModelError:
        return ModelError(f"{self.path}: {what}")

    def _parse(self) -> None:
        if not self.path.is_file():
            raise self._fail("file not found")
        try:
            raw, n, size = self._read_header()
        except OSError as exc:
            raise self._fail(f"cannot read: {exc.strerror or exc}") from None
        header = parse_json(raw, f"{self.path} (header)")
        if not isinstance(header, dict):
            raise self._fail(f"header must be a JSON object, got {type(header).__name__}")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._fail("__metadata__ must be an object of strings")
        self.metadata = meta
        data_start, data_size = 8 + n, size - 8 - n
        for name, entry in header.items():
            self.tensors[name] = self._entry(name, entry, data_start, data_size)
        self._check_layout(data_start, data_size)

    def _check_layout(self, data_start: int, data_size: int) -> None:
        """The data buffer is the tensors back to back: no gap, no overlap, nothing after."""
        spans = sorted((i.offset - data_start, i.offset - data_start + i.nbytes, name)
                       for name, i in self.tensors.items())
        end, prev = 0, None
        for b, e, name in spans:
            if b != end:
                what = "overlaps" if b < end else f"leaves a gap of {b - end} bytes after"
                after = f"tensor {prev!r} (ends at byte {end})" if prev else "the start of the data buffer"
                raise self._fail(f"tensor {name!r} (bytes {b}..{e}) {what} {after}; the data must be contiguous")
            end, prev = e, name
        if end != data_size:
            raise self._fail(f"{data_size - end} bytes after the last tensor (the data buffer holds {data_size} "
                             f"bytes, the tensors {end}): trailing data is not allowed")

    def _read_header(self) -> tuple[bytes, int, int]:
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise self._fail(f"truncated: {size} bytes, too short for the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise self._fail(f"header length {n} is larger than the file ({size} bytes): "
                                 "truncated or not a safetensors file")
            if n > _MAX_HEADER:
                raise self._fail(f"header length {n} exceeds the {_MAX_HEADER}-byte limit")
            return f.read(n), n, size

    def _entry(self, name: str, entry, data_start: int, data_size: int) -> TensorInfo:
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise self._fail(f"{where}: header entry must be an object, got {type(entry).__name__}")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise self._fail(f"{where}: header entry lacks {', '.join(missing)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise self._fail(f"{where}: unknown dtype {dtype!r}; the format defines {', '.join(DTYPE_BITS)}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                  for s in shape):
            raise self._fail(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                or offsets[1] < offsets[0]):
            raise self._fail(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
        begin, end = offsets
        bits = DTYPE_BITS[dtype]
        expected = _checked_nbytes(shape, bits)
        if expected is None:
            raise self._fail(f"{where}: shape {shape} of {dtype} overflows 64 bits")
        if expected < 0:
            raise self._fail(f"{where}: shape {shape} of {dtype} ({bits}-bit) does not end on a byte boundary")
        if end - begin != expected:
            raise self._fail(f"{where}: shape {shape} of {dtype} needs {expected} bytes but data_offsets "
                             f"{offsets} span {end - begin}")
        if end > data_size:
            raise self._fail(f"{where}: data ends at byte {end} of the data buffer but the file holds only "
                             f"{data_size} data bytes (truncated file?)")
        # Writers order tensors by decreasing alignment so each starts on a multiple of its
        # element size; an unaligned one is a hand-made or corrupt file.
        align = max(1, min(bits // 8, 8))
        if begin % align:
            raise self._fail(f"{where}: data_offsets begin {begin} is not a multiple of {align} ({dtype} alignment)")
        return TensorInfo(name, dtype, tuple(shape), self.path, data_start + begin, end - begin)


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Read one tensor into a new array of its own dtype and shape (checks the file still holds it)."""
    # ml_dtypes types (bf16, fp8) are read as raw unsigned ints of their width and viewed: the
    # byte layout is what counts, not numpy's parsing.
    want = info.np_dtype
    raw_dtype = want if want.kind in "biufc" else np.dtype(f"u{want.itemsize}")
    try:
        arr = np.fromfile(info.file, dtype=raw_dtype, count=info.numel, offset=info.offset)
    except OSError as exc:
        raise ModelError(f"{info.file}: cannot read tensor {info.name!r}: {exc}") from None
    if arr.size != info.numel:
        raise ModelError(f"{info.file}: tensor {info.name!r} is truncated: expected {info.numel} elements "
                         f"({info.nbytes} bytes at offset {info.offset}), read {arr.size}")
    if raw_dtype != want:
        arr = arr.view(want)
    return arr.reshape(info.shape)


class SafetensorsIndex:
    """All tensors of a checkpoint directory: one file, several, or an index with shards."""

    def __init__(self, files: list[SafetensorsFile], source: str):
        self.files = files
        self.source = source
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in f.tensors.items():
                if name in self.tensors:
                    raise ModelError(f"tensor {name!r} appears in both {self.tensors[name].file} and {f.path}")
                self.tensors[name] = info

    @classmethod
    def from_dir(cls, model_dir: str | Path | CheckpointDir) -> "SafetensorsIndex":
        """Every tensor of a checkpoint directory (the index and its shards, else ``*.safetensors``)."""
        d = model_dir if isinstance(model_dir, CheckpointDir) else CheckpointDir(model_dir)
        index = d.file(INDEX_FILE, required=False)
        if index is not None:
            return cls._from_index(d, index)
        paths = d.glob("*.safetensors")
        if not paths:
            extra = " (pytorch_model.bin is not supported; convert to safetensors)" \
                if (d.root / "pytorch_model.bin").exists() else ""
            raise ModelError(f"{d}: no *.safetensors weight files found{extra}")
        return cls([SafetensorsFile(p) for p in paths], str(d))

    @classmethod
    def _from_index(cls, d: CheckpointDir, index: Path) -> "SafetensorsIndex":
        f = Fields(read_json_object(index), str(index))
        f.obj("metadata")  # optional, but an object when present
        wmap = f.obj("weight_map")
        if wmap is None or not wmap.d:
            raise ModelError(f"{index}: needs a non-empty 'weight_map' object")
        for name in wmap.d:
            wmap.str(name)
        shards = {}
        for shard in sorted(set(wmap.d.values())):
            path = d.file(shard, required=False, what="shard")
            if path is None:
                users = sorted(k for k, v in wmap.d.items() if v == shard)
                raise ModelError(f"{index}: shard {shard} is missing (it should hold {users[0]!r}"
                                 f"{f' and {len(users) - 1} more' if len(users) > 1 else ''})")
            shards[shard] = SafetensorsFile(path)
        for name, shard in wmap.d.items():
            if name not in shards[shard].tensors:
                raise ModelError(f"{index}: weight_map puts {name!r} in {shard}, but that file has no such tensor")
        return cls(list(shards.values()), str(index))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(f"{self.source}: tensor {name!r} not found") from None

    def read(self, name: str) -> np.ndarray:
        return read_tensor(self.info(name))
