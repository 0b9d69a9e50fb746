"""Everything a runner keeps on the device besides weights: activations, the paged KV
cache (laid out by :mod:`nexusrt.kvcache`), the step state the graph reads, workspaces and
the pinned token ring.

Prefill rows are sized for the largest chunk bucket. The residual stream (``hidden``) is
fp32, as are the QKV rows RoPE reads; the operands of the tensor-core GEMMs are bf16
(``normed``, ``attn``, ``gate_up``, ``act``). Decode reads row 0 of the shared buffers and
keeps its own fp32 rows for the GEMVs' inputs (``dec_attn``, ``dec_mlp``).
"""

from __future__ import annotations

from ... import memory
from ...kernels.ops import attention_decode as attn_dec
from ...kernels.ops import sampling
from ...kernels.ops.common import sm_count
from ...kernels.ops.gemv import decode_shapes, plan_gemv
from ...kvcache.blocks import BLOCK_SIZE, BlockPool, SequenceBlocks, blocks_for, pool_shape
from ...kvcache.fault_ring import DeviceRing, RingLayout
from ...kvcache.tiers import place_oldest_on_host

TAG = "runner"
RING = 256  # tokens the device can be ahead of the host


def prefill_rows(cfg) -> dict[str, tuple[tuple[int, ...], str]]:
    """The activation buffers of a prefill chunk, one row per token: name -> (row shape, dtype).
    :class:`RunnerBuffers` allocates them and :func:`working_bytes` counts them, from this one table."""
    h, d = cfg.hidden_size, cfg.head_dim
    hq, hkv, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    return {"ids": ((), "int32"), "hidden": ((h,), "fp32"), "qkv": (((hq + 2 * hkv) * d,), "fp32"),
            "q": ((hq, d), "fp32"), "normed": ((h,), "bf16"), "attn": ((hq * d,), "bf16"),
            "gate_up": ((2 * inter,), "bf16"), "act": ((inter,), "bf16")}


def working_bytes(cfg, chunk: int) -> int:
    """Bytes of the activation rows :class:`RunnerBuffers` holds for ``chunk`` prefill rows, plus
    the cuBLASLt workspace and the largest operands its tuning allocates for a moment (the
    fit check adds them to weights and KV; the small decode workspaces are left out)."""
    from ...kernels.ops.cublaslt import WORKSPACE_BYTES
    from ...memory.dtypes import nbytes_of, resolve

    rows = sum(nbytes_of((chunk,) + row, resolve(dtype)) for row, dtype in prefill_rows(cfg).values())
    h, inter = cfg.hidden_size, cfg.intermediate_size
    tuning = 2 * (chunk * h + 2 * inter * h + chunk * 2 * inter)  # the gate_up problem's x, w, y in bf16
    return rows + WORKSPACE_BYTES + tuning


class OwnedBuffers:
    """What a set of buffers allocated, freed together (tensors, and workspaces with a ``free``)."""

    def __init__(self):
        self.owned: list = []

    def _t(self, t):
        self.owned.append(t)
        return t

    def free(self) -> None:
        """Release everything allocated so far (safe twice; used on a failed construction too)."""
        for t in self.owned:
            if getattr(t, "is_live", True):
                t.free()
        self.owned.clear()


