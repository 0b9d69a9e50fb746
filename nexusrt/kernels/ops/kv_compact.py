"""Launcher for ``cu/kv_compact.cu``: KV pruning's compaction of one sequence's cache, every
layer's K and V pool in one launch.

The kernel reads the pools' addresses from a device array (:func:`pool_addresses` gives its
contents, after checking every pool), and the kept slots and the block table from device
int32 arrays the caller staged. Its NumPy meaning is
:func:`nexusrt.kvcache.blocks.compact_tokens` applied to every pool. The caller checks
``keep`` against the table on the host (:func:`nexusrt.kvcache.blocks.check_keep`): the
kernel trusts that the slots ascend and lie inside the table.
"""

from __future__ import annotations

import numpy as np

from ...kvcache.blocks import BLOCK_SIZE
from ...kvcache.checks import check_pools
from .common import check_positive, check_tensor, ptr
from .spec import LaunchSpec

SOURCE = "kv_compact"
SIGNATURE = "ptr ptr ptr i32 i32 i32"
HEAD_DIMS = (64, 128, 256)
THREADS = 128  # kThreads in kv_compact.cu


def pool_addresses(k_pools, v_pools, num_kv_heads: int, head_dim: int) -> np.ndarray:
    """int64 ``[2 * layers]``: layer ``l``'s K pool address at ``2l``, its V pool's at ``2l + 1``
    (the order the kernel reads). Every pool must be bf16 ``[blocks, Hkv, BLOCK_SIZE, D]`` with the
    same ``blocks`` (one block table indexes them all)."""
    if len(k_pools) != len(v_pools) or not len(k_pools):
        raise ValueError(f"kv_compact needs one K and one V pool per layer, got {len(k_pools)} K and "
                         f"{len(v_pools)} V pools")
    blocks = {check_pools(k, v, num_kv_heads, head_dim) for k, v in zip(k_pools, v_pools)}
    if len(blocks) != 1:
        raise ValueError(f"the layers' pools hold different block counts {sorted(blocks)}; one table indexes them all")
    return np.array([ptr(t) for pair in zip(k_pools, v_pools) for t in pair], np.int64)


def kv_compact(rt, pools, table, keep, *, count: int, first: int, num_layers: int, num_kv_heads: int,
               head_dim: int) -> LaunchSpec:
    """Launch spec moving slots ``keep[first:count]`` of ``table`` to slots ``first .. count-1``.

    Parameters
    ----------
    pools : int64 ``[2 * num_layers]`` device array holding :func:`pool_addresses`.
    table : int32 ``[W]``: the sequence's block table (logical block -> physical block).
    keep : int32 ``[>= count]`` device array: the kept slots, ascending and distinct.
    count : kept slots (``len(keep)`` on the host); at most ``W * BLOCK_SIZE``.
    first : the length of keep's identity prefix (``keep[i] == i`` for ``i < first``): those slots
        stay put. ``0 <= first < count``: when every kept slot stays, launch nothing.
    """
    check_positive(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, count=count)
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"kv_compact supports head_dim in {HEAD_DIMS}, got {head_dim}")
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first < count:
        raise ValueError(f"first must be an int in 0..count-1 = 0..{count - 1} (the slots that stay put), "
                         f"got {first!r}")
    check_tensor(pools, "pools", (2 * num_layers,), "int64")
    shape = getattr(table, "shape", None)
    if shape is not None and len(shape) != 1:
        raise ValueError(f"table must be a 1-d int32 tensor [max_blocks], got shape {shape}")
    check_tensor(table, "table", None, "int32")
    if shape is not None and count > int(shape[0]) * BLOCK_SIZE:
        raise ValueError(f"count {count} kept slots cannot lie inside a table of {shape[0]} blocks "
                         f"({int(shape[0]) * BLOCK_SIZE} slots)")
    kshape = getattr(keep, "shape", None)
    if kshape is not None and (len(kshape) != 1 or int(kshape[0]) < count):
        raise ValueError(f"keep must be a 1-d int32 tensor of at least count={count} slots, got shape {kshape}")
    check_tensor(keep, "keep", None, "int32")
    name = f"kv_compact_d{head_dim}"
    kernel = rt.kernels.get(SOURCE, name, SIGNATURE)
    args = kernel.pack(ptr(pools), ptr(table), ptr(keep), int(count), int(first), int(num_kv_heads))
    return LaunchSpec(kernel, (num_kv_heads, 2 * num_layers, 1), (THREADS, 1, 1), args, 0, name)


ARG_COUNT, ARG_FIRST = 3, 4  # kv_compact's argument slots a caller re-points per call (see rebind)


def rebind(spec: LaunchSpec, count: int, first: int) -> None:
    """Re-point a :func:`kv_compact` spec at another ``count``/``first`` over the same arrays, in
    place (the engine compacts every pruned sequence after every step). The caller has checked
    them (:func:`nexusrt.kvcache.blocks.check_keep`): ``0 <= first < count`` and ``count`` inside the
    spec's table and keep arrays; launch the spec before rebinding it again."""
    spec.args[ARG_COUNT], spec.args[ARG_FIRST] = int(count), int(first)
