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

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import ModelError
from .jsonfile import read_json_object

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


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
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


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
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._fail(f"header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._fail(f"header must be a JSON object, got {type(header).__name__}")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise self._fail("__metadata__ must be an object of strings")
        self.metadata = meta
        data_start, data_size = 8 + n, size - 8 - n
        spans = []
        for name, entry in header.items():
            info = self._entry(name, entry, data_start, data_size)
            self.tensors[name] = info
            spans.append((info.offset - data_start, info.offset - data_start + info.nbytes, name))
        spans.sort()
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise self._fail(f"tensors {n0!r} (bytes {b0}..{e0}) and {n1!r} (bytes {b1}..{e1}) overlap")

    def _entry(self, name: str, entry, data_start: int, data_size: int) -> TensorInfo:
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise self._fail(f"{where}: header entry must be an object, got {entry!r}")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise self._fail(f"{where}: header entry lacks {', '.join(missing)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise self._fail(f"{where}: unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                  for s in shape):
            raise self._fail(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                or offsets[1] < offsets[0]):
            raise self._fail(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise self._fail(f"{where}: shape {shape} of {dtype} needs {expected} bytes but data_offsets "
                             f"{offsets} span {end - begin}")
        if end > data_size:
            raise self._fail(f"{where}: data ends at byte {end} of the data buffer but the file holds only "
                             f"{data_size} data bytes (truncated file?)")
        return TensorInfo(name, dtype, tuple(shape), self.path, data_start + begin, end - begin)


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Read one tensor into a new array of its own dtype and shape (checks the file still holds it)."""
    # bf16 is read as raw uint16 and viewed: the byte layout is what counts, not numpy's parsing.
    raw_dtype = np.uint16 if info.dtype == "BF16" else info.np_dtype
    try:
        arr = np.fromfile(info.file, dtype=raw_dtype, count=info.numel, offset=info.offset)
    except OSError as exc:
        raise ModelError(f"{info.file}: cannot read tensor {info.name!r}: {exc}") from None
    if arr.size != info.numel:
        raise ModelError(f"{info.file}: tensor {info.name!r} is truncated: expected {info.numel} elements "
                         f"({info.nbytes} bytes at offset {info.offset}), read {arr.size}")
    if info.dtype == "BF16":
        arr = arr.view(ml_dtypes.bfloat16)
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
    def from_dir(cls, model_dir: str | Path) -> "SafetensorsIndex":
        d = Path(model_dir)
        index = d / INDEX_FILE
        if index.is_file():
            return cls._from_index(index)
        paths = sorted(d.glob("*.safetensors"))
        if not paths:
            extra = " (pytorch_model.bin is not supported; convert to safetensors)" \
                if (d / "pytorch_model.bin").exists() else ""
            raise ModelError(f"{d}: no *.safetensors weight files found{extra}")
        return cls([SafetensorsFile(p) for p in paths], str(d))

    @classmethod
    def _from_index(cls, index: Path) -> "SafetensorsIndex":
        wmap = read_json_object(index).get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise ModelError(f"{index}: needs a non-empty 'weight_map' object")
        shards = {}
        for shard in sorted(set(wmap.values())):
            path = index.parent / shard
            if not path.is_file():
                users = sorted(k for k, v in wmap.items() if v == shard)
                raise ModelError(f"{index}: shard {shard} is missing (it should hold {users[0]!r}"
                                 f"{f' and {len(users) - 1} more' if len(users) > 1 else ''})")
            shards[shard] = SafetensorsFile(path)
        for name, shard in wmap.items():
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
