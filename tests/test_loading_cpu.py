"""The streaming loader end to end on the CPU backend: bytes, conversions, bad input, cleanup."""

from __future__ import annotations

import io
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from nexusrt import memory
from nexusrt.errors import BackendUnavailable, ModelError
from nexusrt.models.safetensors import SafetensorsIndex, TensorInfo, read_tensor
from nexusrt.models.streaming import LoadItem, ProgressBar, SafetensorsWriter, StagingConfig, load_tensors
from nexusrt.models.streaming import cufile_path, plan, staging

SMALL = StagingConfig(buffers=3, buffer_bytes=4096, readers=2)  # many chunks from small tensors
ST_TO_NRT = {"BF16": "bf16", "F32": "fp32", "F16": "fp16", "I32": "int32"}


def _random(rng, dtype: str, shape):
    if dtype == "BF16":
        return rng.standard_normal(shape).astype(np.float32).astype(ml_dtypes.bfloat16)
    if dtype == "I32":
        return rng.integers(-1000, 1000, size=shape, dtype=np.int32)
    return rng.standard_normal(shape).astype({"F32": np.float32, "F16": np.float16}[dtype])


def write_checkpoint(path, spec: dict, seed: int = 0) -> dict:
    """Write {name: (dtype, shape)} with random values; returns {name: array}."""
    rng = np.random.default_rng(seed)
    values = {n: _random(rng, dt, sh) for n, (dt, sh) in spec.items()}
    with SafetensorsWriter(path, [(n, dt, tuple(sh)) for n, (dt, sh) in spec.items()]) as w:
        for n, v in values.items():
            w.write(n, v)
    return values


SPEC_A = {"embed": ("BF16", (300, 40)), "norm": ("F32", (40,)), "q": ("BF16", (40, 40)),
          "k": ("BF16", (20, 40)), "ids": ("I32", (7,)), "big32": ("F32", (129, 33))}
SPEC_B = {"down": ("BF16", (40, 160)), "up": ("F32", (160, 40))}


@pytest.fixture
def ckpt(tmp_path):
    vals = write_checkpoint(tmp_path / "a.safetensors", SPEC_A, seed=1)
    vals.update(write_checkpoint(tmp_path / "b.safetensors", SPEC_B, seed=2))
    return tmp_path, vals, SafetensorsIndex.from_dir(tmp_path)


def _verbatim_items(index):
    return [LoadItem(i, memory.empty(i.shape, ST_TO_NRT[i.dtype])) for i in index.tensors.values()]


def _free(items):
    for it in items:
        it.dst.free()


def _loader_tags():
    return [a for a in memory.audit() if a["tag"] in ("load_staging", "load_scratch")]


@pytest.mark.parametrize("config", [SMALL, StagingConfig(buffers=2, buffer_bytes=8192, readers=1), None])
def test_staging_is_byte_exact_across_files(cpu_rt, ckpt, config):
    _, vals, index = ckpt
    items = _verbatim_items(index)
    seen = []
    rep = load_tensors(cpu_rt, items, progress=lambda d, t: seen.append((d, t)), staging=config)
    for it in items:
        assert np.array_equal(it.dst.array.view(np.uint8), vals[it.info.name].view(np.uint8)), it.info.name
    assert rep.path == "staging" and "CPU backend" in rep.why and rep.cufile_error is None
    assert rep.nbytes == sum(v.nbytes for v in vals.values()) and rep.tensors == len(vals)
    assert set(rep.files) == {str(f.path) for f in index.files}
    assert all(fs.read_bytes >= fs.nbytes and fs.reads >= 1 for fs in rep.files.values())
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == seen[-1][1] == rep.read_bytes
    assert rep.as_dict()["gb_per_s"] > 0
    _free(items)
    assert memory.audit() == []


