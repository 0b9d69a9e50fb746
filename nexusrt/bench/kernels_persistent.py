"""The persistent decode kernel beside the graph path's kernels (``nexusrt-bench --stage kernels``).

The graph path runs each decode GEMV as a kernel of its own, and the kernels stage times each
alone. The persistent kernel runs them all as phases of one launch, so it cannot be timed a
kernel at a time; instead a short greedy generation runs with the kernel's clock record on
(:func:`.persistent_profile.profile_step`), and each phase is put beside the graph kernel that
does the same work, measured alone in the same run: the phase's memory throughput while its tiles
work, and the share of the SMs' time its tiles spent waiting on counters (the price of
whole-vector stage boundaries inside one launch, where the graph path pays kernel boundaries).
"""

from __future__ import annotations

import re

from .common import prompt_ids
from .table import table

NAME = "persistent decode step"  # what --kernel-filter matches, as it matches a case's name
PROMPT_TOKENS = 32
NEW_TOKENS = 16
# The persistent kernel's phases that are one graph-path GEMV each (the kernels stage's gemv case of
# that shape; QKV there without RoPE, which the persistent kernel runs as a phase of its own).
GEMV_PHASES = ("qkv", "o_proj", "gate_up", "down", "lm_head")
_GEMV_SHAPE = {"o_proj": "o"}
_DEFAULT_GEMV = re.compile(r"^gemv (\w+) \d+x\d+$")  # the decode step's kernel: no " (ring)"-like tag, m = 1


def wanted(kernel_filter: str) -> bool:
    """Whether ``--kernel-filter`` keeps this section (the filter is matched against NAME)."""
    return not kernel_filter or kernel_filter in NAME


def graph_gemv_rows(rows: list[dict]) -> dict[str, dict]:
    """The kernels stage's rows of the GEMVs the decode graph runs, by shape name (qkv, o, ...)."""
    found = {}
    for r in rows:
        m = _DEFAULT_GEMV.match(r.get("name", "")) if r.get("group") == "gemv" else None
        if m and m.group(1) not in found:
            found[m.group(1)] = r
    return found


def measure(rt, model: str) -> dict:
    """The per-phase profile of ``model``'s persistent step, or ``{"skipped": why}`` where this
    device or this shape does not take the kernel. Other failures raise (the stage reports them)."""
    from ..backends.cuda.persistent import device_reason
    from ..errors import ModelError
    from .persistent_profile import profile_step

    reason = device_reason(rt)
    if reason is not None:
        return {"skipped": reason}
    prompt = prompt_ids(PROMPT_TOKENS)  # the decode stage's prompt
    try:
        return profile_step(model, prompt, NEW_TOKENS)
    except ModelError as exc:  # a shape the kernel does not take: said, not fatal
        return {"skipped": str(exc)}


def render(profile: dict, rows: list[dict], bandwidth: float) -> str:
    """The phase table with the graph path's kernel alone beside each GEMV phase."""
    if "skipped" in profile:
        return f"{NAME}: not run: {profile['skipped']}"
    graph = graph_gemv_rows(rows)
    body = []
    for p in profile["rows"]:
        g = graph.get(_GEMV_SHAPE.get(p["phase"], p["phase"])) if p["phase"] in GEMV_PHASES else None
        gb_s = p["work_gb_s"]
        body.append([p["phase"], p["count"], f"{p['wait_share']:.1%}", f"{p['work_share']:.1%}",
                     p["bytes"] / 1e6, "-" if gb_s != gb_s else f"{gb_s:.0f}",
                     "-" if gb_s != gb_s or not bandwidth else f"{100 * gb_s * 1e9 / bandwidth:.1f}%",
                     f"{g['gb_s']:.0f}" if g else "-", f"{g['pct_bw']:.1f}%" if g and g.get("pct_bw") else "-"])
    title = (f"The {NAME} per phase beside the graph path's kernel alone (one launch; its clock record of "
             f"the last of {NEW_TOKENS} greedy tokens after a {PROMPT_TOKENS}-token prompt, context "
             f"{profile['context']}, cycles at the rated {profile['clock_mhz']:.0f} MHz). wait/work: shares of "
             "the SMs' summed time; persistent GB/s: the phase's bytes (each tile's re-read of its input vector, from "
             "L2, included) over its tiles' working time at the rated clock, so above 100% of the probe can happen")
    headers = ["phase", "tiles", "wait", "work", "MB", "persistent GB/s", "% BW", "graph kernel GB/s", "% BW"]
    return table(headers, body, title=title)
