"""``nexusrt-bench --stage memory`` on the CPU backend: runs, labels itself, reports every figure."""

from __future__ import annotations

import json
import re

import pytest

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


def _refusal(capsys, argv, pattern):
    assert main(argv) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and "internal error" not in err, err
    assert lines[0].startswith("nexusrt-bench: error: ") and re.search(pattern, lines[0]), lines[0]


def test_a_size_past_the_available_memory_is_refused_before_any_allocation(capsys, monkeypatch):
    """--mem-size-mib N holds four buffers of N at once on the CPU: a size whose peak does not fit
    the host memory available now is refused up front (the memory simulated, nothing allocated)."""
    from nexusrt.bench import common
    from nexusrt.bench import memory as stage

    nrt.firmware.shutdown()

    def no_work(*_a, **_k):
        raise AssertionError("the stage measured before the refusal")

    for name in ("page_costs", "alloc_latency", "bandwidth"):
        monkeypatch.setattr(stage, name, no_work)
    monkeypatch.setattr(common, "host_available", lambda: (2 << 30, "MemAvailable"))
    _refusal(capsys, ["--stage", "memory", "--backend", "cpu", "--mem-size-mib", "1024"],
             r"--mem-size-mib 1024 \(four buffers of 1024 MiB on the CPU backend: two arena, one pinned, "
             r"one pageable\) needs 4.2 GiB of host memory but this machine has 2.0 GiB available now \(MemAvailable\); "
             r"give --mem-size-mib 448 or less$")
    assert not nrt.runtime.is_initialized() and nrt.memory.audit() == []


def test_the_suggested_size_fits_and_one_more_does_not():
    from nexusrt.bench.memory import check_room

    for is_cuda in (False, True):
        host, device = (3 << 30, "MemAvailable"), (80 << 30, "cuMemGetInfo")
        with pytest.raises(ValueError, match=r"give --mem-size-mib (\d+) or less") as refused:
            check_room(is_cuda, 4096, 64, host, device)
        fits = int(re.search(r"give --mem-size-mib (\d+)", str(refused.value)).group(1))
        check_room(is_cuda, fits, 64, host, device)
        with pytest.raises(ValueError):
            check_room(is_cuda, fits + 1, 64, host, device)


def test_on_cuda_the_host_holds_two_buffers_and_the_device_two():
    from nexusrt.bench.memory import SLACK_BYTES, check_room, memory_need

    n = 1 << 30
    # The page figures give their device pages back before the copies: the peak is the larger of the
    # two. On the CPU the pages are address space the figures never touch: no host memory.
    assert memory_need(True, n, 64) == {"host": 2 * n + SLACK_BYTES, "device": 2 * n + SLACK_BYTES}
    assert memory_need(True, n, 4096) == {"host": 2 * n + SLACK_BYTES, "device": 4096 * (2 << 20) + SLACK_BYTES}
    assert memory_need(False, n, 4096) == {"host": 4 * n + SLACK_BYTES, "device": 0}
    with pytest.raises(ValueError, match=r"^--mem-size-mib 8192 \(a pinned and a pageable host buffer of 8192 MiB\) "
                                         r"needs 16.2 GiB of host memory but this machine has 12.0 GiB available now"):
        check_room(True, 8192, 64, (12 << 30, "MemAvailable"), (80 << 30, "cuMemGetInfo"))
    with pytest.raises(ValueError, match=r"^--mem-size-mib 8192 \(two device buffers of 8192 MiB\) needs 16.2 GiB of "
                                         r"device memory but this machine has 10.0 GiB available now \(cuMemGetInfo\); "
                                         r"give --mem-size-mib 4992 or less$"):
        check_room(True, 8192, 64, (64 << 30, "MemAvailable"), (10 << 30, "cuMemGetInfo"))
    with pytest.raises(ValueError, match=r"^--mem-pages 8000 \(8000 pages of 2 MiB\) need 15.9 GiB of device memory "
                                         r"but this machine has 10.0 GiB available now \(cuMemGetInfo\); give fewer --mem-pages$"):
        check_room(True, 64, 8000, (64 << 30, "MemAvailable"), (10 << 30, "cuMemGetInfo"))
    check_room(False, 64, 100000, (1 << 30, "MemAvailable"))  # CPU pages: address space, never touched
    check_room(True, 8192, 64, (20 << 30, "MemAvailable"), (20 << 30, "cuMemGetInfo"))  # fits both


def test_the_random_fill_makes_no_full_size_temporary():
    import tracemalloc

    import numpy as np

    from nexusrt.bench.memory import _fill_random

    out = np.zeros(8 << 20, np.uint8)
    tracemalloc.start()
    try:
        _fill_random(out, chunk=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 << 20  # a chunk's draw, not another 8 MiB
    again = np.zeros_like(out)
    _fill_random(again, chunk=1 << 20)
    assert np.array_equal(out, again) and len(np.unique(out[: 1 << 16])) > 200  # seeded, and random bytes
