"""Our safetensors parser: agreement with the reference library, and every corruption it must catch."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from nexusrt.errors import ModelError
from nexusrt.models.safetensors import SafetensorsFile, SafetensorsIndex, read_tensor

RNG = np.random.default_rng(7)


def _raw(path, header, data: bytes, length=None):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def _one_f32(path, shape=(2, 3), offsets=None, data=None, dtype="F32"):
    n = int(np.prod(shape)) * 4
    header = {"w": {"dtype": dtype, "shape": list(shape), "data_offsets": offsets or [0, n]}}
    return _raw(path, header, RNG.standard_normal(n // 4).astype(np.float32).tobytes() if data is None else data)


def test_agrees_with_the_reference_library(tmp_path):
    from safetensors.numpy import save_file

    tensors = {
        "f32": RNG.standard_normal((3, 5)).astype(np.float32),
        "f16": RNG.standard_normal((4,)).astype(np.float16),
        "bf16": RNG.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16),
        "i64": RNG.integers(-9, 9, (6,)).astype(np.int64),
        "u8": RNG.integers(0, 255, (7,)).astype(np.uint8),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "np"})
    f = SafetensorsFile(path)
    assert f.metadata == {"format": "np"}
    assert set(f.tensors) == set(tensors)
    raw = path.read_bytes()
    for name, ref in tensors.items():
        info = f.tensors[name]
        arr = read_tensor(info)
        assert arr.dtype == ref.dtype and arr.shape == ref.shape
        np.testing.assert_array_equal(arr, ref)
        # the absolute offset/nbytes are what a streaming loader reads directly
        assert raw[info.offset:info.offset + info.nbytes] == ref.tobytes()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"\x01\x02"), "too short for the 8-byte header length"),
    (lambda p: _raw(p, {}, b"", length=10_000), "header length 10000 is larger than the file"),
    (lambda p: p.write_bytes(struct.pack("<Q", 5) + b"{nope"), "\\(header\\): not valid JSON"),
    (lambda p: _raw(p, [1, 2], b""), "header must be a JSON object"),
    (lambda p: _one_f32(p, offsets=[0, 20]), "tensor 'w': shape \\[2, 3\\] of F32 needs 24 bytes but data_offsets"),
    (lambda p: _one_f32(p, data=b"\0" * 10), "tensor 'w': data ends at byte 24 .* only 10 data bytes"),
    (lambda p: _one_f32(p, dtype="F8_E4M3FN"), "tensor 'w': unknown dtype 'F8_E4M3FN'; the format defines BOOL"),
    (lambda p: _one_f32(p, dtype=["F32"]), "tensor 'w': unknown dtype \\['F32'\\]"),
    (lambda p: _raw(p, {"w": {"dtype": "F32", "shape": "23", "data_offsets": [0, 0]}}, b""),
     "tensor 'w': shape must be a list"),
    (lambda p: _raw(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": {"a": 1}}}, b""),
     "tensor 'w': data_offsets must be"),
    (lambda p: _raw(p, {"w": 5}, b""), "tensor 'w': header entry must be an object, got int"),
    (lambda p: _raw(p, {"__metadata__": {"a": 1}}, b""), "__metadata__ must be an object of strings"),
    (lambda p: p.write_bytes(struct.pack("<Q", 20) + b'{"a": 1, "a": 2}    '), "key 'a' appears twice"),
    (lambda p: p.write_bytes(struct.pack("<Q", 4000) + b"[" * 2000 + b"]" * 2000), "nested deeper than 64"),
    (lambda p: _raw(p, {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                        "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}, b"\0" * 6),
     "tensor 'b' \\(bytes 4..6\\) leaves a gap of 2 bytes after tensor 'a'"),
    (lambda p: _raw(p, {"b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"\0" * 4),
     "leaves a gap of 2 bytes after the start of the data buffer"),
    (lambda p: _one_f32(p, data=b"\0" * 28), "4 bytes after the last tensor .* trailing data is not allowed"),
    (lambda p: _raw(p, {"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                        "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 6),
     "tensor 'b': data_offsets begin 2 is not a multiple of 4"),
    (lambda p: _raw(p, {"w": {"dtype": "U8", "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]}}, b""),
     "tensor 'w': shape .* of U8 overflows 64 bits"),
    (lambda p: _raw(p, {"w": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0\0"),
     "tensor 'w': shape \\[3\\] of F4 \\(4-bit\\) does not end on a byte boundary"),
    (lambda p: _one_f32(p, offsets=[8, 4]), "data_offsets must be \\[begin, end\\]"),
    (lambda p: _raw(p, {"w": {"dtype": "F32", "shape": [-1]}}, b""), "tensor 'w': header entry lacks data_offsets"),
    (lambda p: _raw(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16),
     "tensor 'b' \\(bytes 8..16\\) overlaps tensor 'a' \\(ends at byte 16\\)"),
])
def test_corrupt_files_are_rejected_naming_file_and_tensor(tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(ModelError, match=message) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)


def test_file_truncated_after_parsing(tmp_path):
    path = _one_f32(tmp_path / "x.safetensors", shape=(4, 4))
    info = SafetensorsFile(path).tensors["w"]
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ModelError, match="tensor 'w' is truncated: expected 16 elements"):
        read_tensor(info)


def test_sharded_index(tmp_path):
    from safetensors.numpy import save_file

    a, b = RNG.standard_normal(3).astype(np.float32), RNG.standard_normal(2).astype(np.float32)
    save_file({"a": a}, str(tmp_path / "s1.safetensors"))
    save_file({"b": b}, str(tmp_path / "s2.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    idx = SafetensorsIndex.from_dir(tmp_path)
    np.testing.assert_array_equal(idx.read("b"), b)
    assert idx.info("a").file.name == "s1.safetensors"
    with pytest.raises(ModelError, match="tensor 'zz' not found"):
        idx.read("zz")
    index.write_text(json.dumps({"weight_map": {"a": "s2.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(ModelError, match="puts 'a' in s2.safetensors, but that file has no such tensor"):
        SafetensorsIndex.from_dir(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s3.safetensors"}}))
    with pytest.raises(ModelError, match="shard s3.safetensors is missing \\(it should hold 'b'\\)"):
        SafetensorsIndex.from_dir(tmp_path)
    index.write_text("{}")
    with pytest.raises(ModelError, match="needs a non-empty 'weight_map'"):
        SafetensorsIndex.from_dir(tmp_path)


def test_no_weights_and_duplicates(tmp_path):
    with pytest.raises(ModelError, match="no \\*.safetensors weight files"):
        SafetensorsIndex.from_dir(tmp_path)
    _one_f32(tmp_path / "a.safetensors")
    _one_f32(tmp_path / "b.safetensors")
    with pytest.raises(ModelError, match="tensor 'w' appears in both"):
        SafetensorsIndex.from_dir(tmp_path)


def test_every_byte_dtype_the_format_defines_is_read(tmp_path):
    from safetensors.numpy import save_file

    tensors = {
        "u32": RNG.integers(0, 2**32, (3,), dtype=np.uint64).astype(np.uint32),
        "u16": RNG.integers(0, 2**16, (5,)).astype(np.uint16),
        "f8": RNG.standard_normal(6).astype(ml_dtypes.float8_e4m3fn),
        "f8b": RNG.standard_normal(2).astype(ml_dtypes.float8_e5m2),
        "c64": (RNG.standard_normal(2) + 1j).astype(np.complex64),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    f = SafetensorsFile(path)
    assert {i.dtype for i in f.tensors.values()} == {"U32", "U16", "F8_E4M3", "F8_E5M2", "C64"}
    for name, ref in tensors.items():
        arr = read_tensor(f.tensors[name])
        assert arr.dtype == ref.dtype
        np.testing.assert_array_equal(arr.view(np.uint8), ref.view(np.uint8))


def test_packed_sub_byte_tensors_parse_but_do_not_read(tmp_path):
    path = _raw(tmp_path / "f4.safetensors", {"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"\0\0")
    info = SafetensorsFile(path).tensors["w"]
    assert info.nbytes == 2
    with pytest.raises(ModelError, match="f4.safetensors: tensor 'w' is F4, a packed sub-byte type"):
        read_tensor(info)


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "/ABS/model.safetensors", "sub/../../x.safetensors"])
def test_index_cannot_name_files_outside_the_checkpoint(tmp_path, shard):
    other = tmp_path / "other"
    other.mkdir()
    _one_f32(other / "model.safetensors")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shard = shard.replace("/ABS", str(other))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(ModelError, match=f"ckpt: shard '{shard}' is outside the checkpoint directory"):
        SafetensorsIndex.from_dir(ckpt)


def test_symlinks_must_stay_inside_unless_allowed(tmp_path):
    from nexusrt.models.paths import CheckpointDir

    other = tmp_path / "other"
    other.mkdir()
    _one_f32(other / "model.safetensors")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").symlink_to(other / "model.safetensors")
    with pytest.raises(ModelError, match="ckpt/model.safetensors: resolves to .*other/model.safetensors, outside "
                                         "the checkpoint directory"):
        SafetensorsIndex.from_dir(ckpt)
    assert "w" in SafetensorsIndex.from_dir(CheckpointDir(ckpt, allow=[other]))
    # A bare string would be trusted character by character ("/" among them: the whole filesystem).
    for bad, match in (("/nonexistent", "the single path '/nonexistent'"), (5, "got int"), ([""], "non-empty")):
        with pytest.raises(TypeError, match=match):
            CheckpointDir(ckpt, allow=bad)
    # a link inside the directory is fine
    (ckpt / "model.safetensors").unlink()
    _one_f32(ckpt / "real.bin")
    (ckpt / "model.safetensors").symlink_to("real.bin")
    assert "w" in SafetensorsIndex.from_dir(ckpt)


def test_hf_cache_snapshot_may_link_into_its_blobs(tmp_path):
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    _one_f32(repo / "blobs" / "deadbeef")
    (snap / "model.safetensors").symlink_to("../../blobs/deadbeef")
    assert SafetensorsIndex.from_dir(snap).info("w").shape == (2, 3)


def test_weight_map_types(tmp_path):
    _one_f32(tmp_path / "s1.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    for wmap, message in (([1], "weight_map must be a JSON object, got list"),
                          ({"w": 3}, "weight_map.w must be a string, got 3")):
        index.write_text(json.dumps({"weight_map": wmap}))
        with pytest.raises(ModelError, match=message):
            SafetensorsIndex.from_dir(tmp_path)
