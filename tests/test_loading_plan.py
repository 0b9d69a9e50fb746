"""The streaming loader's plan: ordering, coalescing, chunking and the checks before any read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nexusrt import memory
from nexusrt.errors import ModelError
from nexusrt.models.safetensors import TensorInfo
from nexusrt.models.streaming import LoadItem, check_items, plan_chunks


def _info(name, offset, nbytes, file="a.safetensors", dtype="U8"):
    return TensorInfo(name, dtype, (nbytes,), Path(file), offset, nbytes)


def _items(cpu_rt, spans, file="a.safetensors"):
    return [LoadItem(_info(f"t{k}", off, n, file), memory.empty((n,), "uint8")) for k, (off, n) in enumerate(spans)]


def _coverage(items, chunks):
    """Check every byte of every item is delivered exactly once, from the right file offset."""
    seen = [np.zeros(it.info.nbytes, dtype=np.int32) for it in items]
    for c in chunks:
        assert 0 < c.nbytes
        for p in c.pieces:
            info = items[p.item].info
            assert Path(info.file) == c.file
            assert c.offset + p.chunk_off == info.offset + p.item_off  # the same file byte
            assert 0 <= p.chunk_off and p.chunk_off + p.nbytes <= c.nbytes
            seen[p.item][p.item_off:p.item_off + p.nbytes] += 1
    for it, s in zip(items, seen):
        assert (s == 1).all(), it.info.name


def test_chunks_are_in_file_order_and_cover_every_byte_once(cpu_rt):
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 5000, size=40)
    gaps = rng.integers(0, 300, size=40)
    offs = 100 + np.cumsum(np.concatenate([[0], sizes[:-1] + gaps[:-1]]))
    spans = list(zip(offs.tolist(), sizes.tolist()))
    order = rng.permutation(len(spans))
    items = _items(cpu_rt, [spans[k] for k in order])  # given shuffled
    chunks = plan_chunks(items, 4096, max_gap=128)
    _coverage(items, chunks)
    starts = [c.offset for c in chunks]
    assert starts == sorted(starts)
    assert all(c.nbytes <= 4096 for c in chunks)
    # gaps <= 128 are read through (joined spans), longer gaps start a new span
    joined = sum(1 for g in gaps[:-1] if g <= 128)
    assert len(chunks) < len(spans) - joined + sum(sizes) // 4096 + 2


def test_large_tensor_is_split_and_small_ones_share_a_chunk(cpu_rt):
    items = _items(cpu_rt, [(8, 10_000), (10_008, 100), (10_108, 50)])
    chunks = plan_chunks(items, 4096)
    assert [c.offset for c in chunks] == [8, 8 + 4096, 8 + 8192]
    last = chunks[-1]
    assert [(p.item, p.item_off, p.nbytes) for p in last.pieces] == [(0, 8192, 10_000 - 8192), (1, 0, 100), (2, 0, 50)]
    _coverage(items, chunks)


def test_gap_limit_and_files_split_spans(cpu_rt):
    items = _items(cpu_rt, [(0, 100), (150, 100)]) + _items(cpu_rt, [(0, 100)], file="b.safetensors")
    assert len(plan_chunks(items, 1 << 20, max_gap=50)) == 2  # a.safetensors joined, b apart
    assert len(plan_chunks(items, 1 << 20, max_gap=49)) == 3
    chunks = plan_chunks(items, 1 << 20, max_gap=50)
    assert [c.file.name for c in chunks] == ["a.safetensors", "b.safetensors"]
    assert chunks[0].nbytes == 250  # the gap is read through


def test_destination_contiguous_coalescing(cpu_rt):
    """cuFile mode: join only when touching in the file AND in destination memory."""
    fused = memory.empty((300,), "uint8")
    infos = [_info("q", 0, 100), _info("k", 100, 100), _info("v", 200, 100), _info("o", 300, 100)]
    other = memory.empty((100,), "uint8")
    items = [LoadItem(infos[0], fused[0:100]), LoadItem(infos[1], fused[100:200]),
             LoadItem(infos[2], fused[200:300]), LoadItem(infos[3], other)]
    addrs = [it.dst.ptr for it in items]
    chunks = plan_chunks(items, 1 << 20, dst_addrs=addrs)
    assert [(c.offset, c.nbytes, len(c.pieces)) for c in chunks] == [(0, 300, 3), (300, 100, 1)]
    # the same items with k's destination elsewhere: no joining across it
    addrs[1] = other.ptr + 1000
    assert len(plan_chunks(items, 1 << 20, dst_addrs=addrs)) == 4
    # None (a converting item) never joins; chunk size still cuts a joined span
    assert len(plan_chunks(items, 1 << 20, dst_addrs=[addrs[0], None, addrs[2], addrs[3]])) == 4
    small = plan_chunks(items[:3], 64, dst_addrs=[it.dst.ptr for it in items[:3]])
    assert [c.nbytes for c in small] == [64, 64, 64, 64, 44]
    _coverage(items[:3], small)


def test_empty_tensors_need_no_read(cpu_rt, tmp_path):
    f = tmp_path / "x.safetensors"
    empty = TensorInfo("e", "F32", (0, 4), f, 16, 0)
    full = TensorInfo("f", "U8", (8,), f, 8, 8)
    items = [LoadItem(full, memory.empty((8,), "uint8")), LoadItem(empty, memory.empty((8,), "uint8"))]
    chunks = plan_chunks(items, 1 << 20)
    assert [(c.offset, c.nbytes, [p.item for p in c.pieces]) for c in chunks] == [(8, 8, [0])]
    f.write_bytes(bytes(64))
    with pytest.raises(ModelError, match="holds 0 bytes"):
        check_items(items)  # verbatim: the destination must be the same size


def test_check_items_rejects_what_cannot_load(cpu_rt, tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(bytes(1000))
    ok = TensorInfo("w", "F32", (4, 8), f, 100, 128)
    check_items([LoadItem(ok, memory.empty((4, 8), "fp32"))])
    cases = [
        (LoadItem(ok, memory.empty((4, 8), "bf16")), ModelError, "holds 128 bytes"),
        (LoadItem(ok, memory.empty((4, 8), "fp32"), convert="bf16"), ModelError, "needs a bf16 destination"),
        (LoadItem(ok, memory.empty((5, 8), "bf16"), convert="bf16"), ModelError, "32 elements"),
        (LoadItem(ok, memory.empty((4, 8), "bf16"), convert="int4"), ValueError, "convert must be"),
        (LoadItem(TensorInfo("h", "F16", (4, 8), f, 100, 64), memory.empty((4, 8), "bf16"), convert="bf16"),
         ModelError, "cannot convert F16 to bf16"),
        (LoadItem(TensorInfo("p", "F32", (4, 8), f, 900, 128), memory.empty((4, 8), "fp32")), ModelError,
         "runs past the end of the file"),
        (LoadItem(TensorInfo("z", "F32", (4, 8), f, 5000, 128), memory.empty((4, 8), "fp32")), ModelError,
         "starts past the end"),
        (LoadItem(ok, memory.empty((4, 8), "fp32", device=False)), ValueError, "must be a device tensor"),
        ("not an item", TypeError, "must be a LoadItem"),
    ]
    for item, exc, msg in cases:
        with pytest.raises(exc, match=msg) as e:
            check_items([item])
        if exc is ModelError:
            assert str(f) in str(e.value) and "tensor" in str(e.value)


def test_overlaps_in_the_file_and_in_destinations(cpu_rt, tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(bytes(1000))
    a = TensorInfo("a", "U8", (100,), f, 0, 100)
    b = TensorInfo("b", "U8", (100,), f, 50, 100)
    with pytest.raises(ModelError, match=r"tensors 'a' .* and 'b' .* overlap"):
        check_items([LoadItem(a, memory.empty((100,), "uint8")), LoadItem(b, memory.empty((100,), "uint8"))])
    c = TensorInfo("c", "U8", (100,), f, 200, 100)
    dst = memory.empty((150,), "uint8")
    with pytest.raises(ValueError, match="overlapping destinations"):
        check_items([LoadItem(a, dst[0:100]), LoadItem(c, dst[50:150])])


def test_freed_destination_and_plan_arguments(cpu_rt, tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(bytes(100))
    dst = memory.empty((10,), "uint8")
    dst.free()
    with pytest.raises(ValueError, match="not a live"):
        check_items([LoadItem(TensorInfo("a", "U8", (10,), f, 0, 10), dst)])
    with pytest.raises(ValueError, match="chunk_bytes"):
        plan_chunks([], 0)
    with pytest.raises(ModelError, match="cannot stat"):
        check_items([LoadItem(TensorInfo("a", "U8", (10,), tmp_path / "gone", 0, 10),
                              memory.empty((10,), "uint8"))])
