"""Bytes each instruction moves, the bytes-balanced placement of instructions on SMs, and the
balance figures of a placement.

A decode step at batch 1 is bound by memory traffic, and the weights are almost all of it,
so an instruction's cost is the bytes it reads and writes: its weight rows (bf16 on the
GPU), the activations it reads (fp32) and, for attention, the KV it streams at a nominal
context length (the real length is only known when the step runs).
"""

from __future__ import annotations

import heapq

from . import topk
from .instructions import Instruction, Op

F32 = 4


def instruction_bytes(ins: Instruction, cfg, *, weight_bytes: int, kv_bytes: int, context: int,
                      splits: int) -> int:
    """Bytes ``ins`` moves for the shape ``cfg`` (weights ``weight_bytes`` per element, KV
    ``kv_bytes`` per element, attention over ``context`` keys cut into ``splits`` parts)."""
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    rows, op = ins.end - ins.start, ins.op
    if op == Op.EMBED:
        return h * weight_bytes + h * F32
    if op == Op.QKV:  # weight rows, x and the norm weight, the outputs (and bias)
        return rows * h * weight_bytes + 2 * h * F32 + rows * F32 * (2 if cfg.attention_bias else 1)
    if op == Op.ROPE_APPEND:  # per KV head: read q, k, v rows, write q and the K/V slots
        return rows * ((g + 2) * d * F32 + g * d * F32 + 2 * d * kv_bytes)
    if op == Op.ATTENTION:  # q of the group, this split's share of K and V, the partial out
        keys = -(-context // splits)
        return rows * (2 * g * d * F32 + 2 * keys * d * kv_bytes + 2 * g * F32)
    if op == Op.ATTN_COMBINE:
        return rows * (ins.arg * g * (d + 2) * F32 + g * d * F32)
    if op == Op.O_PROJ:
        return rows * cfg.q_size * weight_bytes + cfg.q_size * F32 + 2 * rows * F32
    if op == Op.GATE_UP:
        return 2 * rows * h * weight_bytes + 2 * h * F32 + rows * F32
    if op == Op.DOWN:
        return rows * inter * weight_bytes + inter * F32 + 2 * rows * F32
    if op == Op.LM_HEAD:
        return rows * h * weight_bytes + 2 * h * F32 + rows * F32
    if op == Op.SAMPLE_PARTIAL:  # its chunk of logits, then a partial (greedy) or histogram adds
        return rows * F32 + 2 * F32
    if op == Op.SAMPLE_GATHER:  # a sampled step's: the histogram, its chunk twice (greedy: nothing)
        return topk.BUCKETS * F32 + 2 * rows * F32
    if op == Op.SAMPLE_FINISH:  # greedy: the partials (a sampled step's draw reads the pool)
        return 2 * F32 * max(ins.arg, 1)
    raise ValueError(f"no cost model for {op!r}")


def place(phases: list[tuple[str, list[int]]], costs: list[int], num_sms: int) -> list[int]:
    """The SM of each instruction: per phase ``(name, instruction indices)`` (one stage of the
    chain), largest first onto the SM with the fewest bytes in that phase, ties to the fewest
    bytes so far, then the lowest SM.

    Balancing each phase, not only the step's total, matters because a phase that needs the
    whole previous phase (O after attention, down after gate/up) cannot start before the
    slowest SM of that phase is done."""
    sm_of = [0] * len(costs)
    total = [0] * num_sms
    for _, phase in phases:
        heap = [(0, total[s], s) for s in range(num_sms)]
        heapq.heapify(heap)
        for i in sorted(phase, key=lambda i: (-costs[i], i)):
            load, _, s = heapq.heappop(heap)
            sm_of[i] = s
            total[s] += costs[i]
            heapq.heappush(heap, (load + costs[i], total[s], s))
    return sm_of


def balance(phases: list[tuple[str, list[int]]], costs: list[int], sm_of: list[int], num_sms: int) -> dict:
    """The placement's balance: ``total`` is max/mean of the bytes per SM over the whole step;
    ``phased`` is sum over phases of the busiest SM's bytes / sum of the mean (what the step
    costs if every phase waited for the previous one, against perfect balance); ``per_op``
    gives the phased figure per op name."""
    per_sm = [0] * num_sms
    sum_max = sum_mean = 0.0
    per_op: dict[str, list[float]] = {}
    for name, phase in phases:
        load = [0] * num_sms
        for i in phase:
            load[sm_of[i]] += costs[i]
            per_sm[sm_of[i]] += costs[i]
        mean = sum(load) / num_sms
        sum_max, sum_mean = sum_max + max(load), sum_mean + mean
        acc = per_op.setdefault(name, [0.0, 0.0])
        acc[0], acc[1] = acc[0] + max(load), acc[1] + mean
    mean_total = sum(per_sm) / num_sms
    return {"total": max(per_sm) / mean_total if mean_total else 1.0,
            "phased": sum_max / sum_mean if sum_mean else 1.0,
            "bytes": sum(per_sm), "max_sm_bytes": max(per_sm),
            "per_op": {k: a / b if b else 1.0 for k, (a, b) in per_op.items()}}
