"""``nexusrt-bench --stage load`` on the CPU backend (the GPU run is the lead's, on the H100)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import nexusrt as nrt
from nexusrt.bench import load as load_stage
from nexusrt.bench.main import build_parser, main
from nexusrt.models.streaming import save_synthetic_checkpoint


@pytest.fixture(autouse=True)
def _shutdown():
    nrt.firmware.shutdown()
    yield
    nrt.firmware.shutdown()


def test_default_json_run(tmp_path, capsys):
    rc = main(["--stage", "load", "--backend", "cpu", "--json", "--load-dir", str(tmp_path), "--load-runs", "2"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert out.err == ""  # --json: no progress bar
    res = json.loads(out.out)
    assert "CPU backend: loaded nexusrt:stdlib-tiny" in res["note"]
    assert list(tmp_path.iterdir()) == []  # nothing saved on the CPU
    assert Path(res["dir"]).joinpath("model.safetensors").is_file()  # the shipped files are left alone
    whats = [(r["what"], r["cache"]) for r in res["rows"]]
    assert whats == [("plain sequential read", "cold"), ("plain sequential read", "warm"),
                     ("nexusrt staging", "cold"), ("nexusrt staging", "warm")]
    assert all(r["gb_per_s"] > 0 and r["seconds"] > 0 for r in res["rows"])
    assert res["rows"][0]["vs_read"] == pytest.approx(1.0)
    assert res["reports"]["staging"]["path"] == "staging" and res["verified"] == {"staging": True}
    assert [t["cache"] for t in res["targets"]] == ["cold", "warm"]
    assert res["peer"].startswith("CPU backend")


def test_a_named_synthetic_model_is_saved_and_removed_on_the_cpu(tmp_path, capsys):
    rc = main(["--stage", "load", "--backend", "cpu", "--model", "synthetic:tiny", "--json",
               "--load-dir", str(tmp_path), "--load-runs", "1", "--load-no-peer"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    res = json.loads(out.out)
    assert res["note"] == "" and res["save_s"] > 0 and res["verified"] == {"staging": True}
    assert list(tmp_path.iterdir()) == []  # the temporary checkpoint is gone


def test_checkpoint_dir_is_kept_and_rendered(tmp_path):
    ck = save_synthetic_checkpoint("tiny", tmp_path / "ck")
    args = build_parser().parse_args(["--stage", "load", "--backend", "cpu", "--model", str(ck),
                                      "--load-runs", "1", "--load-no-peer"])
    res = load_stage.run(args)
    assert (ck / "model.safetensors").is_file()
    text = load_stage.render(res)
    for needle in ("plain sequential read", "nexusrt staging", "cold", "warm", "vs read", "target nexusrt staging"):
        assert needle in text
    assert "BYTES DIFFER" not in text and "skipped (--load-no-peer)" in text


def test_bad_arguments(tmp_path, capsys):
    assert main(["--stage", "load", "--backend", "cpu", "--model", str(tmp_path / "none")]) == 1
    assert "neither synthetic" in capsys.readouterr().err
    assert main(["--stage", "load", "--backend", "cpu", "--load-runs", "0"]) == 1
    assert main(["--stage", "load", "--backend", "cpu", "--load-dir", str(tmp_path), "--load-readers", "6"]) == 1
    assert "readers" in capsys.readouterr().err


def test_page_cache_helpers(tmp_path):
    from nexusrt.models.streaming.pagecache import evict, filesystem_of, resident_fraction

    f = tmp_path / "data.bin"
    f.write_bytes(np_bytes(3 << 20))
    f.read_bytes()
    before = resident_fraction([f])
    assert before is not None and 0.0 <= before <= 1.0
    # Without a writable drop_caches (not root), eviction goes file by file.
    assert evict([f], drop_caches=str(tmp_path / "no" / "drop_caches")) == "fadvise"
    after = resident_fraction([f])
    assert 0.0 <= after <= before or filesystem_of(f) == "tmpfs"  # tmpfs pages cannot be dropped
    assert evict([tmp_path / "missing"], drop_caches=str(tmp_path / "no" / "x")).startswith("failed")
    assert filesystem_of(tmp_path) != ""


def test_drop_caches_only_when_asked(tmp_path, monkeypatch):
    import builtins

    from nexusrt.models.streaming.pagecache import DROP_CACHES, evict

    f = tmp_path / "data.bin"
    f.write_bytes(b"x" * 4096)
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    assert evict([f]) == "fadvise"
    assert DROP_CACHES not in opened  # the default never writes the machine-wide switch
    switch = tmp_path / "drop_caches"
    assert evict([f], drop_caches=str(switch)) == "drop_caches" and switch.read_text() == "3\n"


def np_bytes(n: int) -> bytes:
    import numpy as np

    return np.random.default_rng(5).integers(0, 256, size=n, dtype=np.uint8).tobytes()


@pytest.fixture
def no_checkpoint(monkeypatch):
    """Reaching the checkpoint (saving or opening one) fails the test: a refusal must come first."""
    def refuse(*_a, **_k):
        raise AssertionError("the stage went past its checks")

    monkeypatch.setattr(load_stage, "_checkpoint", refuse)


@pytest.mark.parametrize("argv, message", [
    (["--load-buffer-mib", "-1"], "--load-buffer-mib must be >= 1, got -1"),
    (["--load-buffer-mib", "0"], "--load-buffer-mib must be >= 1, got 0"),
    (["--load-readers", "9"], "--load-readers must be in 1..5 (fewer than --load-buffers 6: a buffer is always being "
                              "copied), got 9"),
    (["--load-readers", "0", "--load-buffers", "3"], "--load-readers must be in 1..2 (fewer than --load-buffers 3: a "
                                                     "buffer is always being copied), got 0"),
    (["--load-buffers", "1"], "--load-buffers must be >= 2 (one filling, one copying), got 1"),
    (["--load-budget-s", "-1"], "--load-budget-s must be >= 0, got -1.0"),
    (["--load-budget-s", "nan"], "--load-budget-s must be >= 0, got nan"),
])
def test_staging_refusals_name_the_flags(argv, message, capsys, no_checkpoint):
    assert main(["--stage", "load", "--backend", "cpu", *argv]) == 1
    err = capsys.readouterr().err
    assert err == f"nexusrt-bench: error: {message}\n"
    assert "buffer_bytes" not in err and "buffers-1" not in err


def test_staging_buffers_past_the_available_memory_are_refused(capsys, monkeypatch, no_checkpoint):
    from nexusrt.bench import common

    monkeypatch.setattr(common, "host_available", lambda: (1 << 30, "MemAvailable"))
    assert main(["--stage", "load", "--backend", "cpu", "--load-buffer-mib", "512"]) == 1
    assert capsys.readouterr().err == (
        "nexusrt-bench: error: --load-buffers 6 x --load-buffer-mib 512 (the staging buffers) needs 3.0 GiB of host "
        "memory but this machine has 1.0 GiB available now (MemAvailable); give fewer or smaller buffers\n")


def test_a_load_dir_that_cannot_take_the_checkpoint_is_said(tmp_path, capsys, no_checkpoint):
    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")
    cases = [(str(tmp_path / "missing"), "does not exist"), (str(a_file), "is not a directory")]
    if Path("/proc").is_dir():
        cases.append(("/proc", "is not writable (no file can be created there)"))  # it exists: not "No such file"
    for folder, why in cases:
        assert main(["--stage", "load", "--backend", "cpu", "--model", "synthetic:tiny", "--load-dir", folder]) == 1
        assert capsys.readouterr().err == f"nexusrt-bench: error: --load-dir {folder!r} {why}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # the checks leave nothing behind


def test_a_folder_the_save_cannot_make_names_load_dir(tmp_path, capsys, monkeypatch):
    import tempfile

    def refused(*_a, **_k):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    assert main(["--stage", "load", "--backend", "cpu", "--model", "synthetic:tiny", "--load-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"nexusrt-bench: error: --load-dir {str(tmp_path)!r} is not writable: no folder "
                                       "can be created there (No such file or directory)\n")
