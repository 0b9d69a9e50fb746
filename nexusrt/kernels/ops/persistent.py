"""Launcher for the persistent decode kernel (``cu/persistent_decode.cuh``): a whole decode step in
one cooperative launch of one 256-thread block per SM, each walking its own instruction list (the
program that ``nexusrt.backends.cuda.megakernel.lower`` builds). Its entries are two modules:
``persistent_decode.cu`` and, for the loader warpgroup, ``persistent_decode_loader.cu``, which
only a launch with ``loader=True`` compiles.

With ``ring=True`` the GEMV tiles read their weights from a ring of shared-memory pages that the
bulk-copy engine fills ahead of the list (``cu/persistent_ring.cuh``): :func:`ring_page_starts`
numbers each row's pages in the row's pad word, and the launch gives the ring every byte of shared
memory the block may have past the staged input and the list (:func:`ring_pages`). Without it (the
default, faster on the H200) they load their weights with 16-byte loads.

Everything the kernel reads is one device array of 64-bit slots (:data:`SLOTS`, in the order
of ``enum Slot`` in the kernel; ``tests/test_persistent_kernel.py`` checks both lists agree):
pointers, and the integer and float (bit pattern) scalars. ``sample_params`` points at the
runner's 24-byte ``SampleParams`` struct (:func:`nexusrt.kernels.ops.sampling.pack_params`),
which the host rewrites per request, so one captured launch samples with any parameters;
``topk_hist`` / ``topk_pool`` are the grid-wide top-K's words, the sampler's buffers of the graph
path (:class:`nexusrt.kernels.ops.sampling.SamplerBuffers`: zeroed by the host once, every sampled
step leaves them zero). Per-layer pointers are a second
array of :data:`LAYER_SLOTS` per layer. :func:`pack_params` builds the main array from a dict
and refuses a missing or unknown name, so the host and the kernel cannot silently disagree.
"""

from __future__ import annotations

import struct

import numpy as np

from .common import check_positive, check_tensor, ptr, resident_blocks, sm_count
from .spec import LaunchSpec

SOURCE = "persistent_decode"
LOADER_SOURCE = "persistent_decode_loader"  # the _loader entries (sm_90): half the kernel's compile time
SIGNATURE = "ptr"
THREADS = 256  # kThreads in persistent_tiles.cuh
LOADER_THREADS = 128  # kLoaderThreads in persistent_decode.cuh: the _loader entries' loader warpgroup
HEAD_DIMS = (64, 128)
GROUP_BOUNDS = (1, 2, 4, 8)  # the GM template arguments compiled
MAX_SPLITS = 128  # kMaxSplits: attention parts per KV head the combine can weigh
SMEM_OPTIN_LIMIT = 227 * 1024  # sm_90's per-block opt-in; the driver's answer is checked too
# sizeof(PoolShared) (sampling_grid.cuh; a static_assert in the kernel holds it to this): the
# sampling finish's top-K workspace, which overlays the staged GEMV input in shared memory.
FINISH_SHARED_BYTES = 42272

SLOTS = ("embed", "lm_head", "final_norm", "inv_freq",
         "x", "qkv", "q", "attn", "mlp", "logits",
         "part_ml", "part_acc", "arg_val", "arg_idx", "sample_params", "topk_hist", "topk_pool",
         "state", "ring", "block_table",
         "counters", "totals", "epoch", "debug", "profile",
         "layers", "program", "offsets",
         "hidden", "inter", "vocab", "hq", "hkv", "splits", "ring_size", "slice_rows", "eps", "scale")
FLOAT_SLOTS = ("eps", "scale")
INT_SLOTS = ("hidden", "inter", "vocab", "hq", "hkv", "splits", "ring_size", "slice_rows")
NULLABLE_SLOTS = ("profile",)  # a null pointer switches the feature off: the per-instruction clock record
LAYER_SLOTS = ("attn_norm", "qkv", "qkv_bias", "q_norm", "k_norm", "o", "mlp_norm", "gate_up", "down",
               "k_pool", "v_pool")
OPTIONAL = {"qkv_bias", "q_norm", "k_norm"}  # null pointers mean "none" in the kernel


def group_bound(group: int) -> int:
    """The smallest compiled GM >= ``group`` (query heads per KV head), or ValueError."""
    for gm in GROUP_BOUNDS:
        if group <= gm:
            return gm
    raise ValueError(f"the persistent kernel takes up to {GROUP_BOUNDS[-1]} query heads per KV head, got {group}")


