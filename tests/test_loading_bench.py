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
