"""The checks every launcher that touches the KV cache shares (rope_append, attention_*)."""

from __future__ import annotations

from ..memory.checks import check_tensor, ptr
from .blocks import BLOCK_SIZE, pool_shape


def _check_pair(k, v, names: tuple[str, str], blocks: str, num_kv_heads: int, head_dim: int) -> int:
    """``k`` and ``v`` bf16 ``[n, Hkv, BLOCK_SIZE, D]`` of one ``n`` (named ``blocks`` in errors); returns n."""
    shape = getattr(k, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(f"{names[0]} must be a 4-d tensor [{blocks}, {num_kv_heads}, {BLOCK_SIZE}, "
                         f"{head_dim}], got shape {shape}")
    expected = pool_shape(int(shape[0]), num_kv_heads, head_dim)
    check_tensor(k, names[0], expected, "bf16")
    check_tensor(v, names[1], expected, "bf16")
    return expected[0]


def check_pools(k_pool, v_pool, num_kv_heads: int, head_dim: int) -> int:
    """Check a layer's K and V pools ``[num_blocks, Hkv, BLOCK_SIZE, D]`` bf16; returns num_blocks."""
    return _check_pair(k_pool, v_pool, ("k_pool", "v_pool"), "num_blocks", num_kv_heads, head_dim)


ROWS_HOST_REFUSAL = ("host_pools: the host tier is for the one-sequence path; the batched (rows) "
                     "kernels use device-resident KV blocks only")


def check_host_pools(host_pools, num_kv_heads: int, head_dim: int, rows: int = 0):
    """The host tier's pools of a layer, ``(k_host, v_host)`` bf16 ``[host_blocks, Hkv,
    BLOCK_SIZE, D]`` in page-locked host memory (read and written zero-copy), or None for a
    device-only launch. Returns the pair or None; a tensor that says it is not pinned host
    memory is refused (a kernel would fault on pageable memory, or read device memory as host),
    and so is any host tier for a batched (``rows``) launch: no rows kernel has a host twin."""
    if host_pools is None:
        return None
    if rows:
        raise ValueError(ROWS_HOST_REFUSAL)
    if not isinstance(host_pools, (tuple, list)) or len(host_pools) != 2:
        raise ValueError(f"host_pools must be None or a pair (k_host, v_host), got {host_pools!r}")
    k_host, v_host = host_pools
    _check_pair(k_host, v_host, ("k_host", "v_host"), "host_blocks", num_kv_heads, head_dim)
    for name, t in (("k_host", k_host), ("v_host", v_host)):
        if getattr(t, "device", False) or getattr(t, "pinned", True) is False:
            raise ValueError(f"{name} must be page-locked host memory (memory.pinned), the host tier "
                             f"the kernel reads zero-copy")
    return k_host, v_host


HOST_TAIL = " ptr ptr"  # the host-tier twins' signature ends with (k_host, v_host) after the others


def host_args(host) -> tuple:
    """The launch arguments that end a host-tier twin's list: the pointers of ``host``, the pair
    :func:`check_host_pools` returned, or () for None (a device-only launch)."""
    return (ptr(host[0]), ptr(host[1])) if host else ()


FAULT_TAIL = " ptr i32"  # the fault-ring twins end with (ring words, ring capacity) after the host pair


def check_fault_ring(fault_ring, host) -> tuple:
    """The launch arguments of a fault-ring twin: ``fault_ring`` a :class:`~.fault_ring.DeviceRing`
    whose ``requested`` words cover every block of ``host`` (the pair :func:`check_host_pools`
    returned), or () for None. Refused without a host tier: only host blocks fault."""
    if fault_ring is None:
        return ()
    from .fault_ring import DeviceRing

    if not isinstance(fault_ring, DeviceRing):
        raise ValueError(f"fault_ring must be a DeviceRing, got {type(fault_ring).__name__}")
    if host is None:
        raise ValueError("fault_ring: only host-tier blocks fault; give host_pools too")
    layout = fault_ring.layout
    check_tensor(fault_ring.words, "fault_ring.words", (layout.words,), "int32")
    if layout.host_blocks != int(host[0].shape[0]):
        raise ValueError(f"fault_ring tracks {layout.host_blocks} host blocks; the host pools hold "
                         f"{int(host[0].shape[0])}")
    return ptr(fault_ring.words), layout.capacity


def check_state(block_table, pos) -> None:
    """The block table (int32, 1-d) and the device position word (int32)."""
    check_tensor(block_table, "block_table", None, "int32")
    check_tensor(pos, "pos", None, "int32")


def check_rows(tables, meta, rows: int) -> None:
    """The batched step's per-row state: ``tables`` int32 ``[S, W]`` (a block table per row of
    it) and ``meta`` int32 ``[rows, 4]`` (RoPE position, cache slot, table row, unused)."""
    if len(getattr(tables, "shape", ())) != 2:
        raise ValueError(f"tables must be a 2-d int32 tensor [sequences, max_blocks], got shape "
                         f"{getattr(tables, 'shape', None)}")
    check_tensor(meta, "meta", (rows, 4), "int32")