def kernel_name(head_dim: int, group: int, loader: bool = False) -> str:
    """The entry point for this head_dim and GQA group; ``loader``: the one whose block also holds
    the warpgroup that streams the weight ring."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"the persistent kernel supports head_dim {HEAD_DIMS}, got {head_dim}")
    return f"persistent_decode{'_loader' if loader else ''}_d{head_dim}_g{group_bound(group)}"


ROW_BYTES = 64  # one program row: 16 int32
PAGE_WORD = 15  # the row's pad word: its first ring page (ring_page_starts)
RING_PAGE_BYTES = 4096  # NRT_RING_PAGE_BYTES in cu/persistent_ring.cuh: whole steps of a row's dot product
MAX_RING_PAGES = 64  # kMaxPages: the ring's barriers are a static array of this many
# The opcodes whose tiles stream weight rows, and which input length K their rows have.
_GEMV_K = {2: "hidden", 6: "q_width", 7: "hidden", 8: "inter", 9: "hidden"}  # QKV, O, GATE_UP, DOWN, LM_HEAD
_GATE_UP = 7


def shared_bytes(hidden: int, inter: int, q_width: int, slice_rows: int = 0) -> int:
    """Dynamic shared memory: the staged GEMV input (the widest of the step's GEMV inputs, fp32),
    or the sampling finish's top-K workspace where that is larger (small models), rounded up to
    16 bytes; then the SM's instruction list (``slice_rows`` rows of 64 bytes, the longest list of
    the program), which each block copies in once per step."""
    lead = max(4 * max(hidden, inter, q_width), FINISH_SHARED_BYTES)
    return 16 * -(-lead // 16) + ROW_BYTES * slice_rows


def ring_page_starts(table: np.ndarray, offsets: np.ndarray, *, hidden: int, inter: int,
                     q_width: int) -> np.ndarray:
    """int32 ``[rows]``: each program row's first page in its SM's weight ring (the kernel's
    ``row_pages`` rule: a GEMV tile of rows ``[start, end)`` with rows of K bf16 takes
    ``ceil(2K / RING_PAGE_BYTES)`` pages a row, gate/up two rows an output, every other op
    none), counted from 0 at the start of each SM's list."""
    table = np.asarray(table)
    offsets = np.asarray(offsets, np.int64)
    if table.ndim != 2 or table.shape[1] != ROW_BYTES // 4 or offsets.ndim != 1 or len(offsets) < 2 \
            or offsets[0] != 0 or offsets[-1] != len(table) or np.any(np.diff(offsets) < 0):
        raise ValueError(f"ring_page_starts needs a [rows, {ROW_BYTES // 4}] table and its CSR offsets")
    lengths = dict(hidden=hidden, inter=inter, q_width=q_width)
    check_positive(**lengths)
    op = table[:, 0].astype(np.int64)
    per_row = np.zeros(len(table), np.int64)
    for code, name in _GEMV_K.items():
        per_row[op == code] = -(-2 * lengths[name] // RING_PAGE_BYTES)
    pages = (table[:, 3].astype(np.int64) - table[:, 2]) * per_row * np.where(op == _GATE_UP, 2, 1)
    if not len(table):
        return np.zeros(0, np.int32)
    starts = np.cumsum(pages) - pages  # over the whole table, then from each SM's first row
    counts = np.diff(offsets)
    starts -= np.repeat(starts[np.minimum(offsets[:-1], len(table) - 1)], counts)
    if (starts + pages).max() >= 2**31:
        raise ValueError("an SM's weight pages overflow int32")
    return starts.astype(np.int32)


def ring_pages(static_shared: int, lead_bytes: int) -> int:
    """Ring pages one block gets: what the opt-in limit leaves past the kernel's static shared
    memory and ``lead_bytes`` of dynamic (staged input, instruction list), at most
    :data:`MAX_RING_PAGES`."""
    return max(0, min(MAX_RING_PAGES, (SMEM_OPTIN_LIMIT - int(static_shared) - int(lead_bytes)) // RING_PAGE_BYTES))


def pack_params(values: dict) -> np.ndarray:
    """uint64 ``[len(SLOTS)]`` from ``values`` (a name for every slot: tensors, ints, floats)."""
    missing, unknown = set(SLOTS) - set(values), set(values) - set(SLOTS)
    if missing or unknown:
        raise ValueError(f"persistent params: missing {sorted(missing)}, unknown {sorted(unknown)}")
    out = np.zeros(len(SLOTS), np.uint64)
    for i, name in enumerate(SLOTS):
        v = values[name]
        if name in FLOAT_SLOTS:
            out[i] = struct.unpack("<I", struct.pack("<f", float(v)))[0]
        elif name in INT_SLOTS:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) <= 0:
                raise ValueError(f"persistent params: {name} must be a positive int, got {v!r}")
            out[i] = int(v)
        elif v is None and name in NULLABLE_SLOTS:
            out[i] = 0
        else:
            if v is None:
                raise ValueError(f"persistent params: {name} is a required pointer")
            out[i] = ptr(v)
    return out


def pack_layers(layers: list[dict]) -> np.ndarray:
    """uint64 ``[num_layers, len(LAYER_SLOTS)]``; only :data:`OPTIONAL` entries may be None."""
    out = np.zeros((len(layers), len(LAYER_SLOTS)), np.uint64)
    for i, lw in enumerate(layers):
        missing = set(LAYER_SLOTS) - set(lw)
        if missing:
            raise ValueError(f"persistent layer {i}: missing {sorted(missing)}")
        for j, name in enumerate(LAYER_SLOTS):
            if lw[name] is None and name not in OPTIONAL:
                raise ValueError(f"persistent layer {i}: {name} is a required pointer")
            out[i, j] = ptr(lw[name])
    return out


def check_shape(*, hidden: int, inter: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                splits: int, sliding_window=None) -> None:
    """Refuse, naming the reason, a shape the kernel cannot run."""
    check_positive(hidden=hidden, inter=inter, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                   head_dim=head_dim, splits=splits)
    kernel_name(head_dim, num_q_heads // max(num_kv_heads, 1))
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    for name, v in (("hidden", hidden), ("inter", inter), ("q width", num_q_heads * head_dim)):
        if v % 8:
            raise ValueError(f"the persistent kernel reads {name} rows in 16-byte chunks; {v} is not a multiple of 8")
    if splits > MAX_SPLITS:
        raise ValueError(f"attention splits {splits} above the kernel's {MAX_SPLITS}")
    if sliding_window:
        raise ValueError("the persistent kernel's attention has no sliding window")
    if shared_bytes(hidden, inter, num_q_heads * head_dim) > SMEM_OPTIN_LIMIT:
        raise ValueError(f"the staged GEMV input needs {shared_bytes(hidden, inter, num_q_heads * head_dim)} "
                         f"bytes of shared memory; one block may have {SMEM_OPTIN_LIMIT}")


def persistent_decode(rt, params, *, hidden: int, inter: int, num_q_heads: int, num_kv_heads: int,
                      head_dim: int, splits: int, slice_rows: int, num_sms: int | None = None,
                      ring: bool = False, loader: bool = False) -> LaunchSpec:
    """The cooperative launch of one decode step. ``params``: the device copy of
    :func:`pack_params` (``[len(SLOTS)]``, uploaded as int64: the arena has no uint64); the program it points at must have been
    lowered for ``num_sms`` SMs (default: the device's), one list per block, none longer than
    ``slice_rows`` (the ``slice_rows`` slot must say the same: a longer list traps), its rows' pad
    words set by :func:`ring_page_starts`. ``ring=True`` gives the GEMV tiles a weight ring of every
    page that fits; without one (the default: faster on the H200) they load their weights with
    16-byte loads. ``loader=True`` (with the ring) launches the entry whose block adds a loader
    warpgroup of :data:`LOADER_THREADS` that fills the ring; without it each page's reader issues
    the page after it."""
    check_shape(hidden=hidden, inter=inter, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                head_dim=head_dim, splits=splits)
    check_tensor(params, "params", (len(SLOTS),), "int64")  # the uint64 slots, stored as int64 bits
    sms = sm_count(rt)
    num_sms = sms if num_sms is None else num_sms
    if num_sms != sms:
        raise ValueError(f"the program was lowered for {num_sms} SMs; this device has {sms} (one block per SM)")
    if loader and not ring:
        raise ValueError("the loader warpgroup fills the weight ring: loader=True needs ring=True")
    threads = THREADS + (LOADER_THREADS if loader else 0)
    name = kernel_name(head_dim, num_q_heads // num_kv_heads, loader=loader)
    kernel = rt.kernels.get(LOADER_SOURCE if loader else SOURCE, name, SIGNATURE)
    check_positive(slice_rows=slice_rows)
    lead = shared_bytes(hidden, inter, num_q_heads * head_dim, slice_rows)
    if lead > SMEM_OPTIN_LIMIT:
        raise ValueError(f"the staged GEMV input and the longest instruction list ({slice_rows} rows) need "
                         f"{lead} bytes of shared memory; one block may have {SMEM_OPTIN_LIMIT} (larger tiles "
                         "make shorter lists)")
    pages = ring_pages(kernel.static_shared(), lead) if ring else 0
    if ring and pages < 1:
        raise ValueError(f"the staged GEMV input and the longest instruction list ({slice_rows} rows) need "
                         f"{lead} bytes of shared memory, which leaves no {RING_PAGE_BYTES}-byte page for the "
                         f"weight ring in the {SMEM_OPTIN_LIMIT} one block may have (larger tiles make shorter lists)")
    shared = lead + pages * RING_PAGE_BYTES
    # Always opt in: the kernel's static shared memory (attention, sampler scratch) plus a dynamic
    # part under 48 KiB can still pass the default 48 KiB a block gets without it.
    kernel.set_max_dynamic_shared(shared, rt.device.handle)
    # The driver's own L1/shared split, not the one every other kernel asks for: that one lets a
    # kernel share SMs with its neighbours under PDL, and this one runs alone in its graph. H200,
    # decode stage: 1B 1.3455 ms/token at carveout 100 against 1.2218 with the driver's choice, 8B
    # 5.54 against 5.13 (BENCHMARKS.md, twentieth session).
    kernel.set_carveout(None)
    if resident_blocks(kernel, threads, shared) < 1:  # the cooperative launch would be refused anyway
        raise ValueError(f"{name} does not fit one block per SM with {shared} bytes of shared memory")
    return LaunchSpec(kernel, (num_sms, 1, 1), (threads, 1, 1), kernel.pack(params), shared, name,
                      cooperative=True)
