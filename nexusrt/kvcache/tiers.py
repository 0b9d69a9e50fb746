"""The host tier of the KV cache: device blocks up to a byte budget, pinned host blocks beyond it.

Plain logic, no device. Residency lives in the block table itself, which stays int32:

* an entry ``b >= 0`` is device block ``b`` of the layer's device pools (as before);
* an entry ``b < 0`` is host block ``~b`` (``= -(b + 1)``) of the layer's host pools, pinned
  host memory the kernels read (and rope_append writes) zero-copy through its unified address.

Why the bitwise NOT and not a high bit: the kernel's test is the sign either way, and ``~b``
is one instruction with no mask constant; host block 0 is ``-1``, so no entry is ambiguous,
and a device-only kernel handed a host entry computes a negative block offset, an address
far below the pool that compute-sanitizer reports at once, instead of quietly reading some
device block (what a masked high bit would give a kernel that forgot the mask).

Placement: the single-sequence runner puts the sequence's *oldest* logical blocks on the
host (:func:`place_oldest_on_host`), so the blocks a decode step appends to, and the recent
ones it reads most, stay in HBM; with a reserve the fault ring (:mod:`.fault_ring`,
:mod:`.fault_plan`) moves host blocks the decode kernels read into HBM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import OutOfMemory
from .blocks import BLOCK_SIZE, BlockPool, block_indices, check_count


def encode_host(h: int) -> int:
    """The table entry of host block ``h``."""
    if isinstance(h, bool) or not isinstance(h, (int, np.integer)):
        raise TypeError(f"host block index must be an int, got {type(h).__name__} {h!r}")
    if h < 0:
        raise ValueError(f"host block index must be >= 0, got {h}")
    return ~int(h)


def is_host(entry: int) -> bool:
    return int(entry) < 0


def host_index(entry: int) -> int:
    """The host block a (negative) table entry names."""
    if entry >= 0:
        raise ValueError(f"table entry {entry} is a device block")
    return ~int(entry)


def block_bytes(num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of one logical KV block across every layer, K and V, bf16: the unit of the budget
    (the same table serves every layer, so a block index is resident in all layers at once)."""
    return num_layers * 2 * num_kv_heads * BLOCK_SIZE * head_dim * 2


class KvBudgetError(ValueError):
    """A ``kv_gpu_budget`` that cannot work, raised before any memory is taken."""


@dataclass(frozen=True)
class TierPlan:
    """How many logical blocks live on each tier, and their bytes."""

    device_blocks: int
    host_blocks: int
    block_bytes: int

    @property
    def host_bytes(self) -> int:
        return self.host_blocks * self.block_bytes


def mem_available(path: str = "/proc/meminfo") -> int:
    """The kernel's ``MemAvailable`` in bytes: the bound on what can be pinned without pushing
    the machine into swap (pinned pages cannot be swapped out)."""
    with open(path) as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no MemAvailable line in {path}")


