"""The decode step as one persistent-kernel launch (``NEXUSRT_DECODE=persistent``), beside the
CUDA-graph chain of stages (``graph``, the default until a GPU session has measured it).

:class:`PersistentDecode` lowers the runner's own decode chain (``step.decode_stages``, the
one the graph path captures) with :func:`megakernel.lower.lower` for the device's SM count,
uploads each program once (instruction table, offsets, per-counter totals, counters zeroed)
with a parameter block pointing at the runner's weights and buffers, and hands the runner
one stage to capture. The kernel reads the token and position from the same state words and
writes the next token into the same ring as the graph path's sampler, so the runner's loop is
unchanged. It samples from the same ``SampleParams`` struct (``buffers.sampler.params``, which
the runner rewrites per request) and step word as that sampler, with the same device code, so
greedy and sampled generation (temperature, top-k, top-p, seed) both take this path and give
the graph path's tokens; every parameter set the graph path's sampler takes, it takes.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np

from ... import memory, scheduler
from ...errors import ModelError
from ...kernels.ops import persistent as pk
from ...kernels.ops.common import sm_count
from . import step as steps
from .buffers import OwnedBuffers
from .megakernel.lower import lower

ENV = "NEXUSRT_DECODE"
MODES = ("graph", "persistent")
TILE_ROWS = 16  # NOTES_persistent.md: 16-row tiles balance the GEMVs over 132 SMs
MAX_ATTN_SPLITS = 16
PROFILE_ENV = "NEXUSRT_PERSISTENT_PROFILE"  # 1: record each instruction's clocks (bench --persistent-profile)
RING_ENV = "NEXUSRT_PERSISTENT_RING"  # 1 / loader: GEMV weights through the bulk-copy ring (slower on the H200; opt-in)
RING_MODES = ("0", "1", "loader")  # weight_ring
TAG = "persistent"
_warned: set = set()


def decode_mode(env=None) -> str:
    """``NEXUSRT_DECODE`` (default ``graph``); ValueError naming the choices for anything else."""
    value = (os.environ if env is None else env).get(ENV, "graph").strip().lower() or "graph"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: choose one of {', '.join(MODES)}")
    return value


def profiling(env=None) -> bool:
    """``NEXUSRT_PERSISTENT_PROFILE``: ``1`` records clocks per instruction, ``0``/unset does not."""
    text = (os.environ if env is None else env).get(PROFILE_ENV, "0").strip()
    if text not in ("0", "1"):
        raise ValueError(f"{PROFILE_ENV}={text!r}: 1 records each instruction's clocks, 0 (default) does not")
    return text == "1"


def weight_ring(env=None) -> str:
    """``NEXUSRT_PERSISTENT_RING``: how the GEMV tiles get their weights. ``0`` (default): 16-byte
    loads, which measured fastest on the H200 (BENCHMARKS.md); ``1``: the bulk-copy ring of
    ``cu/persistent_ring.cuh``, each page's reader issuing the page that follows it into its slot;
    ``loader``: the same ring filled by a loader warpgroup of its own (warp specialisation)."""
    text = (os.environ if env is None else env).get(RING_ENV, "0").strip()
    if text not in RING_MODES:
        raise ValueError(f"{RING_ENV}={text!r}: 1 streams the weights through the ring, loader through the "
                         "ring with a loader warpgroup, 0 (default) loads them")
    return text


def attn_splits(num_sms: int, num_kv_heads: int) -> int:
    """Parts per KV head so the attention stage fills the SMs (at most 16, the measured plan)."""
    return max(1, min(MAX_ATTN_SPLITS, num_sms // num_kv_heads))


def device_reason(rt) -> str | None:
    """Why this device cannot run the kernel (it is built and tuned for sm_90), or None."""
    cc = tuple(getattr(getattr(rt, "profile", None), "compute_capability", (0, 0)) or (0, 0))
    if cc[:1] != (9,):
        return f"the persistent decode kernel needs an sm_90 GPU; this one is sm_{cc[0]}{cc[1] if len(cc) > 1 else ''}"
    return None


def check_config(cfg, num_sms: int) -> None:
    """ModelError naming why ``cfg`` cannot take the persistent path."""
    try:
        pk.check_shape(hidden=cfg.hidden_size, inter=cfg.intermediate_size, num_q_heads=cfg.num_attention_heads,
                       num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                       splits=attn_splits(num_sms, cfg.num_key_value_heads), sliding_window=cfg.sliding_window)
        if cfg.head_dim % TILE_ROWS:
            raise ValueError(f"head_dim {cfg.head_dim} is not a multiple of the {TILE_ROWS}-row tiles")
    except ValueError as e:
        raise ModelError(f"{ENV}=persistent cannot run {cfg.source or 'this model'}: {e} "
                         f"(unset {ENV} for the graph path)") from None


def maybe_build(rt, cfg, weights, buffers, env=None):
    """A :class:`PersistentDecode` when ``NEXUSRT_DECODE=persistent`` and the device can take it;
    None for ``graph``, and None with one message on stderr for a device that is not sm_90."""
    if decode_mode(env) != "persistent":
        return None
    reason = device_reason(rt)
    if reason is not None:
        if reason not in _warned:
            _warned.add(reason)
            print(f"nexusrt: {reason}; decoding with the graph path", file=sys.stderr)
        return None
    check_config(cfg, sm_count(rt))
    return PersistentDecode(rt, cfg, weights, buffers, profile=profiling(env), ring=weight_ring(env))


class PersistentDecode(OwnedBuffers):
    """The persistent decode programs of one runner (with and without the sampler's pick)."""

    def __init__(self, rt, cfg, weights, buffers, profile: bool = False, ring: str = "0"):
        super().__init__()
        self.rt, self.cfg, self.w, self.b = rt, cfg, weights, buffers
        self.profile, self.ring = profile, ring
        self.num_sms = sm_count(rt)
        self.splits = attn_splits(self.num_sms, cfg.num_key_value_heads)
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        g = hq // hkv
        self.programs: dict = {}
        self.clocks: dict = {}  # sample -> the program's clock record (profiling only)
        try:
            self.part_ml = self._t(memory.zeros((hkv * self.splits * g * 2,), "fp32", tag=TAG))
            self.part_acc = self._t(memory.zeros((hkv * self.splits * g * d,), "fp32", tag=TAG))
            self.arg_val = self._t(memory.zeros((self.num_sms + 1,), "fp32", tag=TAG))
            self.arg_idx = self._t(memory.zeros((self.num_sms + 1,), "int32", tag=TAG))
            self.debug = self._t(memory.pinned((8,), "int32", tag=TAG))  # readable after a trap
            self.debug.array[:] = 0
            layers = [dict(attn_norm=lw.attn_norm, qkv=lw.qkv, qkv_bias=lw.qkv_bias, q_norm=lw.q_norm,
                           k_norm=lw.k_norm, o=lw.o, mlp_norm=lw.mlp_norm, gate_up=lw.gate_up, down=lw.down,
                           k_pool=buffers.k_pools[i], v_pool=buffers.v_pools[i]) for i, lw in enumerate(weights.layers)]
            self.layers = self._t(memory.from_numpy(pk.pack_layers(layers).view(np.int64), tag=TAG))
        except BaseException:
            self.free()
            raise

    def program(self, sample: bool):
        """``(Program, LaunchSpec, counters tensor, epoch tensor)`` for ``sample``, built once."""
        if sample not in self.programs:
            self.programs[sample] = self._build(sample)
        return self.programs[sample]

    def _build(self, sample: bool):
        cfg, w, b = self.cfg, self.w, self.b
        prog = lower(steps.decode_stages(self.rt, cfg, w, b, sample=sample), cfg, self.num_sms, TILE_ROWS,
                     attn_splits=self.splits)
        table, offsets = prog.pack()
        # Each row's first page in its SM's weight ring, in the row's pad word (kernels/ops/persistent.py).
        table[:, pk.PAGE_WORD] = pk.ring_page_starts(table, offsets, hidden=cfg.hidden_size,
                                                     inter=cfg.intermediate_size, q_width=cfg.q_size)
        t = lambda a: self._t(memory.from_numpy(np.ascontiguousarray(a), tag=TAG))  # noqa: E731
        program, offs = t(table.reshape(-1)), t(offsets)
        slice_rows = max(1, int(np.diff(offsets).max()))
        # [rows, 3] int64 clocks (before the waits, after them, after the signal) of the last step
        clocks = self._t(memory.zeros((len(table), 3), "int64", tag=TAG)) if self.profile else None
        totals = t(np.array([c.target for c in prog.counters], np.int32))
        counters = self._t(memory.zeros((max(len(prog.counters), 1),), "int32", tag=TAG))
        epoch = self._t(memory.zeros((2,), "int32", tag=TAG))  # [epoch, exit ticket]
        params = dict(embed=w.embed, lm_head=w.lm_head, final_norm=w.final_norm, inv_freq=w.inv_freq,
                      x=b.hidden, qkv=b.qkv, q=b.q, attn=b.dec_attn, mlp=b.dec_mlp, logits=b.logits,
                      part_ml=self.part_ml, part_acc=self.part_acc, arg_val=self.arg_val, arg_idx=self.arg_idx,
                      sample_params=b.sampler.params, topk_hist=b.sampler.topk_hist, topk_pool=b.sampler.topk_pool,
                      state=b.state, ring=b.ring, block_table=b.block_table, counters=counters, totals=totals,
                      epoch=epoch, debug=self.debug, profile=clocks, layers=self.layers, program=program, offsets=offs,
                      hidden=cfg.hidden_size, inter=cfg.intermediate_size, vocab=cfg.vocab_size,
                      hq=cfg.num_attention_heads, hkv=cfg.num_key_value_heads, splits=self.splits,
                      ring_size=int(b.ring.shape[0]), slice_rows=slice_rows,
                      eps=cfg.rms_norm_eps, scale=1.0 / math.sqrt(cfg.head_dim))
        block = t(pk.pack_params(params).view(np.int64))
        spec = pk.persistent_decode(self.rt, block, hidden=cfg.hidden_size, inter=cfg.intermediate_size,
                                    num_q_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
                                    head_dim=cfg.head_dim, splits=self.splits, slice_rows=slice_rows,
                                    num_sms=self.num_sms, ring=self.ring != "0", loader=self.ring == "loader")
        self.clocks[sample] = clocks
        return prog, spec, counters, epoch

    def stages(self, sample: bool) -> list:
        """The decode step as one stage (the runner captures it as it captures the chain)."""
        _, spec, _, _ = self.program(sample)
        b = self.b
        outs = [b.hidden, b.logits, *b.k_pools, *b.v_pools] + ([b.token, b.state] if sample else [])
        return [scheduler.stage(name="decode.persistent" + (".sample" if sample else ""), kernel=spec,
                                inputs=[b.token, b.pos, b.block_table, self.w.embed], outputs=outs)]

    def clock_record(self, sample: bool):
        """``(Program, int64 [rows, 3])``: each instruction's SM clocks in the last step run
        (before its waits, after them, after its signal), or None when not profiling."""
        if not self.profile or sample not in self.programs:
            return None
        self.rt.device.make_current()
        return self.programs[sample][0], self.clocks[sample].to_numpy()

    def fault_record(self) -> str | None:
        """What the kernel wrote before trapping (stuck counter or weight-ring wait, unknown opcode,
        an instruction list longer than its shared memory), or None."""
        d = [int(v) for v in self.debug.array[:5]]
        if d[0] > 0 and d[2] == -3:
            return f"SM {d[0] - 1} stuck waiting for weight-ring page {d[1]} (slot {d[3]}, copy {d[4]})"
        if d[0] > 0 and d[2] == -4:
            return (f"SM {d[0] - 1}'s ring loader stuck before page {d[1]}: slot {d[3]}'s copy {d[4] - 1} "
                    "was never read")
        if d[0] > 0:
            return f"SM {d[0] - 1} stuck at program row {d[1]}: counter {d[2]} at {d[3]} of {d[4]} this step"
        if d[0] < 0 and d[2] == -1:
            return f"SM {-d[0] - 1}'s instruction list has {d[1]} rows, more than the shared memory was sized for"
        if d[0] < 0:
            return f"SM {-d[0] - 1} found opcode {d[2]} at program row {d[1]}"
        return None

    def free(self) -> None:
        super().free()
        self.programs.clear()
        self.clocks.clear()
