"""What to read, in which order, into where: the pure logic of a streaming load.

A load is a list of :class:`LoadItem` (a safetensors tensor and the tensor it goes
into). :func:`check_items` rejects anything that cannot be loaded before a byte is
read; :func:`plan_chunks` turns the items into :class:`Chunk` reads: grouped by file,
sorted by offset, neighbouring tensors coalesced into long sequential spans, spans cut
into reads of at most ``chunk_bytes``. Each chunk lists the :class:`Piece` of every
tensor it covers, so a read can be scattered to several destinations.

Nothing here touches a device or a file's bytes (only ``os.stat``), so CI tests it all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ...errors import ModelError
from ..safetensors import TensorInfo

# safetensors dtype -> the NexusRT dtype its bytes are, copied verbatim.
VERBATIM = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "I8": "int8", "U8": "uint8",
            "I32": "int32", "I64": "int64"}
# (stored dtype, convert) -> (scratch dtype the raw bytes land in, kernel that converts).
CONVERSIONS = {("F32", "bf16"): ("fp32", "f32_to_bf16"), ("BF16", "fp32"): ("bf16", "bf16_to_f32")}
CONVERT_TARGETS = ("bf16", "fp32")


@dataclass(frozen=True)
class LoadItem:
    """Load tensor ``info`` into ``dst`` (a device tensor the caller owns).

    ``convert=None``: the bytes are copied verbatim (``dst.nbytes == info.nbytes``).
    ``convert="bf16"`` / ``"fp32"``: ``dst`` has that dtype and ``info``'s element count;
    a stored F32 (for bf16) or BF16 (for fp32) tensor is converted on the device.
    """

    info: TensorInfo
    dst: object  # nexusrt.memory.Tensor
    convert: str | None = None


@dataclass(frozen=True)
class Route:
    """How one item's bytes arrive: straight into ``dst``, or into a scratch tensor first."""

    scratch_dtype: str | None = None  # None: verbatim into dst
    kernel: str | None = None

    @property
    def converts(self) -> bool:
        return self.kernel is not None


@dataclass(frozen=True)
class Piece:
    """Bytes ``[chunk_off, chunk_off + nbytes)`` of a chunk are bytes ``item_off..`` of item ``item``."""

    item: int
    chunk_off: int
    item_off: int
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    """One read: ``nbytes`` of ``file`` from absolute ``offset``, scattered as ``pieces``."""

    file: Path
    offset: int
    nbytes: int
    pieces: tuple[Piece, ...]


def where(info: TensorInfo) -> str:
    """``'<file>: tensor <name>'``: how every error names the culprit."""
    return f"{info.file}: tensor {info.name!r}"


def _route(item: LoadItem) -> Route:
    info, dst, conv = item.info, item.dst, item.convert
    if conv is None:
        if dst.nbytes != info.nbytes:
            raise ModelError(f"{where(info)}: holds {info.nbytes} bytes ({info.dtype} {list(info.shape)}) but "
                             f"the destination is {dst.nbytes} bytes ({dst.dtype} {list(dst.shape)})")
        return Route()
    if conv not in CONVERT_TARGETS:
        raise ValueError(f"{where(info)}: convert must be None or one of {', '.join(CONVERT_TARGETS)}, got {conv!r}")
    if dst.dtype != conv:
        raise ModelError(f"{where(info)}: convert={conv!r} needs a {conv} destination, got {dst.dtype}")
    if dst.numel != info.numel:
        raise ModelError(f"{where(info)}: {info.numel} elements {list(info.shape)} but the destination has "
                         f"{dst.numel} {list(dst.shape)}")
    if VERBATIM.get(info.dtype) == conv:
        return Route()
    if (info.dtype, conv) in CONVERSIONS:
        scratch, kernel = CONVERSIONS[(info.dtype, conv)]
        return Route(scratch, kernel)
    extra = " (F16 checkpoints: no fp16 conversion kernel yet; load them with convert=None into fp16)" \
        if info.dtype == "F16" else ""
    raise ModelError(f"{where(info)}: cannot convert {info.dtype} to {conv}{extra}")


def truncation_error(items: list[LoadItem], chunk: Chunk, got: int) -> ModelError:
    """A read of ``chunk`` came back ``got`` bytes short: name the tensor the file now ends inside.

    Reads finish out of order, so the chunk that reports first may lie wholly past the
    end; the file's size now says where it ends, and so which tensor was cut.
    """
    eof = chunk.offset + max(got, 0)
    try:
        size = os.path.getsize(chunk.file)
    except OSError:
        size = eof
    if size >= chunk.offset + chunk.nbytes:  # the bytes are there: the read failed, not the file
        info = items[chunk.pieces[0].item].info
        return ModelError(f"{where(info)}: short read: {got} of {chunk.nbytes} bytes at offset {chunk.offset} "
                          f"although the file holds {size} bytes")
    eof = min(eof, size)
    cut = next((it.info for it in items if Path(it.info.file) == chunk.file
                and it.info.offset <= eof < it.info.offset + it.info.nbytes), None)
    info = cut or items[chunk.pieces[0].item].info
    return ModelError(f"{where(info)}: the file ends at byte {eof}, inside the tensor (bytes {info.offset}.."
                      f"{info.offset + info.nbytes}) or before it: the file is truncated")


def file_size(path: Path) -> int:
    """The file's size now (a seam: tests make a file shrink after this check)."""
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise ModelError(f"{path}: cannot stat: {exc.strerror or exc}") from None


