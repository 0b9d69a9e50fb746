"""The persistent kernel's counters across steps, in Python: the rule ``persistent_decode.cuh``
applies, so it can be tested on the CPU (including the 2**32 wrap-around).

Counters are uint32 in global memory and never reset between steps. Counter ``c`` receives
exactly ``totals[c]`` signals per step (its target in the lowering), so after ``epoch``
complete steps it holds ``epoch * totals[c] mod 2**32``. A wait ``(c, t)`` of the current step
is met when ``int32(counter - epoch * totals[c]) >= t``: during a step the difference lies in
``[0, totals[c]]``, so the unsigned arithmetic is exact at every epoch, and a count left from
the previous step can never satisfy a wait of this one. The kernel reads ``epoch`` once per
block at the start; the last block to finish advances it (an exit ticket). The host zeroes
counters, epoch and ticket when it uploads a program (a trap ends the CUDA context, so nothing
runs after a device fault).
"""

from __future__ import annotations

import numpy as np

MASK = 0xFFFFFFFF


def base(epoch: int, total: int) -> int:
    """What counter ``c`` holds at the start of step ``epoch`` (``total`` signals per step)."""
    return (epoch * total) & MASK


def count_this_step(value: int, epoch: int, total: int) -> int:
    """The signals counter value ``value`` has received in step ``epoch``: the kernel's
    ``(int)(value - epoch * total)`` (uint32 subtraction read as int32)."""
    d = (value - base(epoch, total)) & MASK
    return d - (1 << 32) if d & 0x80000000 else d


def wait_met(value: int, epoch: int, total: int, target: int) -> bool:
    """The kernel's test of a wait ``(counter, target)`` in step ``epoch``."""
    return count_this_step(value, epoch, total) >= target


class DeviceCounters:
    """The device words of one program: ``values`` (uint32 per counter), ``epoch`` and the exit
    ``ticket``, advanced by :meth:`run_step` exactly as the kernel does."""

    def __init__(self, totals, epoch: int = 0):
        self.totals = [int(t) for t in totals]
        self.epoch = epoch & MASK
        self.values = [base(self.epoch, t) for t in self.totals]
        self.ticket = 0

    def run_step(self, lists, seed: int = 0) -> list[tuple[int, int]]:
        """Run one step of ``lists`` (per SM, each a list of Instruction) in a random
        interleaving in which an SM advances only when its head's waits are met by the rule
        above; returns the ``(sm, position)`` order. RuntimeError when no SM can advance."""
        rng = np.random.default_rng(seed)
        epoch, pcs, order = self.epoch, [0] * len(lists), []
        while True:
            ready = [s for s, li in enumerate(lists) if pcs[s] < len(li) and all(
                wait_met(self.values[c], epoch, self.totals[c], t) for c, t in li[pcs[s]].waits)]
            if not ready:
                if any(pcs[s] < len(li) for s, li in enumerate(lists)):
                    raise RuntimeError(f"step at epoch {epoch}: no SM can advance, positions {pcs}")
                break
            s = ready[int(rng.integers(len(ready)))]
            ins = lists[s][pcs[s]]
            if ins.signal >= 0:
                self.values[ins.signal] = (self.values[ins.signal] + 1) & MASK
            order.append((s, pcs[s]))
            pcs[s] += 1
        for _ in lists:  # every block takes an exit ticket; the last advances the epoch
            self.ticket += 1
            if self.ticket == len(lists):
                self.ticket, self.epoch = 0, (self.epoch + 1) & MASK
        return order
