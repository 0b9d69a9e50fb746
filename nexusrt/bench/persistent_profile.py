"""Where a persistent decode step's time goes, per phase (``--persistent-profile``).

With ``NEXUSRT_PERSISTENT_PROFILE=1`` the kernel records three SM clocks per instruction of the
last step: before its waits, after them, and after its signal. :func:`phase_rows` turns them into one row per opcode: how much of the SMs' time the
instructions of that phase spent waiting on counters and working, and the bytes they move
(``megakernel.balance.instruction_bytes`` at the step's real context) over the working time,
summed over the SMs: the memory throughput of the phase while it runs.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..backends.cuda.megakernel.balance import instruction_bytes


def phase_rows(program, clocks: np.ndarray, clock_hz: float, context: int) -> list[dict]:
    """One dict per opcode, in opcode order: ``phase``, ``count``, ``wait_share`` / ``work_share`` (of
    the SMs' summed step time), ``bytes`` and ``work_gb_s`` (bytes / the phase's working time per SM).
    ``clocks``: int64 ``[rows, 3]`` in the order of ``program.pack()``; ``clock_hz``: the SM clock."""
    if clock_hz <= 0:
        raise ValueError(f"clock_hz must be positive, got {clock_hz!r}")
    cfg = program.config
    wait, work, nbytes, count = defaultdict(int), defaultdict(int), defaultdict(int), defaultdict(int)
    row = 0
    span_total = 0
    for instructions in program.sm_instructions():
        if not instructions:
            continue
        c = clocks[row:row + len(instructions)].astype(np.int64)
        if (c[:, 1] < c[:, 0]).any() or (c[:, 2] < c[:, 1]).any():
            raise ValueError(f"the clock record of SM rows {row}..{row + len(instructions) - 1} is not ordered "
                             "(was the step run with NEXUSRT_PERSISTENT_PROFILE=1?)")
        span_total += int(c[-1, 2] - c[0, 0])
        for ins, (t0, t1, t2) in zip(instructions, c):
            count[ins.op] += 1
            wait[ins.op] += int(t1 - t0)
            work[ins.op] += int(t2 - t1)
            nbytes[ins.op] += instruction_bytes(ins, cfg, weight_bytes=2, kv_bytes=2, context=context,
                                                splits=program.attn_splits)
        row += len(instructions)
    sms = max(1, sum(1 for li in program.lists if li))
    rows = []
    for op in sorted(count):  # by opcode: step order, but for SAMPLE_GATHER (12, added last)
        work_s = work[op] / clock_hz / sms  # per SM, as the phase's SMs run side by side
        rows.append({"phase": op.name.lower(), "count": count[op], "wait_share": wait[op] / max(span_total, 1),
                     "work_share": work[op] / max(span_total, 1), "bytes": nbytes[op],
                     "work_gb_s": nbytes[op] / work_s / 1e9 if work_s > 0 else float("nan")})
    return rows


def profile_step(model, prompt, new_tokens: int) -> dict:
    """Generate ``new_tokens`` greedily through the persistent kernel with clocks recorded, and
    return ``{"clock_mhz", "context", "rows"}`` for its last step (the rated SM clock converts
    cycles to seconds: the figures are as good as the card holds that clock)."""
    from ..backends.cuda.persistent import ENV, PROFILE_ENV
    from ..engine.llm import LLM
    from ..reference.sampling import SamplingParams
    from .common import env_set

    with env_set(**{ENV: "persistent", PROFILE_ENV: "1"}):
        llm = LLM(model, max_context=len(prompt) + new_tokens + 16)
    try:
        llm.runner.generate_tokens(prompt, new_tokens, SamplingParams(temperature=0.0), lambda _t: False)
        dec = llm.runner._persistent
        record = next((r for r in (dec.clock_record(True), dec.clock_record(False)) if r is not None), None)
        if record is None:
            raise RuntimeError("the persistent kernel ran no profiled step")
        clock_hz = llm.runner.rt.device.attribute("CLOCK_RATE") * 1e3
        context = len(prompt) + new_tokens - 1
        return {"clock_mhz": clock_hz / 1e6, "context": context,
                "rows": phase_rows(record[0], record[1], clock_hz, context)}
    finally:
        llm.close()


def render(profile: dict) -> str:
    """The phase table as text (shares of the SMs' summed time; GB/s over the phase's working time)."""
    rows = profile["rows"]
    lines = [f"persistent kernel per phase: the last step of a profiled run (context {profile['context']}, "
             f"cycles at the rated {profile['clock_mhz']:.0f} MHz); wait/work: shares of the SMs' summed time",
             f"{'phase':<16}{'tiles':>7}{'wait':>8}{'work':>8}{'MB':>10}{'GB/s working':>14}"]
    for r in rows:
        lines.append(f"{r['phase']:<16}{r['count']:>7}{r['wait_share']:>8.1%}{r['work_share']:>8.1%}"
                     f"{r['bytes'] / 1e6:>10.2f}{r['work_gb_s']:>14.0f}")
    wait, work = sum(r["wait_share"] for r in rows), sum(r["work_share"] for r in rows)
    lines.append(f"{'all':<16}{sum(r['count'] for r in rows):>7}{wait:>8.1%}{work:>8.1%}"
                 f"{sum(r['bytes'] for r in rows) / 1e6:>10.2f}")
    return "\n".join(lines)
