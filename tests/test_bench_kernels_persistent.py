"""The kernels stage's persistent-kernel section (bench/kernels_persistent.py) on the CPU: which
filter keeps it, which graph kernels stand beside which phases, and the table it prints from a
lowered 1B program and a made-up clock record."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from nexusrt.backends.cuda.megakernel.lower import lower, skeleton
from nexusrt.bench import kernels, kernels_persistent as kp
from nexusrt.bench.persistent_profile import phase_rows
from nexusrt.models.presets import preset


def _row(name, gb_s, group="gemv"):
    return {"name": name, "group": group, "gb_s": gb_s, "pct_bw": 100 * gb_s / 4000.0, "bytes": 1, "us": 1.0,
            "us_min": 1.0, "notes": {}}


GRAPH_ROWS = [_row("gemv qkv 3072x2048", 2100.0), _row("gemv qkv 3072x2048 (ring)", 1.0),
              _row("gemv o 2048x2048", 2200.0), _row("gemv gate_up 16384x2048", 3600.0),
              _row("gemv gate_up 16384x2048 m=2", 2.0), _row("gemv down 2048x8192", 3500.0),
              _row("gemv lm_head 128256x2048", 3900.0), _row("gemv qkv+rope 3072x2048", 3.0),
              _row("attention_decode ctx64 hq32 hkv8 d64", 50.0, group="attention")]


@pytest.mark.parametrize("text, keep", [("", True), ("persistent", True), ("decode", True),
                                        ("gemv", False), ("attention", False), ("Persistent", False)])
def test_the_kernel_filter_keeps_the_section_as_it_keeps_a_case(text, keep):
    assert kp.wanted(text) is keep


def test_each_gemv_phase_stands_beside_the_decode_graphs_own_kernel():
    found = kp.graph_gemv_rows(GRAPH_ROWS)
    assert {k: v["gb_s"] for k, v in found.items()} == {"qkv": 2100.0, "o": 2200.0, "gate_up": 3600.0,
                                                        "down": 3500.0, "lm_head": 3900.0}


@pytest.fixture(scope="module")
def profile():
    cfg = preset("llama-3.2-1b")
    program = lower(skeleton(cfg), cfg, 132, 16, attn_splits=16)
    rows = []
    for instructions in program.sm_instructions():  # each SM's tiles back to back: 10 cycles waiting, 90 working
        t = 0
        for _ in instructions:
            rows.append((t, t + 10, t + 100))
            t += 100
    clocks = np.array(rows, np.int64)
    return {"clock_mhz": 1000.0, "context": 47, "rows": phase_rows(program, clocks, 1e9, 47)}


def test_the_table_puts_the_graph_kernel_beside_its_phase_and_nothing_beside_the_others(profile):
    text = kp.render(profile, GRAPH_ROWS, bandwidth=4.0e12)
    lines = {line.split()[0]: line for line in text.splitlines()[3:]}
    assert set(lines) == {r["phase"] for r in profile["rows"]}
    assert lines["gate_up"].split()[-2:] == ["3600", "90.0%"]
    assert lines["o_proj"].split()[-2:] == ["2200", "55.0%"]
    assert lines["attention"].split()[-2:] == ["-", "-"]
    gate = next(r for r in profile["rows"] if r["phase"] == "gate_up")
    assert gate["work_share"] == pytest.approx(9 * gate["wait_share"])  # every tile waited 10 of its 100 cycles
    assert lines["gate_up"].split()[2:4] == [f"{gate['wait_share']:.1%}", f"{gate['work_share']:.1%}"]
    assert f"{gate['work_gb_s']:.0f}" in lines["gate_up"].split()
    assert "context 47" in text and "1000 MHz" in text


def test_a_skipped_section_says_why_and_the_stage_prints_it():
    text = kp.render({"skipped": "the persistent decode kernel needs an sm_90 GPU; this one is sm_80"}, [], 4e12)
    assert text == f"{kp.NAME}: not run: the persistent decode kernel needs an sm_90 GPU; this one is sm_80"
    whole = kernels.render({"backend": "cuda", "device": "A100", "arch": "sm_80", "model": "m",
                            "read_bandwidth_bytes_s": 1.5e12, "peak_bandwidth_bytes_s": None, "repeats": 20,
                            "cases": [GRAPH_ROWS[0]], "errors": [],
                            "persistent": {"skipped": "needs sm_90"}})
    assert whole.splitlines()[-1] == f"{kp.NAME}: not run: needs sm_90"


def test_a_device_that_is_not_sm_90_is_not_profiled():
    rt = SimpleNamespace(profile=SimpleNamespace(compute_capability=(8, 0)))
    got = kp.measure(rt, "synthetic:llama-3.2-1b")
    assert got == {"skipped": "the persistent decode kernel needs an sm_90 GPU; this one is sm_80"}
