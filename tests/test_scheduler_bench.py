"""``nexusrt-bench --stage scheduler`` end to end (CPU here, CUDA under the gpu marker)."""

from __future__ import annotations

import json

import pytest

from nexusrt.bench.main import main


def _run(capsys, backend):
    rc = main(["--stage", "scheduler", "--json", "--backend", backend,
               "--scheduler-launches", "50", "--scheduler-repeats", "5"])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def test_scheduler_bench_on_cpu_is_labelled_cpu(capsys):
    r = _run(capsys, "cpu")
    assert r["backend"] == "cpu" and r["label"].startswith("CPU")
    keys = [row["key"] for row in r["rows"]]
    assert keys == ["direct", "stage", "graph_node", "doorbell"]
    assert all(row["us"] > 0 and row["what"].startswith("CPU") for row in r["rows"])
    if r["torch"]["available"]:
        assert r["ratios"]["stage"] == pytest.approx(r["rows"][1]["us"] / r["torch"]["eager"])


def test_scheduler_bench_table_renders(capsys):
    rc = main(["--stage", "scheduler", "--backend", "cpu", "--scheduler-launches", "20",
               "--scheduler-repeats", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "NexusRT scheduler" in text and "doorbell round trip" in text


@pytest.mark.gpu
def test_scheduler_bench_on_cuda(capsys):
    r = _run(capsys, "cuda")
    assert r["backend"] == "cuda" and r["label"].startswith("CUDA")
    us = {row["key"]: row["us"] for row in r["rows"]}
    assert all(v > 0 for v in us.values())
    # A replayed node costs no Python: it must beat enqueueing the same stage one by one.
    assert us["graph_node"] < us["stage"]
    if r["torch"]["available"]:
        assert r["torch"]["graph_node"] > 0 and "graph_node" in r["ratios"]