def plan_tiers(total_blocks: int, kv_gpu_budget: int | None, *, num_layers: int, num_kv_heads: int,
               head_dim: int, available: int | None = None) -> TierPlan:
    """Split ``total_blocks`` logical blocks between the device (``kv_gpu_budget`` bytes of KV,
    all layers) and the host tier.

    Refused with :class:`KvBudgetError`, before any work:

    * a budget below one layer's pages, i.e. one layer's K and V for every block of the
      context: the floor a layer-at-a-time prefetch (a layer's blocks moved in while the one
      before is read) would need not to thrash. Not what was built: the fault ring moves whole
      blocks, every layer's K and V, between decode steps (``fault_ring.py``); the floor is
      kept as the lowest budget the host tier was designed and tested for;
    * a host tier larger than ``available`` bytes (default: ``MemAvailable``) of pinnable memory.
    """
    total_blocks = check_count(total_blocks, "total_blocks", 1)
    # Zero or negative sizes would divide by zero below or give a negative plan.
    for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        check_count(value, name, 1)
    unit = block_bytes(int(num_layers), int(num_kv_heads), int(head_dim))
    if kv_gpu_budget is None:
        return TierPlan(total_blocks, 0, unit)
    if isinstance(kv_gpu_budget, bool) or not isinstance(kv_gpu_budget, (int, np.integer)):
        raise KvBudgetError(f"kv_gpu_budget must be a byte count (int), got {kv_gpu_budget!r}")
    budget = int(kv_gpu_budget)
    layer_pages = total_blocks * unit // num_layers
    if budget < layer_pages:
        raise KvBudgetError(f"kv_gpu_budget {budget} bytes is below one layer's KV pages ({layer_pages} bytes: "
                            f"{total_blocks} blocks of K and V for one of {num_layers} layers); give at least that")
    device = min(total_blocks, budget // unit)
    plan = TierPlan(device, total_blocks - device, unit)
    if plan.host_blocks:
        avail = mem_available() if available is None else int(available)
        if plan.host_bytes > avail:
            raise KvBudgetError(f"the host tier would need {plan.host_bytes} bytes of pinned memory "
                                f"({plan.host_blocks} blocks); only {avail} bytes are available "
                                f"(MemAvailable): raise kv_gpu_budget or lower max_context")
    return plan


def place_oldest_on_host(num_blocks: int, host_blocks: int) -> np.ndarray:
    """The int32 table of one sequence holding every block: logical blocks ``0 .. host_blocks-1``
    on host blocks ``0 ..`` (entries ``~h``), the rest on device blocks ``0, 1, ...``."""
    if not 0 <= host_blocks <= num_blocks:
        raise ValueError(f"host_blocks must be in 0..{num_blocks}, got {host_blocks}")
    table = np.empty(num_blocks, dtype=np.int32)
    table[:host_blocks] = ~np.arange(host_blocks, dtype=np.int32)
    table[host_blocks:] = np.arange(num_blocks - host_blocks, dtype=np.int32)
    return table


def block_copies(src_table, dst_table, num_blocks: int) -> list[tuple[int, bool, int, int]]:
    """How to copy the first ``num_blocks`` logical blocks of a sequence from a device-only table
    ``src_table`` into the tiers of ``dst_table``: ``(source block, onto the host, destination
    block, count)`` runs, each of ``count`` consecutive blocks going to consecutive blocks of one
    tier (one copy per layer and K/V per run). Refuses a source entry on the host tier, a table
    shorter than ``num_blocks``, or two logical blocks on the same destination block."""
    src = np.asarray(src_table, dtype=np.int64).reshape(-1)
    dst = np.asarray(dst_table, dtype=np.int64).reshape(-1)
    if not 0 <= num_blocks <= min(src.size, dst.size):
        raise ValueError(f"num_blocks must be in 0..{min(src.size, dst.size)} (the tables' length), got {num_blocks}")
    src, dst = src[:num_blocks], dst[:num_blocks]
    if (src < 0).any():
        raise ValueError("the source table must hold every block on the device (no host-tier entry)")
    if np.unique(dst).size != dst.size:
        raise ValueError("the destination table names one block twice")
    runs: list[list] = []
    for s, d in zip(src.tolist(), dst.tolist()):
        host, block = d < 0, ~d if d < 0 else d
        last = runs[-1] if runs else None
        if last and last[1] == host and s == last[0] + last[3] and block == last[2] + last[3]:
            last[3] += 1
        else:
            runs.append([s, host, block, 1])
    return [tuple(r) for r in runs]


class TieredBlockPool:
    """Device blocks first, host blocks once the device ones run out; entries as in the table.

    ``alloc`` is all-or-nothing across both tiers; ``free`` takes entries of either tier and
    refuses one that is not held (or twice). :meth:`audit` is the leak audit's view: zero
    ``used`` after every sequence is gone, on both tiers.
    """

    def __init__(self, device_blocks: int, host_blocks: int, device_order=None, host_order=None):
        host_blocks = check_count(host_blocks, "host_blocks", 0)
        self.device = BlockPool(device_blocks, device_order)
        self.host = BlockPool(host_blocks, host_order) if host_blocks > 0 else None

    @property
    def num_free(self) -> int:
        return self.device.num_free + (self.host.num_free if self.host else 0)

    def counts(self) -> dict:
        """Blocks held on each tier and the tiers' sizes (the ``kv`` report's figures)."""
        host_total = self.host.num_blocks if self.host else 0
        return {"device_blocks": self.device.num_blocks, "host_blocks": host_total,
                "device_used": self.device.num_blocks - self.device.num_free,
                "host_used": host_total - (self.host.num_free if self.host else 0)}

    def alloc(self, n: int) -> list[int]:
        """``n`` table entries: device blocks while there are any, then host ones."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"n must be an int (blocks), got {type(n).__name__} {n!r}")
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free:
            raise OutOfMemory(n, self.num_free, "KV block pool (device and host tiers)", unit="blocks")
        on_dev = min(n, self.device.num_free)
        return self.device.alloc(on_dev) + self.alloc_host(n - on_dev)

    def alloc_host(self, n: int) -> list[int]:
        if n == 0:
            return []
        if self.host is None:
            raise OutOfMemory(n, 0, "KV host tier", unit="blocks")
        return [encode_host(h) for h in self.host.alloc(n)]

    def free(self, entries) -> None:
        """Return table entries of either tier; all-or-nothing: a bad entry frees none."""
        entries = block_indices(entries, "entries")
        dev = [e for e in entries if e >= 0]
        host = [~e for e in entries if e < 0]
        if host and self.host is None:
            raise ValueError(f"freeing host entries {host} of a pool without a host tier")
        # Check both before touching either, so a bad call changes nothing. Against the held
        # sets, not the free ones: an entry past the pool's end is in neither, and must be
        # refused here, not by host.free after device.free has already run.
        dev_used = self.device._used
        host_used = self.host._used if host else frozenset()
        bad = [e for e in dev if e not in dev_used] + [~h for h in host if h not in host_used]
        if bad or len(set(entries)) != len(entries):
            raise ValueError(f"freeing entries that are not allocated (or twice): {bad or entries}")
        self.device.free(dev)
        if host:
            self.host.free(host)

    def audit(self) -> dict:
        """The counts; raises if the free lists and the used sets disagree (a lost block)."""
        for pool in (self.device, self.host):
            if pool is not None and len(pool.free_blocks) + len(pool._used) != pool.num_blocks:
                raise AssertionError(f"a block pool of {pool.num_blocks} lost blocks")
        return self.counts()
