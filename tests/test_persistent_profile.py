"""The persistent kernel's per-phase profile (bench/persistent_profile.py) and its switch, on the
CPU: a lowered program of the 1B shape and a made-up clock record whose sums are known."""

from __future__ import annotations

import numpy as np
import pytest

from nexusrt.backends.cuda.megakernel.balance import instruction_bytes
from nexusrt.backends.cuda.megakernel.lower import lower, skeleton
from nexusrt.backends.cuda.persistent import PROFILE_ENV, profiling
from nexusrt.bench.persistent_profile import phase_rows, render
from nexusrt.models.presets import preset

SMS = 132


@pytest.fixture(scope="module")
def program():
    cfg = preset("llama-3.2-1b")
    return lower(skeleton(cfg), cfg, SMS, 16, attn_splits=16)


def _clocks(program, wait_of, work_of):
    """Rows in pack order; each SM's instructions back to back, the waits and work per opcode given."""
    rows = []
    for instructions in program.sm_instructions():
        t = 1000
        for ins in instructions:
            t0, t1 = t, t + wait_of(ins)
            t2 = t1 + work_of(ins)
            rows.append((t0, t1, t2))
            t = t2
    return np.array(rows, np.int64)


def test_phase_rows_sum_the_waits_work_and_bytes_of_each_opcode(program):
    wait_of = lambda ins: 30 if ins.op.name == "GATE_UP" else 10  # noqa: E731
    work_of = lambda ins: 100  # noqa: E731
    clocks = _clocks(program, wait_of, work_of)
    rows = phase_rows(program, clocks, clock_hz=1e9, context=159)
    by = {r["phase"]: r for r in rows}
    counts = {}
    for ins in program.instructions:
        counts[ins.op.name.lower()] = counts.get(ins.op.name.lower(), 0) + 1
    assert {p: r["count"] for p, r in by.items()} == counts
    span = sum(wait_of(i) + work_of(i) for i in program.instructions)  # back to back: the spans add up
    gate = by["gate_up"]
    assert gate["wait_share"] == pytest.approx(30 * counts["gate_up"] / span)
    assert gate["work_share"] == pytest.approx(100 * counts["gate_up"] / span)
    assert sum(r["wait_share"] + r["work_share"] for r in rows) == pytest.approx(1.0)
    want = sum(instruction_bytes(i, program.config, weight_bytes=2, kv_bytes=2, context=159, splits=16)
               for i in program.instructions if i.op.name == "GATE_UP")
    assert gate["bytes"] == want
    # GB/s: bytes over the phase's working seconds per SM (100 cycles at 1 GHz per tile)
    assert gate["work_gb_s"] == pytest.approx(want / (counts["gate_up"] * 100e-9 / SMS) / 1e9)
    assert [r["phase"] for r in rows][:2] == ["embed", "qkv"]  # step order
    text = render({"rows": rows, "clock_mhz": 1000.0, "context": 159})
    assert "gate_up" in text and "context 159" in text


def test_phase_rows_refuse_a_record_that_was_not_written(program):
    clocks = _clocks(program, lambda i: 5, lambda i: 5)
    clocks[7] = (50, 40, 30)  # never-written or foreign rows run backwards
    with pytest.raises(ValueError, match="not ordered"):
        phase_rows(program, clocks, 1e9, 159)
    with pytest.raises(ValueError, match="clock_hz must be positive"):
        phase_rows(program, clocks, 0.0, 159)


def test_the_profile_switch_takes_0_or_1_only():
    assert profiling({}) is False
    assert profiling({PROFILE_ENV: "1"}) is True and profiling({PROFILE_ENV: " 0 "}) is False
    with pytest.raises(ValueError, match=f"{PROFILE_ENV}='yes'"):
        profiling({PROFILE_ENV: "yes"})