class RunnerBuffers(OwnedBuffers):
    """Device buffers sized for ``chunk`` prefill tokens and ``max_context`` cached tokens.

    ``state`` is int32 ``[pos, step, token, 0]``: the decode graph reads the token and the
    position from it and the sampler advances it, so the graph never changes per token.
    """

    def __init__(self, rt, cfg, max_context: int, chunk: int, positions: int | None = None,
                 pool_blocks: int | None = None, host_blocks: int = 0, faults=None,
                 lm_head_rows: int | None = None, attn_wide_splits: int = 0):
        """``chunk``: rows of the largest prefill chunk; ``positions``: cache positions to hold
        (default ``max_context``; a runner adds room for the rows of a padded last chunk).
        ``pool_blocks``: a KV pool of that many blocks shared by many sequences (the batch
        runner writes ``block_table`` before each use) instead of one sequence's blocks.
        ``host_blocks``: that many of the sequence's blocks, its oldest, live in pinned host
        pools (``k_host_pools``/``v_host_pools``, read and written zero-copy; the table names
        them ``~h``, :mod:`nexusrt.kvcache.tiers`), the rest in device pools (one sequence only).
        ``faults`` (a ``kvcache.fault_plan.FaultConfig``, with ``host_blocks``): the device pools get
        ``faults.reserve_blocks`` more blocks after the sequence's own, no table entry naming them
        yet, and ``fault_ring`` holds the ring the decode kernels post host blocks to (else None).
        ``lm_head_rows``: the LM head's rows when it is not the whole vocabulary (a tensor-parallel
        rank's slice), so the GEMV workspace also fits that shape's split-K plan.
        ``attn_wide_splits`` > 0: ``attn_ws_wide``, a second decode-attention workspace of that many
        splits, for the long-context graph (``attention_decode.wide_splits``; else None)."""
        super().__init__()
        d, hq, hkv, inter = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
        self.chunk = chunk
        positions = max_context if positions is None else positions
        try:
            self.state = self._t(memory.zeros((4,), "int32", tag=TAG))
            self.pos, self.step, self.token = self.state[0:1], self.state[1:2], self.state[2:3]
            for name, (row, dtype) in prefill_rows(cfg).items():  # self.ids, self.hidden, ... self.act
                setattr(self, name, self._t(memory.empty((chunk,) + row, dtype, tag=TAG)))
            self.prompt = self._t(memory.pinned((positions,), "int32", tag=TAG))  # ids staged for async copies
            self.dec_attn = self._t(memory.empty((1, hq * d), "fp32", tag=TAG))
            self.dec_mlp = self._t(memory.empty((1, inter), "fp32", tag=TAG))
            self.logits = self._t(memory.empty((1, cfg.vocab_size), "fp32", tag=TAG))
            self.k_host_pools, self.v_host_pools = [], []
            self.fault_ring = None
            if host_blocks and pool_blocks is not None:
                raise ValueError("the host tier is built for one sequence's buffers only (not a shared pool)")
            if faults is not None and not host_blocks:
                raise ValueError("the fault ring moves host-tier blocks: it needs host_blocks > 0")
            if pool_blocks is None:
                total = blocks_for(positions)
                # One sequence holds every KV block: its oldest on the host tier, the rest on the
                # device in order (a device-only table is 0..n-1).
                num_blocks = total - host_blocks
                self.kv_blocks = SequenceBlocks(BlockPool(num_blocks), num_blocks)
                self.kv_blocks.ensure(num_blocks * BLOCK_SIZE)
                self.block_table = self._t(memory.from_numpy(place_oldest_on_host(total, host_blocks), tag=TAG))
                if faults is not None:
                    layout = RingLayout(faults.ring_slots, host_blocks)
                    self.fault_ring = DeviceRing(self._t(memory.from_numpy(layout.initial(), tag="kv_fault")), layout)
                    num_blocks += faults.reserve_blocks  # free device blocks the drain moves host blocks into
                for _ in range(cfg.num_hidden_layers if host_blocks else 0):
                    self.k_host_pools.append(self._t(memory.pinned(pool_shape(host_blocks, hkv, d), "bf16", tag="kv_host")))
                    self.v_host_pools.append(self._t(memory.pinned(pool_shape(host_blocks, hkv, d), "bf16", tag="kv_host")))
            else:
                num_blocks, self.kv_blocks = pool_blocks, None
                self.block_table = self._t(memory.zeros((blocks_for(positions),), "int32", tag=TAG))
            self.k_pools, self.v_pools = [], []
            for _ in range(cfg.num_hidden_layers):
                self.k_pools.append(self._t(memory.empty(pool_shape(num_blocks, hkv, d), "bf16", tag="kv")))
                self.v_pools.append(self._t(memory.empty(pool_shape(num_blocks, hkv, d), "bf16", tag="kv")))
            # One split-K workspace serves every GEMV of the step (they run in stream order).
            shapes = [(n, k, opts) for _, n, k, opts in decode_shapes(cfg)]
            if lm_head_rows is not None:
                shapes.append((lm_head_rows, cfg.hidden_size, {}))
            ws = max(plan_gemv(n, k, 1, gate_up=opts.get("gate_up", False)).workspace_bytes for n, k, opts in shapes)
            self.gemv_ws = self._t(memory.zeros((max(ws, 4),), "uint8", tag=TAG))
            splits = attn_dec.choose_splits(hkv, d, hq // hkv, max_context, sm_count(rt))
            self.attn_ws = self._t(attn_dec.alloc_workspace(hq, hkv, d, splits, tag=TAG))
            self.attn_ws_wide = self._t(attn_dec.alloc_workspace(
                hq, hkv, d, attn_wide_splits, tag=TAG)) if attn_wide_splits else None
            self.sampler = self._t(sampling.alloc_buffers(cfg.vocab_size, tag=TAG))
            self.ring = self._t(memory.pinned((RING,), "int32", tag=TAG))
            self.ring.array[:] = -1
        except BaseException:
            self.free()
            raise

    def host_pools(self, layer: int):
        """``(k_host, v_host)`` of ``layer`` for the launchers, or None without a host tier."""
        return (self.k_host_pools[layer], self.v_host_pools[layer]) if self.k_host_pools else None
