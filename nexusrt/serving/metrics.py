"""The engine's counters and histograms, and their Prometheus text (no client library).

Plain numbers updated on the engine's thread; readers (``/metrics``) see a consistent
enough snapshot under the GIL (each value is one attribute).
"""

from __future__ import annotations

import bisect
from collections import Counter

# Seconds; TTFT spans queueing and prefill, TPOT one decode step of a batch.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """Cumulative-bucket histogram with sum and count, as Prometheus defines it."""

    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip(self.buckets + (float("inf"),), self.counts):
            total += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]


class EngineMetrics:
    """What ``/metrics`` reports; the engine updates it, :func:`render` writes it out."""

    def __init__(self):
        self.requests = Counter()  # finish_reason -> requests ended
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.computed_tokens = 0  # ids run through the model (prefill chunks, decodes, recomputes)
        self.steps = 0
        self.kv_evicted = 0  # cached tokens pruned by KV policies (serving/pruning.py)
        self.callback_errors = 0  # on_finish callbacks that raised (the engine carried on)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)


def render(metrics: EngineMetrics, gauges: dict[str, tuple[str, float]]) -> str:
    """Prometheus text exposition (version 0.0.4) of ``metrics`` plus ``gauges``
    (name -> (help, value)); every name is prefixed ``nexusrt_``."""
    lines: list[str] = []

    def head(name, kind, text):
        lines.extend([f"# HELP nexusrt_{name} {text}", f"# TYPE nexusrt_{name} {kind}"])

    head("requests_total", "counter", "Requests ended, by finish reason.")
    for reason, n in sorted(metrics.requests.items()):
        lines.append(f'nexusrt_requests_total{{finish_reason="{reason}"}} {n}')
    for name, text, value in (("prompt_tokens_total", "Prompt tokens of ended requests.", metrics.prompt_tokens),
                              ("generation_tokens_total", "Tokens generated.", metrics.generation_tokens),
                              ("computed_tokens_total", "Tokens run through the model.", metrics.computed_tokens),
                              ("engine_steps_total", "Engine steps run.", metrics.steps),
                              ("kv_evicted_tokens_total", "Cached tokens pruned by KV policies.",
                               metrics.kv_evicted)):
        head(name, "counter", text)
        lines.append(f"nexusrt_{name} {value}")
    for name, (text, value) in gauges.items():
        kind = "counter" if name.endswith("_total") else "gauge"
        head(name, kind, text)
        lines.append(f"nexusrt_{name} {value}")
    head("time_to_first_token_seconds", "histogram", "Arrival to first generated token.")
    lines += metrics.ttft.lines("nexusrt_time_to_first_token_seconds")
    head("time_per_output_token_seconds", "histogram", "Mean time between a request's generated tokens.")
    lines += metrics.tpot.lines("nexusrt_time_per_output_token_seconds")
    return "\n".join(lines) + "\n"


def swap_gauges(swap) -> dict[str, tuple[str, float]]:
    """The host tier's gauges for :func:`render` (``swap``: the engine's
    :class:`~nexusrt.serving.swap.HostSwap`, or None when it has none: no gauges)."""
    if swap is None:
        return {}
    c = swap.counts()
    return {"kv_host_blocks_used": ("KV blocks of swapped-out requests on the host tier.", c["host_blocks_used"]),
            "kv_host_blocks_total": ("KV blocks in the host tier.", c["host_blocks"]),
            "swapped_out_total": ("Preemptions that swapped a request's KV to the host tier.", c["swapped_out"]),
            "swapped_in_total": ("Requests whose KV came back from the host tier.", c["swapped_in"])}