def check_items(items: list[LoadItem]) -> list[Route]:
    """Validate every item; return each item's :class:`Route`.

    Raises ModelError naming the file and tensor for: a destination that does not fit,
    an impossible conversion, bytes past the end of the file (truncated file or bad
    offsets), two items whose byte ranges overlap; ValueError/TypeError for bad arguments.
    """
    routes = []
    seen_dst: list[tuple[int, int, str]] = []
    for k, item in enumerate(items):
        if not isinstance(item, LoadItem):
            raise TypeError(f"items[{k}] must be a LoadItem, got {type(item).__name__}")
        if not isinstance(item.info, TensorInfo):
            raise TypeError(f"items[{k}].info must be a TensorInfo, got {type(item.info).__name__}")
        dst = item.dst
        if not hasattr(dst, "_storage") or not dst.is_live:
            raise ValueError(f"{where(item.info)}: the destination is not a live nexusrt Tensor")
        if not dst.device:
            raise ValueError(f"{where(item.info)}: the destination must be a device tensor, got {dst!r}")
        if item.info.offset < 0 or item.info.nbytes < 0:
            raise ModelError(f"{where(item.info)}: negative offset {item.info.offset} or size {item.info.nbytes}")
        routes.append(_route(item))
        if dst.nbytes:
            seen_dst.append((dst.ptr, dst.ptr + dst.nbytes, item.info.name))
    _check_bounds(items)
    seen_dst.sort()
    for (b0, e0, n0), (b1, _, n1) in zip(seen_dst, seen_dst[1:]):
        if b1 < e0:
            raise ValueError(f"tensors {n0!r} and {n1!r} would be loaded into overlapping destinations")
    return routes


def _check_bounds(items: list[LoadItem]) -> None:
    by_file: dict[Path, list[TensorInfo]] = {}
    for item in items:
        by_file.setdefault(Path(item.info.file), []).append(item.info)
    for path, infos in by_file.items():
        size = file_size(path)
        infos.sort(key=lambda i: (i.offset, i.nbytes))
        for info in infos:
            end = info.offset + info.nbytes
            if end > size:
                what = "starts past" if info.offset >= size else "runs past"
                raise ModelError(f"{where(info)}: bytes {info.offset}..{end} {what} the end of the file "
                                 f"({size} bytes): the file is truncated or the offsets are wrong")
        for a, b in zip(infos, infos[1:]):
            if b.offset < a.offset + a.nbytes and b.nbytes and a.nbytes:
                raise ModelError(f"{path}: tensors {a.name!r} (bytes {a.offset}..{a.offset + a.nbytes}) and "
                                 f"{b.name!r} (bytes {b.offset}..{b.offset + b.nbytes}) overlap")


def plan_chunks(items: list[LoadItem], chunk_bytes: int, *, max_gap: int = 0,
                dst_addrs: list[int | None] | None = None) -> list[Chunk]:
    """The reads of a load, in file order (files sorted by path, then by offset).

    Neighbouring tensors join one span when the bytes between them are at most
    ``max_gap`` (they are read and dropped). With ``dst_addrs`` (the cuFile path, which
    reads straight into destination memory) tensors join only when they touch in the
    file *and* ``dst_addrs[j] == dst_addrs[i] + nbytes_i``; an item with a ``None``
    address never joins another. Spans are cut into chunks of at most ``chunk_bytes``.
    Empty tensors need no read and appear in no chunk.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if max_gap < 0:
        raise ValueError(f"max_gap must be >= 0, got {max_gap}")
    order = sorted((i for i, it in enumerate(items) if it.info.nbytes),
                   key=lambda i: (str(items[i].info.file), items[i].info.offset))
    spans: list[list[int]] = []
    for i in order:
        if spans and _joins(items, spans[-1][-1], i, max_gap, dst_addrs):
            spans[-1].append(i)
        else:
            spans.append([i])
    chunks: list[Chunk] = []
    for span in spans:
        chunks.extend(_cut(items, span, chunk_bytes))
    return chunks


def _joins(items, prev: int, nxt: int, max_gap: int, dst_addrs) -> bool:
    a, b = items[prev].info, items[nxt].info
    if Path(a.file) != Path(b.file):
        return False
    gap = b.offset - (a.offset + a.nbytes)
    if dst_addrs is None:
        return 0 <= gap <= max_gap
    pa, pb = dst_addrs[prev], dst_addrs[nxt]
    return gap == 0 and pa is not None and pb is not None and pb == pa + a.nbytes


def _cut(items, span: list[int], chunk_bytes: int) -> list[Chunk]:
    infos = [items[i].info for i in span]
    start, end = infos[0].offset, infos[-1].offset + infos[-1].nbytes
    chunks, k = [], 0
    for c0 in range(start, end, chunk_bytes):
        c1 = min(c0 + chunk_bytes, end)
        pieces = []
        while k < len(span):
            info = infos[k]
            lo, hi = max(c0, info.offset), min(c1, info.offset + info.nbytes)
            if lo < hi:
                pieces.append(Piece(span[k], lo - c0, lo - info.offset, hi - lo))
            if info.offset + info.nbytes <= c1:
                k += 1  # this tensor ends in this chunk: the next one starts the next piece
            else:
                break
        if pieces:  # a window inside a long gap holds nothing worth reading
            chunks.append(Chunk(Path(infos[0].file), c0, c1 - c0, tuple(pieces)))
    return chunks
