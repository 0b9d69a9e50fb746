"""``nexusrt-bench --stage memory`` on the CPU backend: runs, labels itself, reports every figure."""

from __future__ import annotations

import json

import nexusrt as nrt
from nexusrt.bench.main import main


def test_memory_stage_on_cpu_is_labelled_and_complete(capsys):
    nrt.firmware.shutdown()
    argv = ["--stage", "memory", "--backend", "cpu", "--mem-size-mib", "2", "--mem-reps", "2",
            "--mem-alloc-reps", "3", "--mem-pages", "3"]
    assert main(argv + ["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["backend"] == "cpu" and "CPU figures" in r["label"]
    assert r["pages"]["pages"] == 3 and r["pages"]["unmap_release_us"] > 0
    assert [a["bytes"] for a in r["alloc"]] == [4096, 1 << 20, 64 << 20]
    assert all(a["arena_alloc_us"] > 0 and a["peer"] == "np.empty" for a in r["alloc"])
    copies = {b["copy"]: b for b in r["bandwidth"]}
    assert set(copies) == {"host->device (pinned)", "host->device (pageable)", "device->host (pinned)",
                           "device->host (pageable)", "device->device"}
    assert all(b["gb_s"] > 0 and b["of_pcie"] is None for b in copies.values())
    assert copies["device->device"]["traffic_gb_s"] == 2 * copies["device->device"]["gb_s"]
    assert not nrt.runtime.is_initialized() and nrt.memory.audit() == []
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "CPU figures" in text and "device->device" in text and "np.empty" in text