def test_conversions_on_the_cpu_backend(cpu_rt, ckpt):
    _, vals, index = ckpt
    items = [LoadItem(index.info("big32"), memory.empty((129, 33), "bf16"), convert="bf16"),
             LoadItem(index.info("up"), memory.empty((160, 40), "bf16"), convert="bf16"),
             LoadItem(index.info("q"), memory.empty((40, 40), "fp32"), convert="fp32"),
             LoadItem(index.info("k"), memory.empty((20, 40), "bf16"), convert="bf16"),  # already bf16
             LoadItem(index.info("norm"), memory.empty((40,), "fp32"), convert="fp32")]
    rep = load_tensors(cpu_rt, items, staging=SMALL)
    assert rep.converted == 3
    want = {"big32": vals["big32"].astype(ml_dtypes.bfloat16), "up": vals["up"].astype(ml_dtypes.bfloat16),
            "q": vals["q"].astype(np.float32), "k": vals["k"], "norm": vals["norm"]}
    for it in items:
        assert np.array_equal(it.dst.array.view(np.uint8), want[it.info.name].view(np.uint8)), it.info.name
    assert _loader_tags() == []
    _free(items)


def test_into_a_fused_destination(cpu_rt, ckpt):
    _, vals, index = ckpt
    fused = memory.empty((60, 40), "bf16")
    rep = load_tensors(cpu_rt, [LoadItem(index.info("q"), fused[0:40]), LoadItem(index.info("k"), fused[40:60])])
    assert np.array_equal(fused.array, np.concatenate([vals["q"], vals["k"]]))
    assert rep.tensors == 2
    fused.free()


def test_cufile_is_never_touched_on_the_cpu_backend(cpu_rt, ckpt, monkeypatch):
    _, _, index = ckpt

    def boom(rt):
        raise AssertionError("driver_for called on the CPU backend")

    monkeypatch.setattr("nexusrt.models.streaming.loader.driver_for", boom)
    items = _verbatim_items(index)
    assert load_tensors(cpu_rt, items).path == "staging"
    with pytest.raises(BackendUnavailable, match="CUDA backend"):
        load_tensors(cpu_rt, items, prefer="cufile")
    with pytest.raises(ValueError, match="prefer"):
        load_tensors(cpu_rt, items, prefer="gds")
    with pytest.raises(cufile_path.CuFileFailed, match="needs the CUDA backend"):
        cufile_path.driver_for(cpu_rt)  # the gate itself refuses before importing anything
    _free(items)


# -- bad input ---------------------------------------------------------------------------------
def _write_raw(path, header, data: bytes, length=None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def test_truncated_mid_tensor_names_file_and_tensor(cpu_rt, ckpt):
    d, _, index = ckpt
    items = _verbatim_items(index)
    a = d / "a.safetensors"
    cut = index.info("big32").offset + 100
    os.truncate(a, cut)
    with pytest.raises(ModelError, match=r"a\.safetensors: tensor 'big32': .* runs past the end"):
        load_tensors(cpu_rt, items, staging=SMALL)
    assert _loader_tags() == []
    assert all(it.dst.is_live for it in items)  # nothing the caller owns was freed
    _free(items)
    assert memory.audit() == []
    with pytest.raises(ModelError, match="a.safetensors"):  # and the parser says so at open
        SafetensorsIndex.from_dir(d)


def test_file_shrinking_during_the_load_releases_everything(cpu_rt, ckpt, monkeypatch):
    """Bounds pass (the stat is stale), then the read comes up short inside a tensor."""
    d, _, index = ckpt
    a = d / "a.safetensors"
    size = a.stat().st_size
    monkeypatch.setattr(plan, "file_size", lambda p: size)
    os.truncate(a, index.info("q").offset + 10)
    items = _verbatim_items(index)
    with pytest.raises(ModelError, match=r"a\.safetensors: tensor 'q': the file ends at byte \d+, inside"):
        load_tensors(cpu_rt, items, staging=SMALL)
    assert _loader_tags() == []
    _free(items)
    assert memory.audit() == []


def fail_read(monkeypatch, nth: int) -> None:
    """Make the staging path's ``nth`` read raise an I/O error (reads before it succeed)."""
    calls = {"n": 0}
    real = staging.read_into

    def flaky(fd, view, offset):
        calls["n"] += 1
        if calls["n"] == nth:
            raise OSError(5, "Input/output error")
        return real(fd, view, offset)

    monkeypatch.setattr(staging, "read_into", flaky)


def test_read_error_mid_load_releases_buffers_and_scratch(cpu_rt, ckpt, monkeypatch):
    _, _, index = ckpt
    fail_read(monkeypatch, 4)
    items = [LoadItem(i, memory.empty(i.shape, "bf16"), convert="bf16") for i in index.tensors.values()
             if i.dtype in ("F32", "BF16")]
    with pytest.raises(ModelError, match=r"\.safetensors: tensor '\w+': cannot read bytes .*Input/output error"):
        load_tensors(cpu_rt, items, staging=SMALL)
    assert _loader_tags() == []
    _free(items)
    assert memory.audit() == []


def test_offsets_past_the_end_and_overlaps(cpu_rt, tmp_path):
    f = tmp_path / "m.safetensors"
    write_checkpoint(f, {"a": ("F32", (8,)), "b": ("F32", (8,))})
    size = f.stat().st_size
    dst = memory.empty((8,), "fp32")
    with pytest.raises(ModelError, match=r"m\.safetensors: tensor 'ghost': bytes .* starts past the end"):
        load_tensors(cpu_rt, [LoadItem(TensorInfo("ghost", "F32", (8,), f, size + 8, 32), dst)])
    other = memory.empty((8,), "fp32")
    with pytest.raises(ModelError, match=r"tensors 'x' .* and 'y' .* overlap"):
        load_tensors(cpu_rt, [LoadItem(TensorInfo("x", "F32", (8,), f, size - 64, 32), dst),
                              LoadItem(TensorInfo("y", "F32", (8,), f, size - 48, 32), other)])
    assert _loader_tags() == []
    dst.free()
    other.free()


@pytest.mark.parametrize("make,message", [
    (lambda p: _write_raw(p, None, b"", length=4) or p.write_bytes(struct.pack("<Q", 4) + b"{no}"), "not valid JSON"),
    (lambda p: _write_raw(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), length=10**6),
     "larger than the file"),
    (lambda p: _write_raw(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)), "overlap"),
    (lambda p: _write_raw(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(10)),
     "tensor 'w'.*truncated"),
])
def test_bad_headers_are_refused_before_loading(tmp_path, make, message):
    make(tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match=message) as e:
        SafetensorsIndex.from_dir(tmp_path)
    assert "model.safetensors" in str(e.value)


# -- the progress bar --------------------------------------------------------------------------
class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_waits_a_second_and_only_on_a_terminal():
    t = {"now": 0.0}
    out = _Tty()
    bar = ProgressBar("load", stream=out, clock=lambda: t["now"])
    bar(10, 100)
    assert out.getvalue() == ""  # under a second: quiet
    t["now"] = 1.5
    bar(50, 100)
    assert "50.0%" in out.getvalue() and "load" in out.getvalue()
    t["now"] = 1.55
    bar(60, 100)
    assert "60.0%" not in out.getvalue()  # at most ten redraws a second
    t["now"] = 1.6
    bar(100, 100)  # the last update is always drawn
    bar.close()
    assert "100.0%" in out.getvalue() and out.getvalue().endswith("\n")
    quiet = io.StringIO()  # not a terminal
    t["now"] = 0.0
    bar2 = ProgressBar(stream=quiet, clock=lambda: t["now"])
    t["now"] = 5
    bar2(1, 2)
    bar2.close()
    off = _Tty()
    bar3 = ProgressBar(stream=off, enabled=False, clock=lambda: t["now"])  # --json
    t["now"] = 10
    bar3(1, 2)
    assert quiet.getvalue() == "" and off.getvalue() == ""


def test_loaded_bytes_match_the_reference_reader(cpu_rt, ckpt):
    """Independent oracle: our file reader (np.fromfile) and the reference library agree with the load."""
    from safetensors.numpy import load_file

    d, _, index = ckpt
    items = _verbatim_items(index)
    load_tensors(cpu_rt, items, staging=SMALL)
    ref = {**load_file(str(d / "a.safetensors")), **load_file(str(d / "b.safetensors"))}
    for it in items:
        want = read_tensor(it.info)
        assert np.array_equal(it.dst.array.view(np.uint8).reshape(-1), want.view(np.uint8).reshape(-1))
        assert np.array_equal(np.ascontiguousarray(ref[it.info.name]).view(np.uint8).reshape(-1),
                              want.view(np.uint8).reshape(-1))
    _free(items)
